# Config checks and the small lookups the rules share. Everything else lives in the dsd package.
import shlex
import sys

from dsd import gpus as dsd_gpus
from dsd.tracks import captioning

dsd_config.expand_dotted(config)
try:
    for _row in dsd_config.rows(config):
        dsd_config.Experiment.from_config(config, _row)
except dsd_config.ConfigError as err:
    sys.exit(f"dsd: error: {err}")

ROWS = dsd_config.rows(config)  # the rows of the tables; EXPERIMENTS also has rows they depend on
SEEDS = config.get("seeds", [0, 1, 2])
OUT = config.get("output_dir", "results")
DATA_ROOT = config.get("data_root", "results/data")
EXPERIMENTS = {row: dsd_config.Experiment.from_config(config, row) for row in config["experiments"]}
PYTHON = sys.executable
# Distinct GPUs per concurrent job (Snakemake only counts them); a stdlib-only script, so no torch import.
GPUS = f"{PYTHON} {shlex.quote(dsd_gpus.__file__)}"


def spec(row):
    """The experiment as JSON: the rules' only way to pass configuration, and a rerun trigger."""
    return EXPERIMENTS[row].to_json()


def phases(row):
    """Every phase a row trains: its recipe, the control, and the phases of each sparsity-sweep variant."""
    names = [*EXPERIMENTS[row].recipe.names, "control"]
    for recipe in EXPERIMENTS[row].variants.values():
        names += [name for name in recipe.names if name not in names]
    return names


def run_dir(row, seed, phase):
    return str(paths.run_dir(OUT, row, seed, phase))


def metrics_of(row, seed, phase):
    return str(paths.metrics(paths.run_dir(OUT, row, seed, phase)))


def all_metrics():
    return [metrics_of(row, seed, phase) for row in ROWS for seed in SEEDS for phase in phases(row)]


def data_inputs(row):
    """What a row's training needs besides the previous checkpoint: its prepared data (and image features)."""
    inputs = [str(paths.prepared(DATA_ROOT, EXPERIMENTS[row].dataset))]
    if EXPERIMENTS[row].track == "captioning" and captioning.encoder_source(EXPERIMENTS[row]):
        inputs.append(str(captioning.features_path(EXPERIMENTS[row])))
    return inputs


def previous_checkpoint(wildcards):
    """Input of a phase: the previous phase's final checkpoint (nothing for dense)."""
    previous = EXPERIMENTS[wildcards.row].recipe.previous(wildcards.phase)
    if previous is None:
        return []
    return str(paths.checkpoint(paths.run_dir(OUT, wildcards.row, wildcards.seed, previous)))


wildcard_constraints:
    row="|".join(EXPERIMENTS),
    seed=r"\d+",
    phase=r"dense|control|(sparse|redense)\d+(_s\d+)?",
