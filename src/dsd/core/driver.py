"""DSD in any training loop: one object that follows a recipe step by step.

    dsd_run = dsd.DSD(model, optimizer, [
        {"kind": "dense", "epochs": 10, "lr": 0.1},
        {"kind": "sparse", "epochs": 4, "lr": 0.01, "sparsity": 0.3},
        {"kind": "redense", "epochs": 4},                      # 1/10 of the sparse LR
    ], steps_per_epoch=len(loader), exclude=["conv1.weight"])
    while not dsd_run.done:
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            dsd_run.step()                                     # after EVERY optimizer step
            if dsd_run.done:
                break

`steps_per_epoch` counts optimizer steps (with gradient accumulation over k batches, ceil(len(loader) / k)).
It sets each step's learning rate (the phase's own LR and schedule; param groups built with different LRs keep
their ratios, the largest getting the recipe's), chooses the masks when a sparse phase starts, re-applies them
(and zeroes the optimizer state at pruned entries) after every step, drops them when a re-dense phase starts,
and says which phase it is in. A model stepped by several optimizers passes a list of them: each gets its
LR and its state masked. Iterative DSD and Skinny-DNN / IHT are recipes too (`dsd.Recipe.iht`). Its
state dict resumes exactly: step count and masks (bit-packed); one that does not fit is refused whole.
"""

from __future__ import annotations

import itertools
import numbers
import operator
import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from dsd.core.masks import (
    Optimizers,
    Pruner,
    check_patterns,
    holder,
    optimizer_list,
    prunable_parameters,
    saved_masks,
    shaped_state,
)
from dsd.core.schedule import Phase, Recipe, lr_at, phase_steps

LR_SCALE = "dsd_lr_scale"  # a param group's LR as a fraction of the recipe's


def check_steps_per_epoch(steps: int) -> int:
    """A whole number (numpy's too): 2.5 made every phase round up, an unsized loader's inf failed in math.ceil."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps_per_epoch must be a whole number of at least 1, got {steps!r}")
    return int(steps)


def built_lr(group: dict) -> float:
    """The LR a param group was built with. An LR scheduler created before the driver (the Hugging Face
    Trainer's, a Lightning module's) keeps it as `initial_lr` and may have moved `lr` already: a warmup's first
    LR is 0, which as a ratio would hold every group at 0 for the whole recipe."""
    return float(group.get("initial_lr", group["lr"]))


def stepped_by(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The outermost optimizer whose `step()` runs step hooks: accelerate's AcceleratedOptimizer does not (it
    skips torch's Optimizer.__init__), the one inside it does."""
    return optimizer if hasattr(optimizer, "_optimizer_step_pre_hooks") else holder(optimizer)


