# The config, read and checked in depth before any job is planned (one line `dsd: error: ...` naming the key),
# and the small lookups the rules share. Reading it imports no torch.
import json
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from dsd import gpus as dsd_gpus
from dsd import hparams, paths
from dsd import config as dsd_config
from dsd import spec as dsd_spec
from dsd import tracks

# --configfile as given, else the embedded default; --config values on top (read as YAML would read them)
CONFIG_FILES = [str(f) for f in workflow.overwrite_configfiles] or [os.path.join(workflow.basedir, "configs", "default.yaml")]
try:
    CONFIG = dsd_config.load_config(CONFIG_FILES, overrides=dict(workflow.config_settings.config))
except dsd_config.ConfigError as err:
    sys.exit(f"dsd: error: {err}")
for _warning in dsd_config.table_warnings(CONFIG):  # before any training: the tables rule would refuse it
    print(f"dsd: warning: {_warning}", file=sys.stderr)

OPTIONS = CONFIG.options
OUT, DATA_ROOT = OPTIONS.output_dir, OPTIONS.data_root
ROWS, SEEDS = CONFIG.rows, CONFIG.seeds  # the rows of the tables; CONFIG.experiments also has rows they read
RUN = shlex.quote(OPTIONS.to_json())  # run options: in the commands, never a rerun trigger
# those of an evaluation job, one process: `workers: auto` is its cores less one, not a training rank's share
RUN_ONE_PROCESS = shlex.quote(CONFIG.one_process_options.to_json())
os.environ.update(dsd_gpus.cpu_isa_env(OPTIONS.cpu_isa, OPTIONS.device))  # before any job imports torch
PYTHON = sys.executable
# Distinct GPUs per concurrent job (Snakemake only counts them); a stdlib-only script, so no torch import.
GPUS = f"{PYTHON} {shlex.quote(dsd_gpus.__file__)}"


def phase_spec(row, seed, phase):
    """What the phase's checkpoint depends on, as JSON: the training and evaluation rules' rerun trigger."""
    return CONFIG.phase(row, int(seed), phase).to_json()


def run_dir(row, seed, phase):
    return str(paths.run_dir(OUT, row, seed, phase))


def evaluation_of(row, seed, phase):
    return str(paths.evaluation(paths.run_dir(OUT, row, seed, phase)))


def metrics_of(row, seed, phase):
    return str(paths.metrics(paths.run_dir(OUT, row, seed, phase)))


def all_results():
    runs = [(row, seed, phase) for row in ROWS for seed in SEEDS for phase in CONFIG.row(row).phase_names]
    return [f(*run) for run in runs for f in (metrics_of, evaluation_of)]


def features_file(row):
    """Captioning: the image features the row trains on (None for other tracks)."""
    if CONFIG.row(row).track != "captioning":
        return None
    return str(tracks.get("captioning").config.features_path(CONFIG.experiment(row)))


def data_inputs(row):
    """What a row's jobs read besides checkpoints: its prepared data set (and image features)."""
    inputs = [str(paths.prepared(DATA_ROOT, CONFIG.row(row).dataset))]
    return inputs + ([features_file(row)] if features_file(row) else [])


def weights_input(w):
    """The local pretrained-weights file a vision row's dense phase starts from: its content is in no spec, so
    a newer file reruns the phase (and, through its checkpoint, everything after it)."""
    row = CONFIG.row(w.row)
    weights = tracks.get("vision").config.weights_file(row.model) if row.track == "vision" else None
    return existing(weights) if w.phase == "dense" else []


def eval_files(w):
    """A speech row's lexicon and language model (relative: inside the data folder): their content is in no
    eval setting, so a newer file reruns the row's evaluations."""
    exp = CONFIG.experiment(w.row)
    return [f for path in tracks.get(exp.track).config.eval_inputs(exp) for f in existing(path)]


def existing(path):
    """[path] where that file exists; a missing one is the job's own error to report (it names the key)."""
    return [path] if path and os.path.isfile(path) else []


def previous_checkpoint(wildcards):
    """Input of a phase: the previous phase's final checkpoint (nothing for dense)."""
    previous = CONFIG.phase(wildcards.row, int(wildcards.seed), wildcards.phase).previous()
    if previous is None:
        return []
    return str(paths.checkpoint(paths.run_dir(OUT, wildcards.row, wildcards.seed, previous.phase)))


def rerun_if_stale(output, key, current):
    """An input that reruns the job writing `output` when that file exists but records another identity (its
    `key`) than the config's. Snakemake reruns such jobs itself from its records of their params, but it has
    none for outputs that `dsd run` wrote, that were copied from another folder, or whose .snakemake/ is gone."""
    if os.path.exists(output) and paths.recorded(output, key) != current:
        return [str(paths.stale_flag(OUT, output))]
    return []


def phase_is_stale(w):
    spec = CONFIG.phase(w.row, int(w.seed), w.phase)
    return rerun_if_stale(metrics_of(w.row, w.seed, w.phase), "fingerprint", spec.fingerprint)


def evaluation_is_stale(w):
    spec = CONFIG.phase(w.row, int(w.seed), w.phase)
    current = dsd_spec.eval_fingerprint(spec, CONFIG.row(w.row).eval)
    return rerun_if_stale(evaluation_of(w.row, w.seed, w.phase), "eval_fingerprint", current)


def stale_flags():
    """Every flag the rules' `stale` inputs ask for, as inputs of the default target: Snakemake makes a missing
    file only for a job that must run anyway, or for a target; made, the flag reruns the job it is input to."""
    runs = [(row, seed, phase) for row in ROWS for seed in SEEDS for phase in CONFIG.row(row).phase_names]
    flags = [f for dataset in DATASET_ROW for f in data_is_stale(SimpleNamespace(dataset=dataset))]
    for row, seed, phase in runs:
        w = SimpleNamespace(row=row, seed=seed, phase=phase)
        flags += phase_is_stale(w) + evaluation_is_stale(w)
    for row, seed, phase in upstream_runs(runs):  # trained for the tables' rows, not evaluated
        flags += phase_is_stale(SimpleNamespace(row=row, seed=seed, phase=phase))
    return flags


def upstream_runs(runs):
    """The runs the tables' rows read (NeuralTalk's encoder) that are not among their own `runs`."""
    out = []
    for name in ROWS:
        row = CONFIG.row(name)
        for source in tracks.get(row.track).config.upstream(row).values():
            if not isinstance(source, str) and source not in runs and source not in out:
                out.append(source)
    return out


rule stale_output:  # not temp(): Snakemake would skip making a temp input whose consumer's output exists
    output:
        str(Path(OUT) / "stale" / "{path}"),
    localrule: True
    shell:
        "touch {output:q}"


wildcard_constraints:
    row="|".join(CONFIG.experiments),
    seed=r"\d+",
    phase=r"dense|control|(sparse|redense)\d+(_s[0-9.]+)?",
