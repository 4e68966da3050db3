"""Weights & Biases tracking that can never stop training: any failure becomes one warning and a no-op."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Tracker:
    """One wandb run; `settings` None (a non-zero rank) or mode `disabled` track nothing."""

    def __init__(self, settings, directory: Path, gpu: bool = False, **init):
        self.run = None
        if settings is None or settings.mode == "disabled":
            return
        try:
            import wandb

            directory.mkdir(parents=True, exist_ok=True)
            # console capture, the system-stats sampler and git probing cost seconds per short CPU job
            full = settings.wants("system", gpu)
            chosen = wandb.Settings(
                console="auto" if full else "off", x_disable_stats=not full, disable_git=not full, silent=True
            )
            self.run = wandb.init(
                settings=chosen,
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

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

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

    def table(self, key: str, rows: list[dict]) -> None:
        """Rows of dicts with the same keys (caption or transcript samples) as one wandb Table."""

        def log_table():
            import wandb

            columns = list(rows[0])
            self.run.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})

        if rows:
            self._guard(log_table)

    def artifact(self, path: Path, name: str, metadata: dict) -> None:
        def log_artifact():
            import wandb

            artifact = wandb.Artifact(name, type="model", metadata=metadata)
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

        self._guard(log_artifact)

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
