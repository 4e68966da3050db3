# Tables (and later plots and the report) from every finished run.


rule tables:
    input:
        all_metrics(),
    output:
        csv=report(str(paths.tables_dir(OUT) / "paper_comparison.csv"), caption="../report/comparison.rst", category="Tables"),
        md=str(paths.tables_dir(OUT) / "paper_comparison.md"),
        phases=report(str(paths.tables_dir(OUT) / "phases.csv"), caption="../report/phases.rst", category="Tables"),
    params:
        specs=" ".join(f"--spec {shlex.quote(spec(row))}" for row in ROWS),
        seeds=" ".join(str(s) for s in SEEDS),
        out=str(paths.tables_dir(OUT)),
    log:
        str(paths.logs_dir(OUT) / "tables.log"),
    shell:
        "{PYTHON} -m dsd table {params.specs} --seeds {params.seeds} --out {params.out:q} 2> {log:q}"


rule plots:
    input:
        rules.tables.output,
    output:
        gains=report(str(paths.plots_dir(OUT) / "gains.png"), caption="../report/gains.rst", category="Plots"),
        curves=report(str(paths.plots_dir(OUT) / "curves.png"), caption="../report/curves.rst", category="Plots"),
        weights=[
            report(str(paths.plots_dir(OUT) / f"weights_{row}.png"), caption="../report/weights.rst", category="Weights")
            for row in ROWS
        ],
    params:
        specs=" ".join(f"--spec {shlex.quote(spec(row))}" for row in ROWS),
        seeds=" ".join(str(s) for s in SEEDS),
        out=str(paths.plots_dir(OUT)),
    log:
        str(paths.logs_dir(OUT) / "plots.log"),
    shell:
        "{PYTHON} -m dsd plots {params.specs} --seeds {params.seeds} --out {params.out:q} 2> {log:q}"
