"""Reading a config file into a checked `Config`: YAML as people write it, overrides, and checks in depth.

`load_config(files, overrides, sets)` reads YAML files (later ones win), Snakemake's `--config` values and
`--set KEY=VALUE` pairs, then checks every key (type, range, choices), the rows against each other (shared data
sets, NeuralTalk's encoder row) and every prune pattern against its model's parameter names. A problem is one
`ConfigError` naming the key path. Imports no torch.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dsd import hparams, tracks
from dsd.core.schedule import CONTROL
from dsd.errors import ConfigError
from dsd.hparams import option
from dsd.spec import (
    ROW_NAME,
    Experiment,
    PhaseSpec,
    RowSpec,
    RunOptions,
    differences,
    fingerprint,
    parse_row,
)


@dataclass(frozen=True)
class ConfigKeys(RunOptions):
    """The top level of a config file (keys starting with `_` are ignored: YAML anchors live there)."""

    experiments: dict = option(factory=dict, help="rows by name", nonempty=True)
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds of every row", min=0, nonempty=True, unique=True)
    rows: tuple[str, ...] | None = option(
        None, "rows of the tables (default: every experiment)", nonempty=True, unique=True
    )
    data: dict[str, str | None] = option(factory=dict, help="folders of real data sets, by data set name")


@dataclass(frozen=True)
class Config:
    """A whole config file, checked: the rows of the tables, seeds, run options and every row's spec."""

    rows: tuple[str, ...]
    seeds: tuple[int, ...]
    options: RunOptions
    experiments: Mapping[str, RowSpec]
    # the options of a job that runs one process (an evaluation): `workers: auto` gives it its job's cores less
    # one, where a training job's DDP ranks share them
    one_process_options: RunOptions

    def row(self, name: str) -> RowSpec:
        if name not in self.experiments:
            raise ConfigError(
                f"config.experiments: no experiment {name!r} (have: {', '.join(self.experiments)})"
            )
        return self.experiments[name]

    def upstream(self, name: str) -> dict[str, str]:
        """Fingerprints of the runs a row reads (NeuralTalk's encoder: a vision row's dense phase)."""
        row = self.row(name)
        out = {}
        for key, source in tracks.get(row.track).config.upstream(row).items():
            if isinstance(source, str):
                out[key] = source
            else:
                out[key] = self.phase(*source).fingerprint
        return out

    def phase(self, name: str, seed: int, phase: str) -> PhaseSpec:
        row = self.row(name)
        recipe = row.recipe_of(phase)
        # the control trains the later phases' epochs and LRs unpruned: their sparsities are not its inputs
        chain = (recipe.phases[0], *recipe.control_phases()) if phase == CONTROL else recipe.chain(phase)
        prunes = phase != CONTROL and any(p.prunes for p in chain)
        return PhaseSpec(
            row=name, track=row.track, dataset=row.dataset, data_path=row.data_path, model=row.model,
            data=row.data, train=row.train, prune=row.prune if prunes else None, phases=chain, phase=phase,
            seed=seed, upstream=self.upstream(name),
        )  # fmt: skip

    def experiment(self, name: str) -> Experiment:
        return self.row(name).experiment(self.options, self.upstream(name))


