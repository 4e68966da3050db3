# DSD pipeline: prepare data -> dense -> sparse -> re-dense (-> sparse -> re-dense) -> evaluation -> tables,
# plus the equal-epoch dense control, for every row and seed of the config. The rules only call `python -m dsd`.
#   snakemake --cores all                                    # embedded default (configs/default.yaml)
#   snakemake --cores all --configfile configs/paper.yaml --resources gpu=8 --config 'data={imagenet: /data/imagenet}'
# A job reruns when what its result depends on changes (its spec), never for a run option (threads, wandb, ...).


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# the report's first page: the results table and what it says, written by the tables rule
report: os.path.abspath(str(paths.tables_dir(OUT) / "report.rst"))


rule all:
    input:
        tables=rules.tables.output,
        plots=rules.plots.output,
        row_plots=rules.row_plots.output,
        stale=stale_flags(),  # outputs recording another identity than the config's: rerun their jobs
