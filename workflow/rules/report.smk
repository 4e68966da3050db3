# Tables and figures from every finished run (its training record and its evaluation).
ROW_SPECS = " ".join(f"--spec {shlex.quote(CONFIG.row(row).to_json())}" for row in ROWS)


rule tables:
    input:
        all_results(),
    output:
        csv=report(str(paths.tables_dir(OUT) / "paper_comparison.csv"), caption="../report/comparison.rst", category="Tables"),
        md=str(paths.tables_dir(OUT) / "paper_comparison.md"),
        phases=report(str(paths.tables_dir(OUT) / "phases.csv"), caption="../report/phases.rst", category="Tables"),
        runtime=report(str(paths.tables_dir(OUT) / "runtime.csv"), caption="../report/runtime.rst", category="Tables"),
        fidelity=report(str(paths.tables_dir(OUT) / "fidelity.csv"), caption="../report/fidelity.rst", category="Tables"),
        samples=[
            report(str(paths.tables_dir(OUT) / f"samples_{row}.csv"), caption="../report/samples.rst", category="Samples")
            for row in ROWS
            if CONFIG.row(row).track != "vision"
        ],
        landing=str(paths.tables_dir(OUT) / "report.rst"),
    params:
        specs=ROW_SPECS,
        seeds=" ".join(str(s) for s in SEEDS),
        out=str(paths.tables_dir(OUT)),
    log:
        str(paths.logs_dir(OUT) / "tables.log"),
    shell:
        "{PYTHON} -m dsd table {params.specs} --seeds {params.seeds} --options {RUN} --out {params.out:q} 2> {log:q}"


rule plots:
    input:
        rules.tables.output,
    output:
        gains=report(str(paths.plots_dir(OUT) / "gains.png"), caption="../report/gains.rst", category="Plots"),
        curves=report(str(paths.plots_dir(OUT) / "curves.png"), caption="../report/curves.rst", category="Plots"),
    params:
        specs=ROW_SPECS,
        seeds=" ".join(str(s) for s in SEEDS),
        out=str(paths.plots_dir(OUT)),
    log:
        str(paths.logs_dir(OUT) / "plots.log"),
    shell:
        "{PYTHON} -m dsd plots {params.specs} --seeds {params.seeds} --options {RUN} --out {params.out:q} "
        "--part summary 2> {log:q}"


# The per-row figures are a job of their own: it runs beside the summary figures instead of after them.
rule row_plots:
    input:
        rules.tables.output,
    output:
        weights=[
            report(str(paths.plots_dir(OUT) / f"weights_{row}.png"), caption="../report/weights.rst", category="Weights")
            for row in ROWS
        ],
        captions=[
            report(str(paths.plots_dir(OUT) / f"captions_{row}.png"), caption="../report/captions.rst", category="Samples")
            for row in ROWS
            if CONFIG.row(row).track == "captioning"
        ],
        sweeps=[
            report(str(paths.plots_dir(OUT) / f"sweep_{row}.png"), caption="../report/sweep.rst", category="Plots")
            for row in ROWS
            if CONFIG.row(row).sweep
        ],
    params:
        specs=ROW_SPECS,
        seeds=" ".join(str(s) for s in SEEDS),
        out=str(paths.plots_dir(OUT)),
    log:
        str(paths.logs_dir(OUT) / "row_plots.log"),
    shell:
        "{PYTHON} -m dsd plots {params.specs} --seeds {params.seeds} --options {RUN} --out {params.out:q} "
        "--part rows 2> {log:q}"
