"""Phase recipes: dense -> sparse(s1) -> redense [-> sparse(s2) -> redense ...], and the equal-epoch control.

Iterative DSD and Skinny-DNN / IHT are the same recipe with more phases; an `iht` entry (`cycles` x sparse at
one sparsity, with a re-dense at the same LR between them) is shorthand for the latter. Phase names are stable identifiers
used in run folders: `dense`, `sparse1`, `redense1`, `sparse2`, ... and `control` for the dense run that
continues from `dense` for as many epochs, with the same learning rates, as all later phases together.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

KINDS = ("dense", "sparse", "redense")
ENTRY_KEYS = ("kind", "epochs", "lr", "sparsity", "cycles")
CONTROL = "control"
REDENSE_LR_FACTOR = 0.1


def is_number(value) -> bool:
    """A finite real number, numpy's too (a sweep's np.float32, a computed np.int64 of epochs); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_sparsity(sparsity: float) -> float:
    """Sparsity is the fraction pruned: 0 keeps everything, 1 would delete the tensor."""
    if not is_number(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


@dataclass(frozen=True)
class Phase:
    name: str
    kind: str  # dense | sparse | redense
    epochs: float
    lr: float
    sparsity: float = 0.0

    @property
    def prunes(self) -> bool:
        return self.kind == "sparse"


@dataclass(frozen=True)
class Recipe:
    phases: tuple[Phase, ...]

    @classmethod
    def from_config(cls, entries: Iterable[Mapping]) -> Recipe:
        """Build and check a recipe; a re-dense phase without `lr` runs at 1/10 of the preceding sparse LR."""
        phases: list[Phase] = []
        counts = dict.fromkeys(KINDS, 0)
        for where, entry in _expand_iht(entries):
            kind = entry.get("kind")
            if kind not in KINDS:
                raise ValueError(f"{where}.kind must be one of {', '.join((*KINDS, 'iht'))}, got {kind!r}")
            previous = phases[-1] if phases else None
            if kind == "dense" and previous is not None:
                raise ValueError(f"{where}: 'dense' may only be the first phase (use 'redense' after sparse)")
            if kind == "sparse" and previous is None:
                raise ValueError(f"{where}: a sparse phase needs a dense phase before it")
            if kind == "redense" and (previous is None or previous.kind != "sparse"):
                raise ValueError(f"{where}: a redense phase must follow a sparse phase")
            epochs = entry.get("epochs")
            if not is_number(epochs) or epochs < 0:
                raise ValueError(f"{where}.epochs must be a non-negative number, got {epochs!r}")
            if epochs == 0 and kind != "dense":
                raise ValueError(f"{where}.epochs: only a dense phase may have 0 epochs (a pretrained start)")
            lr = entry.get("lr")
            if lr is None and kind == "redense":
                lr = previous.lr * REDENSE_LR_FACTOR
            if lr is None and epochs == 0:  # a pretrained start trains nothing
                lr = 0.0
            elif epochs == 0:
                raise ValueError(f"{where}.lr: a dense phase of 0 epochs (a pretrained start) takes no lr")
            if not is_number(lr) or (lr <= 0 and epochs > 0):
                raise ValueError(f"{where}.lr must be a positive number, got {lr!r}")
            sparsity = entry.get("sparsity", 0.0)
            if kind == "sparse":
                if "sparsity" not in entry:
                    raise ValueError(f"{where}.sparsity is required for a sparse phase")
                try:
                    sparsity = check_sparsity(sparsity)
                except ValueError as err:
                    raise ValueError(f"{where}.sparsity: {err}") from None
            elif sparsity:
                raise ValueError(f"{where}: only sparse phases take a sparsity, got {sparsity!r} on {kind}")
            counts[kind] += 1
            name = "dense" if kind == "dense" else f"{kind}{counts[kind]}"
            phases.append(Phase(name, kind, float(epochs), float(lr), float(sparsity)))
        if not phases:
            raise ValueError("phases: the recipe is empty (it needs at least a dense phase)")
        return cls(tuple(phases))

    @classmethod
    def iht(cls, dense: Phase, sparsity: float, cycles: int, epochs: float, lr: float) -> Recipe:
        """Skinny-DNN / IHT: `cycles` sparse phases with a re-dense at the same LR between each two, ending sparse
        (a sparse net is the deliverable)."""
        iht = {"kind": "iht", "cycles": cycles, "epochs": epochs, "lr": lr, "sparsity": sparsity}
        first = {"kind": "dense", "epochs": dense.epochs}
        if dense.epochs:  # a pretrained start (0 epochs) trains nothing and takes no lr
            first["lr"] = dense.lr
        return cls.from_config([first, iht])

    def variant(self, sparsity: float) -> Recipe:
        """The same recipe with another sparsity for its first sparse phase; later phases get the suffix
        `_s<percent>` (`sparse1_s50`, `redense1_s82.5`) so a sparsity sweep shares only the dense phase.
        The name only labels the variant: the sparsity itself travels in the phase."""
        check_sparsity(sparsity)
        tag = sweep_tag(sparsity)
        first = next((i for i, p in enumerate(self.phases) if p.prunes), None)
        if first is None:
            raise ValueError("the recipe has no sparse phase to sweep")
        phases = list(self.phases[:first])
        for i, p in enumerate(self.phases[first:], start=first):
            phases.append(replace(p, name=f"{p.name}_{tag}", sparsity=sparsity if i == first else p.sparsity))
        return Recipe(tuple(phases))

    def chain(self, name: str) -> tuple[Phase, ...]:
        """The phases a phase's checkpoint depends on: itself and every phase before it."""
        return self.phases[: self.names.index(self[name].name) + 1]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.phases]

    def __getitem__(self, name: str) -> Phase:
        for phase in self.phases:
            if phase.name == name:
                return phase
        if name == CONTROL:
            raise KeyError("'control' is not one phase: see Recipe.control_phases()")
        raise KeyError(f"unknown phase {name!r}; this recipe has {', '.join(self.names)}")

    def previous(self, name: str) -> str | None:
        """The phase whose final checkpoint this phase starts from (None for the first phase)."""
        if name == CONTROL:
            return self.phases[0].name
        index = self.names.index(self[name].name)
        return self.names[index - 1] if index else None

    @property
    def final(self) -> str:
        return self.phases[-1].name

    def control_phases(self) -> tuple[Phase, ...]:
        """The equal-epoch control: every phase after the first, same epochs and LR, no pruning."""
        return tuple(replace(p, kind="dense", sparsity=0.0) for p in self.phases[1:])

    @property
    def total_epochs(self) -> float:
        return sum(p.epochs for p in self.phases)


