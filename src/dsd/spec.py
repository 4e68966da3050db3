"""What a result depends on (the spec) and how a job runs (run options).

- `RowSpec`: one row of the tables as configured: track, data set, typed model / data / eval sections,
  training hyper-parameters, pruning patterns, phases, sparsity sweep.
- `PhaseSpec`: what one phase's checkpoint depends on: the row's model, data, training and pruning, the
  phases up to and including this one, the seed, and the runs it reads (NeuralTalk's encoder). Its
  `fingerprint` names the result: Snakemake reruns a phase when it changes, and checkpoints, resume files
  and metrics carry it, so a stale file is never taken for a current one.
- `DataSpec`: what preparing a data set reads (its folder, or how it is generated).
- `RunOptions`: device, threads, workers, GPUs per job, torch.compile, the CPU instruction set, wandb, data
  verification and downloads, output folders. They never enter a fingerprint: changing them reruns nothing.

Imports no torch: `dsd check-config` and `snakemake -n` read configs without the ML stack.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

from dsd import hparams, tracks
from dsd.core.schedule import CONTROL, Phase, Recipe, sweep_tag
from dsd.errors import ConfigError
from dsd.hparams import option

ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def fingerprint(identity: Any) -> str:
    """16 hex digits of SHA-256 over canonical JSON: equal specs, equal names, on every machine."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Key paths where two identities differ, as `phases[1].sparsity: 0.3 -> 0.7`."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    return [] if old == new else [f"{path or 'spec'}: {json.dumps(old)} -> {json.dumps(new)}"]


def eval_fingerprint(spec: PhaseSpec, eval_section) -> str:
    """What an evaluation depends on: the checkpoint's spec and the row's eval settings."""
    return fingerprint({"checkpoint": spec.fingerprint, "eval": hparams.as_dict(eval_section)})


# ------------------------------------------------------------------------------------ typed sections


@dataclass(frozen=True)
class Train:
    """Training hyper-parameters of a row (every phase uses them; each phase has its own LR)."""

    MOVED: ClassVar[dict] = {
        "workers": "the top-level key 'workers' (a run option: it changes no result)",
        "eval_batch_size": "the row's eval section, as 'batch_size'",
        "amp": "'precision' (auto, bf16, fp16 or fp32)",
    }
    batch_size: int = option(64, "examples per optimizer step, all ranks together", min=1)
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = option("sgd", "optimizer of every phase")
    momentum: float = option(0.9, "SGD / RMSprop momentum", min=0)
    nesterov: bool = option(False, "Nesterov momentum (SGD)")
    weight_decay: float = option(5e-4, "L2 weight decay", min=0)
    lr_schedule: Literal["constant", "cosine", "step", "step_epochs", "poly", "anneal_epochs"] = option(
        "cosine",
        "LR within each phase, from the phase's own LR: step /10 at 50% and 75%; step_epochs /10 every "
        "lr_step_epochs epochs; poly (1 - progress) ** lr_power; anneal_epochs /lr_anneal after every epoch",
    )
    lr_step_epochs: float = option(30.0, "step_epochs: epochs between two /10 steps", gt=0)
    lr_power: float = option(0.5, "poly: the power", gt=0)
    lr_anneal: float = option(
        1.2, "anneal_epochs: the LR is divided by this after every epoch (Amodei et al.'s Deep Speech 2)",
        gt=0, added=True,
    )  # fmt: skip
    precision: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto",
        "CUDA autocast (training and evaluation): auto is bf16 where the GPU has it (Ampere and later), else fp16 "
        "with loss scaling; the CPU always trains in fp32",
    )
    grad_clip: float | None = option(None, "clip the global gradient norm to this", gt=0)
    max_steps_per_epoch: int | None = option(None, "cap an epoch at this many steps (smoke tests)", min=1)
    max_bad_batches: int = option(0, "non-finite losses skipped before the phase stops", min=0)


@dataclass(frozen=True)
class Prune:
    """Which parameters a sparse phase prunes: exact names or fnmatch patterns of `named_parameters()`."""

    include: tuple[str, ...] | None = option(None, "prune only these (default: every weight with 2+ dims)")
    exclude: tuple[str, ...] = option((), "never prune these (the first conv, the word embedding, ...)")