def _merge(base: dict, update: Mapping) -> dict:
    """Snakemake's config merge: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _typed(value):
    """Snakemake passes nested --config values as strings: read each as YAML would (`8` an int)."""
    if isinstance(value, Mapping):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_typed(v) for v in value]
    if isinstance(value, str):
        try:
            return hparams.yaml_value(value)
        except ConfigError:
            return value
    return value


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    """`experiments.resnet18.phases.0.lr = 0.5` (a number indexes a list)."""
    keys = dotted.split(".")
    node, where = config, "config"
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1  # by position: `is` took the first `a` of `a.b.a` for the last
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{where}: no item {key!r} (the list has {len(node)})")
            index = int(key)
            if last:
                node[index] = value
                return
            node, where = node[index], f"{where}[{index}]"
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: is not a mapping, cannot set {dotted!r}")
        if last:
            node[key] = value
            return
        node = node.setdefault(key, {})
        where = f"{where}.{key}"


def parse_sets(pairs: Iterable[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        out.append((key, hparams.yaml_value(value, f"--set {key}")))
    return out


def _resolve_auto_cpus(raw: Mapping, processes: int | None = None) -> Mapping:
    """`threads: auto` / `workers: auto` become numbers for the node Snakemake plans on (dsd.gpus.cpus_per_job),
    for a job of `processes` processes (default: a training job's, one per GPU)."""
    if "auto" not in (raw.get("threads"), raw.get("workers")):
        return raw
    from dsd.gpus import cpus_per_job

    per_job = raw.get("gpus_per_job", 1)
    per_job = per_job if isinstance(per_job, int) and per_job > 0 else 1
    threads, workers = cpus_per_job(per_job, processes=processes)
    resolved = dict(raw)
    for key, value in (("threads", threads), ("workers", workers)):
        if resolved.get(key) == "auto":
            resolved[key] = value
    return resolved


def in_this_job(options: RunOptions, one_process: bool = False) -> RunOptions:
    """Inside a SLURM job, `auto` threads / workers from the job's own CPUs: Snakemake resolved them on the login
    node, where no GPU gives 1 thread and no workers, whatever the job is allocated. The allocation is the job's
    alone (no other job shares its cores, GPU job or not): its ranks, or its one process, share all of it."""
    if not options.auto_cpus or "SLURM_JOB_ID" not in os.environ:
        return options
    from dsd.gpus import cpus_per_job

    per_job = options.gpus_per_job
    threads, workers = cpus_per_job(per_job, gpus=per_job, processes=1 if one_process else None)
    resolved = {"threads": threads, "workers": workers}
    return replace(options, **{key: resolved[key] for key in options.auto_cpus})


def load_config(
    files: str | Path | Iterable[str | Path],
    overrides: Mapping | None = None,
    sets: Iterable[str] = (),
    check_models: bool = True,
) -> Config:
    """Read config files (later ones win), then Snakemake's --config `overrides`, then `--set` pairs."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    raw: dict = {}
    for path in files:
        loaded = hparams.load_yaml(path)
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        raw = _merge(raw, loaded)
    raw = _merge(raw, _typed(overrides or {}))
    for key, value in parse_sets(sets):
        set_dotted(raw, key, value)
    return parse_config(raw, check_models=check_models)


def parse_config(raw: Mapping, check_models: bool = True) -> Config:
    auto_workers = raw.get("workers") == "auto"
    one_process_workers = _resolve_auto_cpus(raw, processes=1).get("workers")
    auto = tuple(key for key in ("threads", "workers") if raw.get(key) == "auto")
    raw = _resolve_auto_cpus(raw) | ({"auto_cpus": auto} if auto else {})
    top = hparams.parse(ConfigKeys, {k: v for k, v in raw.items() if not str(k).startswith("_")}, "config")
    options = RunOptions(**{f.name: _expand_home(f.name, getattr(top, f.name)) for f in fields(RunOptions)})
    experiments = {}
    for name, entry in top.experiments.items():
        # `2019:` is a number to YAML: run folders and Snakemake's wildcards want text
        if not isinstance(name, str):
            raise ConfigError(
                f"config.experiments.{name}: a row name is text, YAML read this one as {type(name).__name__} "
                f"(quote it: '{name}')"
            )
        if not ROW_NAME.fullmatch(name):
            raise ConfigError(f"config.experiments.{name}: a row name is letters, digits, '-' and '_'")
        dataset = entry.get("dataset") if isinstance(entry, Mapping) else None
        path = top.data.get(dataset) if isinstance(dataset, str) else None
        experiments[name] = parse_row(
            name, entry, os.path.abspath(os.path.expanduser(path)) if path else None
        )
    rows = top.rows if top.rows is not None else tuple(experiments)
    for i, name in enumerate(rows):
        if name not in experiments:
            raise ConfigError(
                f"config.rows[{i}]: {name!r} is not an experiment (have: {', '.join(experiments)})"
            )
    one_process = replace(options, workers=one_process_workers) if auto_workers else options
    config = Config(rows, top.seeds, options, experiments, one_process)
    _check_shared_data(config)
    for name, row in experiments.items():
        tracks.get(row.track).config.check_config(row, config, f"config.experiments.{name}")
    if check_models:
        check_patterns(config)
    return config


def table_warnings(config: Config) -> list[str]:
    """A row of the tables whose recipe is the dense phase alone trains (`dsd run`, Snakemake's targets for its
    runs), but has no DSD phase and no equal-epoch control, so `dsd table` refuses it: said before training."""
    return [
        f"config.experiments.{name}.phases: one phase ({config.row(name).recipe.final}), so no DSD phase and no "
        f"equal-epoch control: it trains, but `dsd table` (Snakemake's default target) refuses it as a row of the "
        f"tables (leave it out of `rows:`, which defaults to every experiment)"
        for name in config.rows
        if len(config.row(name).recipe.phases) < 2
    ]


def _expand_home(key: str, value):
    """`~/runs` as the shell reads it: the folder options and data paths are written as on a command line (kept
    as written, `~` became a folder of that name under the working directory)."""
    return (
        os.path.expanduser(value) if key in ("output_dir", "data_root") and isinstance(value, str) else value
    )


def _check_shared_data(config: Config) -> None:
    """Rows that share a data set must read the same one: it lives in one folder, prepared once."""
    first: dict[str, RowSpec] = {}
    for name, row in config.experiments.items():
        other = first.setdefault(row.dataset, row)
        if other is row or other.data_spec() == row.data_spec():
            continue
        if other.track != row.track:
            raise ConfigError(
                f"config.experiments.{name}.dataset: {row.dataset!r} is a {other.track} data set"
            )
        diff = differences(other.data_spec().source, row.data_spec().source)[0]
        raise ConfigError(
            f"config.experiments.{name}.data: shares data set {row.dataset!r} with {other.name} but generates or "
            f"reads it differently ({diff})"
        )


def check_patterns(config: Config) -> None:
    """Every include / exclude pattern must match a parameter of its model (a typo would prune a layer)."""
    from dsd.core.patterns import ALIASES, unmatched

    for name, row in config.experiments.items():
        if row.prune.include is not None and not list(row.prune.include):
            raise ConfigError(
                f"config.experiments.{name}.prune.include: an empty list prunes nothing (leave it out to prune "
                "every weight of 2+ dimensions)"
            )
    names = tracks.parameter_names([(row.track, row.model) for row in config.experiments.values()])
    for name, row in config.experiments.items():
        described = names.get((row.track, fingerprint(hparams.as_dict(row.model))))
        if described is None:
            continue
        if "error" in described:
            raise ConfigError(f"config.experiments.{name}.model: {described['error']}")
        known, alias = described["names"], described["aliases"]
        for key in ("exclude", "include"):
            patterns = [alias.get(p, p) for p in getattr(row.prune, key) or ()]
            typos = unmatched(known, patterns)
            if typos:
                index = patterns.index(typos[0])
                given = getattr(row.prune, key)[index]
                close = difflib.get_close_matches(given, known, n=1) or known[:1]
                why = (
                    "the model has no convolution"
                    if given in ALIASES
                    else "matches no parameter of the model"
                )
                raise ConfigError(
                    f"config.experiments.{name}.prune.{key}[{index}]: {given!r} {why} (closest: {close[0]!r})"
                )
