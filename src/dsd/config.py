"""Pipeline configuration: schema validation and typed hyperparameters.

The Snakefile and the CLI both go through `load_config` / `Experiment.from_config`, so a bad key is reported
the same way (one line naming the key) whichever of them sees it first.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from dsd.errors import ConfigError
from dsd.schedule import Recipe


@cache
def schema() -> dict:
    return yaml.safe_load(resources.files("dsd").joinpath("schema/config.schema.yaml").read_text())


def _where(path) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "config" + "".join(parts)


def validate(config: Mapping) -> None:
    """Raise ConfigError with one line for the first schema violation (unknown keys named explicitly)."""
    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        raise ConfigError(f"{_where(error.absolute_path)}: unknown key {extra[0]!r}{hint}")
    raise ConfigError(f"{_where(error.absolute_path)}: {error.message}")


def load_config(path: str | Path, overrides: Mapping | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        set_dotted(config, key, value)
    validate(config)
    return config


def expand_dotted(config: dict) -> dict:
    """`snakemake --config data.imagenet=/data/imagenet` arrives as a top-level key with a dot: nest it."""
    for key in [k for k in config if "." in k]:
        set_dotted(config, key, config.pop(key))
    return config


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def parse_dataclass(cls, values: Mapping | None, where: str):
    """Typed hparams from a mapping; an unknown key is a ConfigError naming it and the allowed ones."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(names))})")
    return cls(**values)


@dataclass(frozen=True)
class TrainHparams:
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    amp: bool = True  # used on CUDA only
    grad_clip: float | None = None
    workers: int = 0
    max_steps_per_epoch: int | None = None  # caps an epoch (smoke tests, quick looks)
    max_bad_batches: int = 0  # non-finite losses tolerated (batch skipped) before the phase stops


@dataclass(frozen=True)
class PruneHparams:
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class WandbHparams:
    mode: str = "offline"
    project: str = "dsd"
    entity: str | None = None


@dataclass(frozen=True)
class Experiment:
    """Everything one row of the paper needs, resolved from the config; JSON round-trips for the CLI."""

    row: str
    track: str
    dataset: str
    data_dir: str  # the real data set's folder, or where the embedded one is generated
    output_dir: str = "results"
    data_root: str = "results/data"
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    train: TrainHparams = TrainHparams()
    prune: PruneHparams = PruneHparams()
    phases: tuple[dict, ...] = ()
    sweep: tuple[float, ...] = ()  # sparsities of the first sparse phase to try; the best on validation wins
    device: str = "auto"
    threads: int = 1
    wandb: WandbHparams = WandbHparams()

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_config(self.phases)

    @property
    def variants(self) -> dict[float, Recipe]:
        """Sparsity -> recipe for every swept sparsity (the recipe's own sparsity is the main chain)."""
        main = self.recipe
        first = next((p.sparsity for p in main.phases if p.prunes), None)
        return {s: main if s == first else main.variant(s) for s in self.sweep}

    @classmethod
    def from_config(cls, config: Mapping, row: str) -> Experiment:
        validate(config)
        experiments = config["experiments"]
        if row not in experiments:
            raise ConfigError(f"config.experiments: no experiment {row!r} (have: {', '.join(experiments)})")
        entry = experiments[row]
        where = f"config.experiments.{row}"
        data_root = config.get("data_root", "results/data")
        real = (config.get("data") or {}).get(entry["dataset"])
        prune = dict(entry.get("prune") or {})
        if prune.get("include") is not None:
            prune["include"] = tuple(prune["include"])
        prune["exclude"] = tuple(prune.get("exclude", ()))
        experiment = cls(
            row=row,
            track=entry["track"],
            dataset=entry["dataset"],
            data_dir=str(real) if real else str(Path(data_root) / entry["dataset"]),
            output_dir=config.get("output_dir", "results"),
            data_root=data_root,
            model=dict(entry.get("model") or {}),
            data=dict(entry.get("data") or {}),
            eval=dict(entry.get("eval") or {}),
            train=parse_dataclass(TrainHparams, entry.get("train"), f"{where}.train"),
            prune=parse_dataclass(PruneHparams, prune, f"{where}.prune"),
            phases=tuple(dict(p) for p in entry["phases"]),
            sweep=tuple(entry.get("sweep") or ()),
            device=config.get("device", "auto"),
            threads=config.get("threads", 1),
            wandb=parse_dataclass(WandbHparams, config.get("wandb"), "config.wandb"),
        )
        try:
            experiment.recipe  # noqa: B018 - validates the phase list now, not mid-pipeline
        except ValueError as err:
            raise ConfigError(f"{where}.{err}") from None
        for sparsity in experiment.sweep:
            try:
                experiment.recipe.variant(sparsity)
            except (ValueError, StopIteration) as err:
                raise ConfigError(f"{where}.sweep: {err or 'the recipe has no sparse phase'}") from None
        from dsd import tracks  # the track's own sections (model, data, eval) are typed by the track

        for section, hparams in tracks.get(experiment.track).CONFIGS.items():
            parse_dataclass(hparams, getattr(experiment, section), f"{where}.{section}")
        return experiment

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def data_only(self) -> Experiment:
        """Only what preparing the data set reads. The data rule's input: a change to one row's model or recipe
        must not regenerate data that other rows share (and so retrain them all)."""
        return dataclasses.replace(
            self, model={}, eval={}, train=TrainHparams(), prune=PruneHparams(), phases=(), sweep=(),
            wandb=WandbHparams(),
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Experiment:
        raw = json.loads(text)
        raw["train"] = TrainHparams(**raw["train"])
        prune = raw["prune"]
        raw["prune"] = PruneHparams(
            include=None if prune["include"] is None else tuple(prune["include"]),
            exclude=tuple(prune["exclude"]),
        )
        raw["wandb"] = WandbHparams(**raw["wandb"])
        raw["phases"] = tuple(raw["phases"])
        raw["sweep"] = tuple(raw.get("sweep") or ())
        return cls(**raw)


def rows(config: Mapping) -> list[str]:
    selected = config.get("rows")
    names = list(config["experiments"])
    if selected is None:
        return names
    missing = [r for r in selected if r not in names]
    if missing:
        raise ConfigError(f"config.rows: {missing[0]!r} is not an experiment (have: {', '.join(names)})")
    return list(selected)