@dataclass(frozen=True)
class PhaseEntry:
    """One entry of a row's `phases` list."""

    kind: Literal["dense", "sparse", "redense", "iht"] = option(
        help="dense first, then sparse / redense pairs; iht: `cycles` sparse phases, re-dense at the same LR between"
    )
    epochs: float = option(
        help="epochs of this phase (fractions allowed; 0 for a dense phase that is a pretrained model)", min=0
    )
    lr: float | None = option(
        None, "LR at the start of the phase; redense without lr: 1/10 of the sparse LR", gt=0
    )
    sparsity: float | None = option(
        None, "sparse phases: fraction of each pruned tensor set to zero", min=0, lt=1
    )
    cycles: int | None = option(None, "iht only: how many sparse phases (Skinny-DNN / IHT)", min=1)


@dataclass(frozen=True)
class RowKeys:
    """An entry of `experiments:` as written; model, data and eval are typed by the row's track."""

    track: str = option(help=f"one of {', '.join(tracks.NAMES)}")
    dataset: str = option(help="the track's embedded data set or a real one (its folder under data:)")
    phases: tuple[PhaseEntry, ...] = option(
        help="dense -> sparse -> redense [-> sparse -> redense ...]", nonempty=True
    )
    model: dict = option(factory=dict, help="the track's model section")
    data: dict = option(factory=dict, help="the track's data section")
    eval: dict = option(factory=dict, help="the track's evaluation section")
    train: Train = option(factory=Train, help="training hyper-parameters")
    prune: Prune = option(factory=Prune, help="pruning patterns")
    sweep: tuple[float, ...] = option(
        (),
        "sparsities of the first sparse phase to try; the best on validation stands for DSD",
        min=0,
        lt=1,
        unique=True,
    )
    fidelity: dict[str, str] = option(
        factory=dict, help="why this row departs from the paper, by aspect (dsd fidelity); changes no result"
    )


@dataclass(frozen=True)
class Wandb:
    mode: Literal["online", "offline", "disabled"] = option(
        "offline", "offline: run folders under <output_dir>/wandb/wandb/, to `wandb sync` that folder later"
    )
    project: str = option("dsd", "wandb project")
    entity: str | None = option(None, "wandb entity (team or user)")
    system: Literal["auto", "on", "off"] = option(
        "auto", "system metrics, git state and console capture (auto: on for GPU jobs; seconds per CPU job)"
    )
    evaluations: Literal["auto", "on", "off"] = option(
        "auto", "each evaluation as a run: metrics and caption/transcript samples as a Table (auto: GPU jobs)"
    )
    checkpoints: bool = option(False, "upload each phase's final model.pt as a wandb artifact")

    def wants(self, setting: str, gpu: bool) -> bool:
        value = getattr(self, setting)
        return self.mode != "disabled" and (value == "on" or (value == "auto" and gpu))


