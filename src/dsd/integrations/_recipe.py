"""What both framework callbacks share: the recipe and the driver's options, kept until the framework has
built the optimizer the driver steps with."""

from __future__ import annotations

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

    def start(self, model: nn.Module, optimizer: Optimizer, steps_per_epoch: int) -> DSD:
        self.driver = DSD(model, optimizer, self.recipe, steps_per_epoch, **self.options)
        return self.driver
