# DSD pipeline: prepare data -> dense -> sparse -> re-dense (-> sparse -> re-dense) -> tables, plus the
# equal-epoch dense control, for every row and seed of the config. The rules only call `python -m dsd`.
#   snakemake --cores all                                    # embedded default (configs/default.yaml)
#   snakemake --cores all --configfile configs/paper.yaml --resources gpu=8 --config 'data={imagenet: /data/imagenet}'
import os

from dsd import config as dsd_config
from dsd import paths

# The embedded default only when no --configfile is given: a paper run must not inherit its keys.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "configs", "default.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        tables=rules.tables.output,
        plots=rules.plots.output,
