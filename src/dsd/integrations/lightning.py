"""DSD for Lightning: a `Callback` that follows a recipe.

    trainer = L.Trainer(max_epochs=18, callbacks=[DSDCallback([
        {"kind": "dense", "epochs": 10, "lr": 0.1},
        {"kind": "sparse", "epochs": 4, "lr": 0.01, "sparsity": 0.3},
        {"kind": "redense", "epochs": 4},
    ], exclude=["conv1.weight"])])

The callback owns the learning rate (a scheduler configured with the optimizer is overridden before every
step, ReduceLROnPlateau's too), stops the trainer when the recipe is done, saves its step count and masks in
Lightning's checkpoints (`ckpt_path=` resumes them) and logs `dsd/lr`, `dsd/sparsity` (measured) and
`dsd/phase` (the phase's index in the recipe) of the step about to be taken, every `log_every_n_steps`.

A module with several optimizers (manual optimization: `self.automatic_optimization = False`) has every
optimizer's LR set and state masked; its recipe counts training batches (Lightning's `global_step` counts each
optimizer's steps), and the masks are re-applied after every batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback

from dsd.core.schedule import Recipe
from dsd.integrations._recipe import RecipeCallback


class DSDCallback(RecipeCallback, Callback):
    def __init__(
        self,
        recipe: Recipe | Iterable[Mapping],
        lr_schedule: str = "constant",
        exclude: Iterable[str] = (),
        include: Iterable[str] | None = None,
        log: bool = True,
    ):
        super().__init__(recipe, lr_schedule, exclude, include)
        self.log = log
        self._restored: Mapping | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise ValueError("DSDCallback needs an optimizer; the module configured none")
        if math.isinf(trainer.num_training_batches):  # a loader without a length (an IterableDataset)
            raise ValueError(
                "DSDCallback: the recipe counts epochs, but the train dataloader has no length; "
                "set the Trainer's limit_train_batches to a whole number of batches per epoch"
            )
        self._per_batch = len(optimizers) > 1
        if self._per_batch:
            self.start(pl_module, optimizers, trainer.num_training_batches)
        else:
            steps = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
            self.start(pl_module, optimizers[0], steps)
        if self._restored is not None:  # this fit's checkpoint: a later fit without one starts afresh
            self.driver.load_state_dict(self._restored)
            self._restored = None
        # a finished run resumed (a requeued job): a batch more would train it without the recipe
        if self.driver.done:
            trainer.should_stop = True
        self._done_steps = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        driver, every = self.driver, trainer.log_every_n_steps
        # again: a ReduceLROnPlateau scheduler steps after on_train_batch_end's LR (at the epoch's end)
        driver._set_lr()
        if self.log and not driver.done and driver.global_step % every == 0:  # the step about to be taken
            pl_module.log_dict(
                {"dsd/lr": driver.lr, "dsd/sparsity": driver.sparsity(), "dsd/phase": float(driver.index)},
                on_step=True, on_epoch=False,
            )  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._per_batch:
            self.driver.step()
        else:
            while self._done_steps < trainer.global_step:  # once per optimizer step, also with accumulation
                self.driver.step()
                self._done_steps += 1
        if self.driver.done:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.warn_if_unfinished()

    def state_dict(self) -> dict:
        return self.driver.state_dict() if self.driver is not None else {}

    def load_state_dict(self, state_dict: Mapping) -> None:
        # Lightning restores callbacks before the optimizers exist: the driver is built at train start
        self._restored = state_dict or None
