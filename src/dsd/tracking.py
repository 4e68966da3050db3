"""Weights & Biases tracking that can never stop training: any failure becomes one warning and a no-op."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Tracker:
    """One wandb run; `settings` None (a non-zero rank) or mode `disabled` track nothing."""

    def __init__(self, settings, directory: Path, **init):
        self.run = None
        if settings is None or settings.mode == "disabled":
            return
        try:
            import wandb

            directory.mkdir(parents=True, exist_ok=True)
            # no console capture, system-stats sampler or git probing: seconds per run on a 2-core CPU
            quiet = wandb.Settings(console="off", x_disable_stats=True, disable_git=True, silent=True)
            self.run = wandb.init(
                settings=quiet,
                project=settings.project,
                entity=settings.entity,
                dir=str(directory),
                mode=settings.mode,
                reinit="finish_previous",
                **init,
            )
        except Exception as err:  # a tracking outage must not cost a training run
            warnings.warn(f"wandb disabled for this run: {type(err).__name__}: {err}", stacklevel=2)
            self.run = None

    def _guard(self, action, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            action(*args, **kwargs)
        except Exception as err:
            warnings.warn(f"wandb logging failed, continuing without it: {err}", stacklevel=3)
            self.run = None

    def log(self, values: dict, step: int | None = None) -> None:
        self._guard(lambda: self.run.log(values, step=step))

    def histograms(self, model: torch.nn.Module, names, step: int | None = None) -> None:
        def log_histograms():
            import wandb

            params = dict(model.named_parameters())
            self.run.log(
                {f"weights/{n}": wandb.Histogram(params[n].detach().float().cpu().numpy()) for n in names},
                step=step,
            )

        self._guard(log_histograms)

    def summary(self, values: dict) -> None:
        self._guard(lambda: self.run.summary.update(values))

    def finish(self) -> None:
        """Finish the run and stop wandb's service, which waits until the run's records are on disk: jobs end
        with os._exit (no atexit hook), and a finished run's file is otherwise written a moment later."""

        def finish_and_flush():
            import wandb

            self.run.finish()
            wandb.teardown()

        self._guard(finish_and_flush)
        self.run = None