class DSD:
    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizers,
        recipe: Recipe | Iterable[Mapping],
        steps_per_epoch: int,
        lr_schedule: str = "constant",
        exclude: Iterable[str] = (),
        include: Iterable[str] | None = None,
    ):
        steps_per_epoch = check_steps_per_epoch(steps_per_epoch)
        # a model stepped by several optimizers (sparse embeddings and the rest, say): a list of them all
        self.model, self.optimizer, self._optimizers = model, optimizer, optimizer_list(optimizer)
        self.recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_config(recipe)
        self.steps_per_epoch, self.lr_schedule = steps_per_epoch, lr_schedule
        check_patterns(model, exclude, include)  # now, not when the first sparse phase starts
        self.exclude, self.include = tuple(exclude or ()), None if include is None else tuple(include)
        self.lengths = [phase_steps(p.epochs, steps_per_epoch) for p in self.recipe.phases]
        self.global_step, self.index, self.pruner = 0, 0, None
        # layer-wise LRs keep their ratios: the recipe's LR is the largest group's (a group's ratio is kept
        # in it, LR_SCALE, so the optimizer's state dict resumes it)
        self._lr_base = max((built_lr(g) for g in self._param_groups()), default=0.0)
        self._skip_empty()
        self._before_entry = self._snapshot() if self.phase is not None and self.phase.prunes else None
        self._enter()
        self._watch_added_param_groups()

    # ------------------------------------------------------------------------------------------ progress

    @property
    def done(self) -> bool:
        return self.index >= len(self.recipe.phases)

    @property
    def phase(self) -> Phase | None:
        """The phase the next optimizer step belongs to (None once the recipe is done)."""
        return None if self.done else self.recipe.phases[self.index]

    @property
    def step_in_phase(self) -> int:
        return self.global_step - sum(self.lengths[: self.index])

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        phase = self.phase
        if phase is None:
            return 0.0
        steps = self.lengths[self.index]
        return lr_at(phase.lr, self.step_in_phase, steps, self.lr_schedule, self.steps_per_epoch)

    def sparsity(self) -> float:
        """Measured fraction of zeros over the masked tensors (0 outside sparse phases)."""
        return self.pruner.overall_sparsity() if self.pruner is not None else 0.0

    def step(self) -> None:
        """Call after every optimizer step (also one a GradScaler skipped)."""
        self._before_entry = None
        if self.done:
            return
        if self.pruner is not None:
            self.pruner.step(self.optimizer)
        self.global_step += 1
        if self.step_in_phase >= self.lengths[self.index]:
            self.index += 1
            self._skip_empty()
            self._enter()
        self._set_lr()

    # ----------------------------------------------------------------------------------------- internals

    def _skip_empty(self) -> None:
        """A phase of 0 steps (a pretrained start's dense phase) is already over."""
        while not self.done and self.lengths[self.index] == 0:
            self.index += 1

    def _enter(self) -> None:
        """At a phase's first step: choose masks for a sparse phase; drop them for anything else."""
        phase = self.phase
        self._set_lr()  # first: state that restarts at the LR (Rprop's step sizes) restarts at this phase's
        if phase is not None and phase.prunes:
            if self.pruner is not None:
                self.pruner.remove(self.optimizer)
            self.pruner = Pruner(self.model, phase.sparsity, exclude=self.exclude, include=self.include)
            self.pruner.step(self.optimizer)  # no stale momentum at pruned entries
        elif self.pruner is not None:
            self.pruner.remove(self.optimizer)  # re-dense: pruned weights restart from zero
            self.pruner = None

    @torch.no_grad()
    def _snapshot(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """A recipe that starts sparse (a pretrained model's) prunes when the object is built. If a state dict
        is loaded before the first step (a resume: model and optimizer loaded first, in the natural order),
        what that pruning overwrote is put back: these copies, dropped at the first step."""
        saved = []
        for name, param in prunable_parameters(self.model, self.exclude, self.include).items():
            state = [t for optimizer in self._optimizers for t in shaped_state(optimizer, param)]
            saved += [(name, t, t.clone()) for t in (param, *state)]
        return saved

    @torch.no_grad()
    def _undo_construction_pruning(self) -> None:
        """Put back what building pruned, only where a tensor still holds exactly what that pruning left: one
        loaded after the driver was built (build, then load the checkpoint) holds the resumed values."""
        masks = self.pruner.masks
        for name, tensor, value in self._before_entry:
            value = value.to(tensor.device)  # the model moved since it was built (`.to("cuda")`), say
            if torch.equal(tensor, value * masks[name].to(tensor.device)):
                tensor.copy_(value)

    def _watch_added_param_groups(self) -> None:
        """A param group added within a phase (`add_param_group`: a layer unfrozen) would take its first step at
        the LR it was added with, before `step()` next sets LRs: a hook sets the recipe's before that step. It
        holds the driver weakly: a dropped driver's hook does nothing."""
        driver = weakref.ref(self)

        def before_step(optimizer, args, kwargs):
            this = driver()
            if this is not None and any(LR_SCALE not in group for group in this._param_groups()):
                this._set_lr()

        for optimizer in self._optimizers:
            stepped_by(optimizer).register_step_pre_hook(before_step)

    def _param_groups(self) -> list[dict]:
        return [group for optimizer in self._optimizers for group in optimizer.param_groups]

    def _lr_ratio(self, group: dict) -> float:
        """A group's LR as a fraction of the largest; all of them 1 when every group was built at 0."""
        return built_lr(group) / self._lr_base if self._lr_base else 1.0

    def _set_lr(self) -> None:
        if not self.done:
            for group in self._param_groups():
                lr = self.lr * group.setdefault(LR_SCALE, self._lr_ratio(group))
                if torch.is_tensor(group["lr"]):  # in place: a captured CUDA graph or compiled step reads it
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr

    # --------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Step count and masks (bit-packed); with the model's and optimizer's state dicts, an exact resume."""
        return {
            "global_step": self.global_step,
            "index": self.index,
            "steps_per_epoch": self.steps_per_epoch,
            "phases": [vars(p) for p in self.recipe.phases],
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume at the saved step with the saved masks. All of `state` is checked first: one that does not fit
        (another recipe, model, batch size or exclude; a damaged one) raises one ValueError naming what, and
        leaves the driver and the model as they were."""
        global_step, index = self._checked_progress(state)
        masks = self._checked_masks(state.get("pruner"), index)
        # nothing has changed yet, and nothing below can fail on the state
        self.global_step, self.index = global_step, index
        if self._before_entry is not None:  # built just now: undo the pruning its construction did
            self._undo_construction_pruning()
            self._before_entry = None
        # a pruner of the phase it was in is dropped unapplied: its masks would prune the weights just loaded
        self.pruner = Pruner.resumed(self.model, state["pruner"], masks) if masks is not None else None
        self._set_lr()

    def _checked_progress(self, state: Mapping) -> tuple[int, int]:
        """The saved step and phase index, once the state is known to be this recipe's at this batch size."""
        if not isinstance(state, Mapping):
            raise ValueError(f"not a dsd.DSD state dict: a {type(state).__name__}")
        missing = [key for key in ("global_step", "index", "phases") if key not in state]
        if missing:
            raise ValueError(f"DSD state has no {missing[0]!r} (not a dsd.DSD state dict?)")
        if [vars(p) for p in self.recipe.phases] != list(state["phases"]):
            raise ValueError("DSD state of another recipe")
        saved_steps = state.get("steps_per_epoch", self.steps_per_epoch)
        if saved_steps != self.steps_per_epoch:  # the phases' lengths, and the step's place in them, differ
            raise ValueError(
                f"DSD state saved with steps_per_epoch={saved_steps}, this one has {self.steps_per_epoch} "
                "(another batch size or number of processes?)"
            )
        global_step, index, total = _whole(state["global_step"]), _whole(state["index"]), sum(self.lengths)
        if global_step is None or not 0 <= global_step <= total:
            raise ValueError(
                f"DSD state at step {state['global_step']!r}, not one of the recipe's 0..{total}"
            )
        if index != self._index_at(global_step):
            raise ValueError(
                f"DSD state in phase {state['index']!r} at step {global_step}, which is in phase "
                f"{self._index_at(global_step)} of this recipe (a damaged state?)"
            )
        return global_step, index

    def _index_at(self, global_step: int) -> int:
        """The phase a step belongs to, as `step()` counts it (phases of 0 steps skipped)."""
        ends = itertools.accumulate(self.lengths)
        return next((i for i, end in enumerate(ends) if end > global_step), len(self.lengths))

    def _checked_masks(self, pruner: Mapping | None, index: int) -> dict[str, torch.Tensor] | None:
        """The saved masks, unpacked, once they are known to be this model's: masks in every sparse phase and
        only there, for exactly the weights this driver prunes."""
        phase = self.recipe.phases[index] if index < len(self.recipe.phases) else None
        if not (phase is not None and phase.prunes):
            if pruner:
                raise ValueError(
                    f"DSD state has masks outside a sparse phase (in {phase.name if phase else 'the end'})"
                )
            return None
        if not pruner or not pruner.get("active", True):
            raise ValueError(f"DSD state in sparse phase {phase.name} has no masks (a damaged state?)")
        try:
            masks = saved_masks(self.model, pruner)
        except ValueError as err:
            raise ValueError(f"DSD state: {err}") from None
        chosen = prunable_parameters(self.model, self.exclude, self.include)
        unexpected, missing = sorted(set(masks) - set(chosen)), sorted(set(chosen) - set(masks))
        if unexpected or missing:
            raise ValueError(
                "DSD state "
                + (
                    f"masks {unexpected[0]!r}, which"
                    if unexpected
                    else f"has no mask for {missing[0]!r}, which"
                )
                + f" this driver {'does not prune' if unexpected else 'prunes'} (another model, exclude or include?)"
            )
        return masks


def _whole(value) -> int | None:
    """A saved count as an int (numpy's and 0-d tensors' too); None if it is not a whole number."""
    try:
        return None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None