def _expand_iht(entries: Iterable[Mapping]) -> Iterable[tuple[str, Mapping]]:
    """Each entry with where it was written; an `iht` entry becomes sparse, redense (same LR), ..., sparse."""
    for i, entry in enumerate(entries):
        where = f"phases[{i}]"
        unknown = [key for key in entry if key not in ENTRY_KEYS]
        if unknown:  # a misspelt key would be dropped silently: a re-dense `learning_rate` would run at 1/10
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(ENTRY_KEYS)})")
        if entry.get("kind") != "iht":
            if entry.get("cycles") is not None:
                raise ValueError(f"{where}.cycles: only an iht entry takes cycles")
            yield where, entry
            continue
        cycles = entry.get("cycles")
        if not isinstance(cycles, numbers.Integral) or isinstance(cycles, bool) or cycles < 1:
            raise ValueError(f"{where}.cycles must be a whole number >= 1 for an iht entry, got {cycles!r}")
        for key in ("lr", "sparsity"):
            if entry.get(key) is None:
                raise ValueError(f"{where}.{key} is required for an iht entry")
        sparse = {k: v for k, v in entry.items() if k != "cycles"} | {"kind": "sparse"}
        for c in range(cycles):
            yield f"{where} (iht cycle {c + 1})", sparse
            if c < cycles - 1:
                yield (
                    f"{where} (iht cycle {c + 1})",
                    {k: v for k, v in sparse.items() if k != "sparsity"} | {"kind": "redense"},
                )


def phase_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of a phase: a fraction of an epoch rounds up, float noise does not (0.14 x 50 is 7, not
    the 8 that ceil(7.000000000000001) would give)."""
    return math.ceil(round(epochs * steps_per_epoch, 9))


def sweep_tag(sparsity: float) -> str:
    """`s50` for 0.5, `s82.5` for 0.825: the percentage, exact to 1e-6 %."""
    return "s" + f"{round(sparsity * 100, 6):.6f}".rstrip("0").rstrip(".")


def lr_at(
    base_lr: float,
    step: int,
    total_steps: int,
    schedule: str,
    steps_per_epoch: int = 1,
    every_epochs: float = 30.0,
    power: float = 0.5,
    anneal: float = 1.2,
) -> float:
    """LR within one phase; every phase restarts from its own base LR (as the paper's phases do).

    constant; cosine to zero; step: /10 at 50% and 75% of the phase; step_epochs: /10 every `every_epochs`
    epochs (fb.resnet.torch's ImageNet schedule); poly: (1 - progress) ** power (Caffe's BVLC GoogLeNet);
    anneal_epochs: /anneal after every epoch (Amodei et al.'s Deep Speech 2: 1.2).
    """
    if schedule == "constant" or total_steps <= 1:
        return base_lr
    if schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / total_steps))
    if schedule == "step":
        return base_lr * (0.1 ** ((step >= total_steps // 2) + (step >= 3 * total_steps // 4)))
    if schedule == "step_epochs":
        return base_lr * 0.1 ** int(step / (every_epochs * steps_per_epoch))
    if schedule == "poly":
        return base_lr * (1.0 - step / total_steps) ** power
    if schedule == "anneal_epochs":
        return base_lr / anneal ** (step // steps_per_epoch)
    raise ValueError(
        f"unknown lr schedule {schedule!r} (expected constant, cosine, step, step_epochs, poly or anneal_epochs)"
    )
