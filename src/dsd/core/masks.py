"""Per-tensor magnitude pruning with masks held fixed for a whole sparse phase.

Masking is done in place on the parameters themselves (no reparametrisation), so recurrent layers keep their
flat weights and checkpoints keep plain state dicts. After every optimizer step the pruned weights and the
optimizer state at pruned entries are set back to exactly zero, so momentum, weight decay and Adam moments
cannot revive them.

A model sharded with FSDP2 (`fully_shard`: DTensor parameters) is ranked per whole tensor, so its masks are those
of the same model unsharded; the older FullyShardedDataParallel is refused (see `sharding_checked`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dsd.core.patterns import matches, unmatched
from dsd.core.schedule import check_sparsity

STATE_VERSION = 1

# Optimizer state that starts at a group option, not at zero: Rprop's per-weight step sizes (zero would freeze a
# re-densed weight for dozens of steps) and Adagrad's accumulator. Pruned entries restart at that value.
RESTART_AT = (
    (torch.optim.Rprop, "step_size", "lr"),
    (torch.optim.Adagrad, "sum", "initial_accumulator_value"),
)


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's, DistributedDataParallel's or DataParallel's wrapper: the same
    parameters under the names the user knows (no `_orig_mod.` / `module.`), so patterns and saved masks match
    whether or not the model was wrapped."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


# Where DTensor lives: public from torch 2.5; before, torch.distributed.tensor holds only `parallel` (imported
# with torch.distributed.fsdp) and DTensor is torch.distributed._tensor's (later an alias of the public one).
DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor: an FSDP2 parameter, or optimizer state of one. Checked without importing
    torch.distributed.tensor (0.6 s): no tensor can be a DTensor until something has imported it."""
    for name in DTENSOR_MODULES:
        dtensor = getattr(sys.modules.get(name), "DTensor", None)
        if dtensor is not None:
            return isinstance(tensor, dtensor)
    return False


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds (all of a plain tensor): masking works on it in place, as the
    optimizer's own update does, with no collective. Fetched at each use: FSDP2 re-creates a parameter's local
    tensor (its lazy init, `.to()`)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor, gathered from every rank (a collective: every rank must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def sharded_like(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """A whole `tensor` (a mask) sharded as `param` is. Every rank holds the same whole tensor, so each takes
    its own shard without communication (src_data_rank=None)."""
    if not is_sharded(param) or is_sharded(tensor):
        return tensor
    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch < 2.5 (see DTENSOR_MODULES)
        from torch.distributed._tensor import distribute_tensor
    if "src_data_rank" not in inspect.signature(distribute_tensor).parameters:
        # older torch sends rank 0's mask to every rank instead: the same mask, and every rank calls this
        return distribute_tensor(tensor, param.device_mesh, param.placements)
    return distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)


def sharding_checked(model: nn.Module) -> nn.Module:
    """`unwrapped(model)`, refusing the older FullyShardedDataParallel: it flattens weights into shards of one
    flat parameter (`use_orig_params` exposes 1-D slices of them), so no rank sees a weight's shape or all its
    magnitudes and every weight would silently stay dense."""
    model = unwrapped(model)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and any(isinstance(m, fsdp.FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "dsd cannot prune a FullyShardedDataParallel model: its flat, sharded parameters hide each weight's "
            "shape and magnitudes; shard it with torch.distributed.fsdp.fully_shard (FSDP2) instead"
        )
    return model


def aliases(model: nn.Module) -> dict[str, str]:
    """Names a pattern may use instead of a parameter name: `first_conv`, the weight of the first convolution
    (in registration order, the forward order of torchvision's models), which the DSD paper keeps dense."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return {"first_conv": f"{name}.weight" if name else "weight"}
    return {}


def expand_aliases(patterns: Iterable[str] | None, model: nn.Module) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    known = aliases(model)
    if "first_conv" in patterns and "first_conv" not in known:
        raise ValueError("pattern 'first_conv': the model has no convolution")
    return tuple(known.get(p, p) for p in patterns)


def prunable_parameters(
    model: nn.Module, exclude: Iterable[str] = (), include: Iterable[str] | None = None
) -> dict[str, nn.Parameter]:
    """Weights with 2+ dims (conv, linear, embedding, RNN, attention) minus `exclude`; each shared tensor once.
    Norm parameters are never pruned, even with 2+ dims: LayerNorm([C, H, W])'s, weight_norm's magnitudes g
    (its directions v are pruned).

    `include`, when given, narrows the candidates to names matching one of its patterns (the speech track
    prunes only fully connected and recurrent weights, say). Names are those of the unwrapped model's
    `named_parameters()` (see `unwrapped`).
    """
    model = sharding_checked(model)
    exclude = expand_aliases(_patterns(exclude, "exclude"), model)
    include = expand_aliases(_patterns(include, "include"), model)
    names_of: dict[nn.Parameter, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):  # a tied weight answers to every name
        names_of.setdefault(param, []).append(name)
    chosen, norms = {}, weight_norm_magnitudes(model) | layer_norm_parameters(model)
    opaque = opaque_originals(model)
    for name, param in model.named_parameters():  # shared parameters are listed once, under their first name
        if param.dim() < 2 or is_bias(name) or param in norms:  # biases and norm parameters never
            continue
        if any(matches(n, exclude) for n in names_of[param]):
            continue
        if include is not None and not any(matches(n, include) for n in names_of[param]):
            continue
        if param in opaque:
            raise ValueError(
                f"{name}: the original of a {opaque[param]} parametrization, not known to keep its weight zero "
                "where the original is zero (pruned, the weight the model uses could stay dense); exclude it"
            )
        chosen[name] = param
    return chosen


# Parametrizations whose weight is zero wherever the (pruned) original is: weight_norm's g * v / |v| and
# spectral_norm's W / sigma. The weight of any other (orthogonal's, a user's) would stay dense.
KEEPS_ZEROS = ("_WeightNorm", "_SpectralNorm")


def opaque_originals(model: nn.Module) -> dict[nn.Parameter, str]:
    """Originals of parametrizations not known to keep zeros, each with the kind of one that does not."""
    found = {}
    for module in model.modules():
        if not torch.nn.utils.parametrize.is_parametrized(module):
            continue
        for chain in module.parametrizations.values():  # the originals are the chain's own parameters
            kinds = [type(p).__name__ for p in chain if type(p).__name__ not in KEEPS_ZEROS]
            if kinds:
                found |= dict.fromkeys(chain.parameters(recurse=False), kinds[0])
    return found


def weight_norm_magnitudes(model: nn.Module) -> set[nn.Parameter]:
    """weight_norm's g: one scale per output channel, with as many dims as the weight, so a norm parameter that
    pruning would turn into dead channels. Named `<w>_g` beside `<w>_v` (torch.nn.utils.weight_norm) or
    `parametrizations.<w>.original0` beside `original1` (torch.nn.utils.parametrizations.weight_norm)."""
    params = dict(model.named_parameters())
    pairs = (("_g", "_v"), (".original0", ".original1"))
    return {
        param
        for name, param in params.items()
        for g, v in pairs
        if name.endswith(g) and name[: -len(g)] + v in params and param.numel() == max(param.shape, default=1)
    }


def is_bias(name: str) -> bool:
    """Biases are never pruned, also those of 2+ dims (MultiheadAttention's bias_k / bias_v, a (1, C, 1, 1) one)."""
    return name.rsplit(".", 1)[-1].startswith("bias")


# Norms whose weight and bias take the normalized shape, 2+ dims for LayerNorm([C, H, W]); batch, instance and
# group norms' are per channel, 1-D. RMSNorm exists from torch 2.4.
SHAPED_NORMS = tuple(getattr(nn, name) for name in ("LayerNorm", "RMSNorm") if hasattr(nn, name))


def layer_norm_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Weights and biases of LayerNorm / RMSNorm: norm parameters even when they have 2+ dims."""
    return {p for m in model.modules() if isinstance(m, SHAPED_NORMS) for p in m.parameters(recurse=False)}


def _patterns(patterns: Iterable[str] | None, what: str) -> tuple[str, ...] | None:
    if isinstance(patterns, str):  # iterating a string would make each character a pattern
        raise TypeError(f"{what}: a list of names or patterns, got the string {patterns!r}")
    if patterns is None:  # no exclude excludes nothing; no include leaves every weight a candidate
        return () if what == "exclude" else None
    return tuple(patterns)


def check_patterns(
    model: nn.Module, exclude: Iterable[str] = (), include: Iterable[str] | None = None
) -> None:
    """A pattern that matches no parameter is almost always a typo, which would silently prune a layer; an
    `include` or `exclude` that leaves nothing to prune is one too (every sparse phase would run dense)."""
    model = sharding_checked(model)
    exclude, include = _patterns(exclude, "exclude"), _patterns(include, "include")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    typos = unmatched(names, (*expand_aliases(exclude, model), *(expand_aliases(include, model) or ())))
    if typos:
        raise ValueError(
            f"pattern {typos[0]!r} (exclude/include) matches no parameter of the model{_wrapper_hint(typos[0])}"
        )
    chosen = prunable_parameters(model, exclude, include)  # refuses a weight it cannot prune, now
    if include is not None and not chosen:
        raise ValueError(f"include {list(include)}: no weight of 2+ dimensions left to prune")
    if not chosen:
        raise ValueError(f"exclude {list(exclude)}: no weight of 2+ dimensions left to prune")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel's, torch.compile's


def _wrapper_hint(pattern: str) -> str:
    """A name copied from a wrapped model's named_parameters() carries the wrapper's prefix, which dsd drops."""
    prefix = next((p for p in WRAPPER_PREFIXES if pattern.startswith(p)), None)
    if prefix is None:
        return ""
    return f" (names are the wrapped module's, without {prefix!r}: {pattern.removeprefix(prefix)!r})"


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (True = kept) pruning exactly round(sparsity * numel) entries of smallest |w|.

    Ties at the threshold are broken by flat index (lower index pruned first), so the mask is a pure function
    of the weights. A selection (not a full sort) keeps this linear in the tensor size.

    A sharded weight (FSDP2's DTensor) is ranked whole, gathered on every rank: ranking each shard would keep
    each shard's own largest entries. Its mask comes back sharded as the weight is.
    """
    if is_sharded(weight):
        return sharded_like(weight, magnitude_mask(weight.full_tensor(), sparsity))
    n = weight.numel()
    k = int(round(check_sparsity(sparsity) * n))
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    magnitude = weight.detach().abs().flatten()
    if magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()
    if magnitude.device.type == "cpu":  # numpy's introselect is several times faster than kthvalue here
        threshold = torch.as_tensor(np.partition(magnitude.numpy(), k - 1)[k - 1])
    else:
        threshold = magnitude.kthvalue(k).values
    pruned = magnitude < threshold
    still_to_prune = k - int(torch.count_nonzero(pruned))
    if still_to_prune:  # ties at the threshold: lowest flat index first
        pruned[(magnitude == threshold).nonzero().flatten()[:still_to_prune]] = True
    return (~pruned).view_as(weight)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 bit per weight for checkpoints (uint8 tensor, loadable with weights_only=True)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().flatten().numpy()))


def unpack_mask(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    shape = torch.Size(shape)
    size = (shape.numel() + 7) // 8
    # numpy pads a short one with zeros: a truncated mask would silently prune the weights it lost
    if not torch.is_tensor(packed) or packed.dtype != torch.uint8 or packed.shape != (size,):
        got = f"{tuple(packed.shape)} {packed.dtype}" if torch.is_tensor(packed) else type(packed).__name__
        raise ValueError(f"a packed mask of shape {tuple(shape)} is {size} bytes of uint8, got {got}")
    bits = np.unpackbits(packed.cpu().numpy(), count=shape.numel())
    return torch.from_numpy(bits.astype(bool)).view(shape)


def in_layout_of(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (a mask, optimizer state) on the parameter's device and in its memory layout (channels-last,
    say): elementwise work then reads both in the same order (`make bench` section 2 times the masks')."""
    if tensor.device == param.device and tensor.stride() == param.stride():
        return tensor
    return torch.empty_like(param, dtype=tensor.dtype).copy_(tensor)


Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


def optimizer_list(optimizer: Optimizers) -> list[torch.optim.Optimizer]:
    """One optimizer, a list or tuple of them (a model split between two: sparse embeddings and the rest), or none."""
    if optimizer is None:
        return []
    optimizers = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
    if any(isinstance(holder(each), torch.optim.LBFGS) for each in optimizers):
        raise ValueError(
            "optimizer: LBFGS re-evaluates the loss within one step with pruned weights moved off zero (masks "
            "apply between steps); use an optimizer that updates once per step"
        )
    return optimizers


def holder(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state: the one inside accelerate's AcceleratedOptimizer (`.optimizer`) or
    ZeroRedundancyOptimizer (`.optim`, with this rank's shard of the state; its own `.state` stays empty)."""
    for attribute in ("optimizer", "optim"):
        inner = getattr(optimizer, attribute, None)
        if isinstance(inner, torch.optim.Optimizer):
            return holder(inner)
    return optimizer


def shaped_state(optimizer: torch.optim.Optimizer, param: torch.Tensor):
    """The optimizer's state tensors shaped like `param` (momentum, Adam's moments): what masking also zeroes."""
    state = holder(optimizer).state.get(param, {})  # a sharded parameter's state is sharded alike
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            yield value


def zeros(param: torch.Tensor) -> int:
    """Exact zeros in the whole of `param`: a sharded one's are summed over its shards."""
    return int(full((param == 0).sum()))


def _as_uint8(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class Pruner:
    """Prunes a model's weights per tensor by magnitude and keeps them pruned until `remove()`.

    >>> pruner = Pruner(model, sparsity=0.3, exclude=("conv1.weight",))
    >>> loss.backward(); optimizer.step(); pruner.step(optimizer)
    >>> pruner.remove(optimizer)   # re-dense

    A DistributedDataParallel, DataParallel or torch.compile'd model is pruned as the module it wraps (names
    without `module.` / `_orig_mod.`): masks are a function of the weights, which DDP keeps identical on every
    rank, so every rank chooses the same masks. An FSDP2 model's masks are DTensors sharded as its weights, chosen
    from the whole weights; building the pruner, `sparsity()`, `overall_sparsity()` and `state_dict()` are then
    collectives, which every rank calls.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        exclude: Iterable[str] = (),
        include: Iterable[str] | None = None,
        *,
        _masks: Mapping[str, torch.Tensor] | None = None,
    ):
        self.model = model = sharding_checked(model)
        self.target_sparsity = check_sparsity(sparsity)
        self.exclude, self.include = _patterns(exclude, "exclude"), _patterns(include, "include")
        if _masks is None:
            check_patterns(model, self.exclude, self.include)
            self._params = prunable_parameters(model, self.exclude, self.include)
            on_meta = [n for n, p in self._params.items() if p.is_meta]
            if on_meta:
                raise ValueError(
                    f"{on_meta[0]}: on the meta device, no values to rank; load the weights first"
                )
            masks = {n: magnitude_mask(p, self.target_sparsity) for n, p in self._params.items()}
        else:
            named = dict(model.named_parameters())
            self._params = {n: named[n] for n in _masks}
            masks = {n: sharded_like(self._params[n], m) for n, m in _masks.items()}
        self.masks = {n: in_layout_of(self._params[n], m) for n, m in masks.items()}
        self.active = True
        self._refresh_lists()
        self.apply()

    def _refresh_lists(self) -> None:
        """The lists the masking multiplies. Bool masks enter as uint8 views of the same bytes (no copy): the
        same products, and the CPU's multiply by uint8 is faster than by bool (`make bench` section 2)."""
        self._param_list = list(self._params.values())
        self._mask_list = [_as_uint8(local(self.masks[n])) for n in self._params]
        self._sharded = any(is_sharded(p) for p in self._param_list)

    def _local_params(self) -> list[torch.Tensor]:
        return [local(p) for p in self._param_list] if self._sharded else self._param_list

    @torch.no_grad()
    def apply(self) -> None:
        """Set every pruned weight to exactly zero (one fused pass over all masked tensors)."""
        if self.active and self._param_list:
            self._follow_moved_parameters()
            torch._foreach_mul_(self._local_params(), self._mask_list)

    def _follow_moved_parameters(self) -> None:
        """A model moved after its masks were chosen (`model.to("cuda")`): the masks move with it, once. The
        first parameter stands for all (`.to()` moves the whole model; checking each would cost every step)."""
        if self._mask_list[0].device != self._param_list[0].device:
            self.masks = {n: in_layout_of(self._params[n], m) for n, m in self.masks.items()}
            self._refresh_lists()

    @torch.no_grad()
    def _mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        tensors, masks = [], []
        for param, mask in zip(self._param_list, self._mask_list, strict=True):
            for value in shaped_state(optimizer, param):
                value = local(value) if self._sharded else value  # a plain model's step skips the check
                tensors.append(value)
                masks.append(mask if value.device == mask.device else mask.to(value.device))
        if tensors:
            torch._foreach_mul_(tensors, masks)
        self._restart_optimizer_state(optimizer)

    @torch.no_grad()
    def _restart_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        inner = holder(optimizer)
        restarts = [(key, option) for kind, key, option in RESTART_AT if isinstance(inner, kind)]
        if not restarts:
            return
        mask_of = dict(zip(self._param_list, self._mask_list, strict=True))  # local shards
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state.get(param, {}) if param in mask_of else {}
                for key, option in restarts:
                    value = state.get(key)
                    if torch.is_tensor(value) and value.shape == param.shape:
                        local(value).masked_fill_(mask_of[param].to(value.device) == 0, group[option])

    def step(self, optimizer: Optimizers = None) -> None:
        """Call after every optimizer step (also when a GradScaler skipped it): re-zero weights and state.
        `optimizer`: one, or a list of all those that step the model's weights."""
        if not self.active:
            return
        self.apply()
        for each in optimizer_list(optimizer):
            self._mask_optimizer_state(each)

    def remove(self, optimizer: Optimizers = None) -> None:
        """Re-dense: clear the optimizer state at pruned entries once more, then stop masking."""
        if self.active:
            self.apply()
            for each in optimizer_list(optimizer):
                self._mask_optimizer_state(each)
        self.active = False
        self.masks, self._params = {}, {}
        self._refresh_lists()

    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Measured fraction of exact zeros per masked tensor (not the target); 0 for an empty one."""
        return {n: zeros(p) / max(p.numel(), 1) for n, p in self._params.items() if n in self.masks}

    @torch.no_grad()
    def overall_sparsity(self) -> float:
        """Measured fraction of zeros over all masked tensors together."""
        if not self.masks:
            return 0.0
        params = [self._params[n] for n in self.masks]
        return sum(zeros(p) for p in params) / max(sum(p.numel() for p in params), 1)

    def state_dict(self) -> dict:
        """Masks bit-packed (1 bit per weight); loadable with torch.load(weights_only=True)."""
        return {
            "version": STATE_VERSION,
            "sparsity": self.target_sparsity,
            "exclude": list(self.exclude),
            "include": None if self.include is None else list(self.include),
            "active": self.active,
            # whole masks, also of a sharded model: a checkpoint resumes under any sharding or none
            "masks": {n: pack_mask(full(m)) for n, m in self.masks.items()},
            "shapes": {n: list(m.shape) for n, m in self.masks.items()},
        }

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping) -> Pruner:
        """Resume with exactly the saved masks (never re-chosen from the current weights). A state that does not
        fit the model raises ValueError before anything of the model is changed."""
        return cls.resumed(model, state, saved_masks(model, state))

    @classmethod
    def resumed(cls, model: nn.Module, state: Mapping, masks: Mapping[str, torch.Tensor]) -> Pruner:
        """`from_state_dict` with the masks `saved_masks` has checked and unpacked already."""
        pruner = cls(model, state["sparsity"], state["exclude"], state["include"], _masks=masks)
        if not state.get("active", True):
            pruner.remove()
        return pruner


PRUNER_KEYS = ("sparsity", "exclude", "include", "masks", "shapes")


def saved_masks(model: nn.Module, state: Mapping) -> dict[str, torch.Tensor]:
    """The masks of a `Pruner.state_dict()`, unpacked, once all of it is known to fit `model`: a state that does
    not (another model's, a damaged one) raises one ValueError naming what does not fit, and changes nothing."""
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        raise ValueError("not a dsd.Pruner state dict (missing or unknown 'version')")
    missing = [key for key in PRUNER_KEYS if key not in state]
    if missing:
        raise ValueError(f"pruner state has no {missing[0]!r} (a damaged dsd.Pruner state dict?)")
    check_sparsity(state["sparsity"])
    _patterns(state["exclude"], "exclude")
    _patterns(state["include"], "include")
    shapes, packed = state["shapes"], state["masks"]
    if not isinstance(shapes, Mapping) or not isinstance(packed, Mapping) or set(shapes) != set(packed):
        raise ValueError(
            "pruner state: its 'masks' and 'shapes' name different parameters (a damaged state?)"
        )
    params = dict(sharding_checked(model).named_parameters())
    masks = {}
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"pruner state names parameter {name!r}, which the model does not have")
        if list(params[name].shape) != list(shape):
            raise ValueError(
                f"pruner state mask for {name!r} has shape {tuple(shape)}, "
                f"the model's parameter has {tuple(params[name].shape)}"
            )
        try:
            masks[name] = unpack_mask(packed[name], shape)
        except ValueError as err:
            raise ValueError(f"pruner state mask for {name!r}: {err} (a damaged state?)") from None
    return masks