@dataclass(frozen=True)
class RunOptions:
    """Where and how jobs run. Never part of a fingerprint: changing one reruns nothing."""

    output_dir: str = option("results", "runs, tables, plots, logs and the report go below this")
    data_root: str = option("results/data", "generated data sets, prepared markers and caches")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: cuda when available")
    threads: int = option(
        1,
        "CPU threads per job (auto: this node's cores / (its visible GPUs / gpus_per_job); in a SLURM job, its "
        "own CPUs)",
        min=1,
    )
    workers: int = option(0, "DataLoader worker processes per GPU process (auto: its cores less one)", min=0)
    gpus_per_job: int = option(1, "GPUs per training job; more than one trains as that many DDP ranks", min=1)
    auto_cpus: tuple[Literal["threads", "workers"], ...] = option(
        (),
        "set by dsd: which of threads / workers the config gave as auto; a SLURM job works those out again from "
        "its own CPUs and GPUs (Snakemake planned them on the login node)",
        unique=True,
    )
    compile: bool = option(
        False,
        "torch.compile the training forward/backward (masks are still applied after every step; speech's "
        "packed recurrent layers and captioning's LSTM run eagerly inside the compiled model)",
    )
    compile_mode: Literal["default", "reduce-overhead"] = option(
        "default",
        "torch.compile's mode when compile is on; reduce-overhead replays each step as CUDA graphs (GPU jobs: "
        "for models whose many small kernels keep the GPU waiting on the host's launches; rows whose batch "
        "shapes change every step, speech and captioning, compile in the default mode instead)",
    )
    wandb: Wandb = option(factory=Wandb, help="Weights & Biases tracking")
    cpu_isa: Literal["native", "avx2"] = option(
        "native",
        "CPU runs: limit torch's kernels (ATen, oneDNN, MKL) to this instruction set (avx2: an AVX-512 machine "
        "then does not sum in its own order; other CPUs may still differ in the last bits)",
    )
    verify_data: bool = option(
        False, "preparing a real data set decodes every image (in parallel) and lists every bad file"
    )
    download: bool = option(
        False,
        "pretrained weights by name (model.weights: IMAGENET1K_V1): download those the torch cache lacks",
    )

    def to_json(self) -> str:
        return json.dumps(hparams.as_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunOptions:
        return hparams.parse(cls, json.loads(text), "options")


# ------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Experiment:
    """A row as a job sees it: typed sections plus the run options and where its data live."""

    row: str
    track: str
    dataset: str
    data_path: str | None  # a real data set's folder; None: generated under data_root
    model: Any
    data: Any
    eval: Any
    train: Train = Train()
    prune: Prune = Prune()
    options: RunOptions = RunOptions()
    upstream: Mapping[str, str] = field(default_factory=dict)  # what it reads from other runs, by fingerprint

    @property
    def generated(self) -> bool:
        return tracks.get(self.track).config.DATASETS.get(self.dataset) == "generated"

    @property
    def data_dir(self) -> str:
        return self.data_path or str(Path(self.options.data_root) / self.dataset)

    @property
    def cache_dir(self) -> Path:
        """Derived files (features, lexicon): beside generated data, never inside a user's data folder."""
        if self.generated:
            return Path(self.data_dir)
        return Path(self.options.data_root) / "cache" / self.dataset

    @property
    def device(self) -> str:
        return self.options.device

    def data_spec(self) -> DataSpec:
        keys = tracks.get(self.track).config.SOURCE_KEYS
        source = {k: v for k, v in hparams.as_dict(self.data).items() if k in keys}
        return DataSpec(self.track, self.dataset, self.data_path, source)


@dataclass(frozen=True)
class DataSpec:
    """What preparing a data set reads: its folder or generator settings (the track's SOURCE_KEYS)."""

    track: str
    dataset: str
    data_path: str | None
    source: dict

    @property
    def fingerprint(self) -> str:
        return fingerprint(hparams.as_dict(self))

    def to_json(self) -> str:
        return json.dumps(hparams.as_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DataSpec:
        return cls(**json.loads(text))

    def experiment(self, options: RunOptions = RunOptions()) -> Experiment:
        """What preparing needs: the source settings, every other setting at its default."""
        sections = tracks.get(self.track).config
        data = hparams.parse(sections.Data, self.source, f"data spec of {self.dataset}")
        return Experiment(
            self.dataset,
            self.track,
            self.dataset,
            self.data_path,
            sections.Model(),
            data,
            sections.Eval(),
            options=options,
        )


@dataclass(frozen=True)
class PhaseSpec:
    """What one phase's checkpoint depends on; `row` names it but is not part of its identity."""

    row: str
    track: str
    dataset: str
    data_path: str | None
    model: Any
    data: Any
    train: Train
    prune: Prune | None  # None while no phase of the chain prunes
    phases: tuple[Phase, ...]  # the chain: phases up to this one (the control: dense, then its own phases)
    phase: str
    seed: int
    upstream: Mapping[str, str] = field(default_factory=dict)

    def identity(self) -> dict:
        out = hparams.as_dict(self)
        del out["row"]
        return out

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.identity())

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.phases)

    def previous(self) -> PhaseSpec | None:
        """The spec of the checkpoint this phase starts from (`--init`); None for the dense phase."""
        if self.phase == CONTROL:
            chain = self.phases[:1]
        elif len(self.phases) > 1:
            chain = self.phases[:-1]
        else:
            return None
        prunes = any(p.prunes for p in chain)
        return replace(self, phases=chain, phase=chain[-1].name, prune=self.prune if prunes else None)

    def experiment(self, options: RunOptions = RunOptions(), eval_section=None) -> Experiment:
        config = tracks.get(self.track).config
        return Experiment(
            self.row, self.track, self.dataset, self.data_path, self.model, self.data,
            eval_section if eval_section is not None else config.Eval(), self.train,
            self.prune or Prune(), options, dict(self.upstream),
        )  # fmt: skip

    def to_json(self) -> str:
        return json.dumps({"row": self.row, **self.identity()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PhaseSpec:
        raw = json.loads(text)
        sections = tracks.get(raw["track"]).config
        where = f"spec of {raw.get('row')}"
        return cls(
            row=raw["row"],
            track=raw["track"],
            dataset=raw["dataset"],
            data_path=raw["data_path"],
            model=hparams.parse(sections.Model, raw["model"], f"{where}.model"),
            data=hparams.parse(sections.Data, raw["data"], f"{where}.data"),
            train=hparams.parse(Train, raw["train"], f"{where}.train"),
            prune=None if raw["prune"] is None else hparams.parse(Prune, raw["prune"], f"{where}.prune"),
            phases=tuple(hparams.parse(Phase, p, f"{where}.phases") for p in raw["phases"]),
            phase=raw["phase"],
            seed=int(raw["seed"]),
            upstream=dict(raw.get("upstream") or {}),
        )


@dataclass(frozen=True)
class RowSpec:
    """One row of the tables as configured, every section typed."""

    name: str
    track: str
    dataset: str
    data_path: str | None
    model: Any
    data: Any
    eval: Any
    train: Train
    prune: Prune
    phases: tuple[PhaseEntry, ...]
    sweep: tuple[float, ...] = ()
    fidelity: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def recipe(self) -> Recipe:
        return Recipe.from_config(
            {k: v for k, v in hparams.as_dict(entry).items() if v is not None} for entry in self.phases
        )

    @cached_property
    def variants(self) -> dict[float, Recipe]:
        """Sparsity -> recipe for every swept sparsity (the recipe's own sparsity is its main chain)."""
        first = next((p.sparsity for p in self.recipe.phases if p.prunes), None)
        return {s: self.recipe if s == first else self.recipe.variant(s) for s in self.sweep}

    def recipe_of(self, phase: str) -> Recipe:
        """The recipe (main or a sweep variant) that has a phase of this name."""
        for recipe in (self.recipe, *self.variants.values()):
            if phase in recipe.names:
                return recipe
        if phase == CONTROL:
            return self.recipe
        raise ConfigError(f"row {self.name} has no phase {phase!r} (it has: {', '.join(self.phase_names)})")

    @property
    def phase_names(self) -> list[str]:
        """Every phase the row trains: its recipe, the control, and each sweep variant's own phases."""
        control = [CONTROL] if len(self.recipe.phases) > 1 else []  # a dense-only row has nothing to control
        names = [*self.recipe.names, *control]
        for recipe in self.variants.values():
            names += [name for name in recipe.names if name not in names]
        return names

    def experiment(self, options: RunOptions = RunOptions(), upstream: Mapping | None = None) -> Experiment:
        return Experiment(
            self.name, self.track, self.dataset, self.data_path, self.model, self.data, self.eval,
            self.train, self.prune, options, dict(upstream or {}),
        )  # fmt: skip

    def data_spec(self) -> DataSpec:
        return self.experiment().data_spec()

    def to_json(self) -> str:
        return json.dumps(hparams.as_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RowSpec:
        raw = json.loads(text)
        return parse_row(
            raw["name"], {k: v for k, v in raw.items() if k not in ("name", "data_path")}, raw["data_path"]
        )


def parse_row(name: str, raw: Mapping, data_path: str | None, where: str | None = None) -> RowSpec:
    where = where or f"config.experiments.{name}"
    keys = hparams.parse(RowKeys, raw, where)
    if keys.track not in tracks.NAMES:
        raise ConfigError(f"{where}.track: expected one of {', '.join(tracks.NAMES)}, got {keys.track!r}")
    sections = tracks.get(keys.track).config
    if keys.dataset not in sections.DATASETS:
        known = ", ".join(sections.DATASETS)
        raise ConfigError(
            f"{where}.dataset: {keys.dataset!r} is not a {keys.track} data set (known: {known})"
        )
    row = RowSpec(
        name=name,
        track=keys.track,
        dataset=keys.dataset,
        data_path=data_path,
        model=hparams.parse(sections.Model, keys.model, f"{where}.model"),
        data=hparams.parse(sections.Data, keys.data, f"{where}.data"),
        eval=hparams.parse(sections.Eval, keys.eval, f"{where}.eval"),
        train=keys.train,
        prune=keys.prune,
        phases=keys.phases,
        sweep=keys.sweep,
        fidelity=keys.fidelity,
    )
    try:
        row.recipe  # noqa: B018 - checks the phase list now, not mid-pipeline
    except ValueError as err:
        raise ConfigError(f"{where}.{err}") from None
    for i, sparsity in enumerate(row.sweep):
        try:
            row.recipe.variant(sparsity)
        except ValueError as err:
            raise ConfigError(f"{where}.sweep[{i}]: {err}") from None
    if row.phases[0].epochs == 0 and not getattr(row.model, "weights", None):
        raise ConfigError(f"{where}.phases[0].epochs: 0 means a pretrained start, which needs model.weights")
    tags = [sweep_tag(s) for s in row.sweep]
    if len(set(tags)) != len(tags):
        raise ConfigError(f"{where}.sweep: two sparsities share the name {tags[0]!r} (closer than 1e-6 %)")
    sections.check(row, where)
    return row
