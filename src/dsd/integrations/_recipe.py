"""What both framework callbacks share: the recipe and the driver's options, kept until the framework has
built the optimizer the driver steps with."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

from torch import nn
from torch.optim import Optimizer

from dsd.core.driver import DSD
from dsd.core.schedule import Recipe


class RecipeCallback:
    def __init__(
        self,
        recipe: Recipe | Iterable[Mapping],
        lr_schedule: str = "constant",
        exclude: Iterable[str] = (),
        include: Iterable[str] | None = None,
    ):
        self.recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_config(recipe)
        self.options = {"lr_schedule": lr_schedule, "exclude": exclude, "include": include}
        self.driver: DSD | None = None

    def start(self, model: nn.Module, optimizer: Optimizer | list[Optimizer], steps_per_epoch: int) -> DSD:
        self.driver = DSD(model, optimizer, self.recipe, steps_per_epoch, **self.options)
        return self.driver

    def warn_if_unfinished(self) -> None:
        """Training that ends before its recipe does (too few epochs for it, a step limit) leaves the model in
        the middle of it, pruned if that is a sparse phase: said, not raised, since a run may stop on purpose
        (to resume later)."""
        driver = self.driver
        if driver is None or driver.done:
            return
        phase, steps = driver.phase, driver.lengths[driver.index]
        warnings.warn(
            f"DSD: training ended in the recipe's phase {phase.name} ({phase.kind}) after {driver.step_in_phase} of "
            f"its {steps} steps, {driver.global_step} of the recipe's {sum(driver.lengths)}"
            + ("; the model is still pruned" if driver.pruner is not None else ""),
            stacklevel=3,
        )
