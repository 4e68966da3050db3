# Data preparation: generate an embedded data set, or check a real one, once per data set.
DATASET_ROW = {}
for _row in ROWS:
    DATASET_ROW.setdefault(EXPERIMENTS[_row].dataset, _row)


rule prepare_data:
    output:
        str(paths.prepared(DATA_ROOT, "{dataset}")),
    params:
        spec=lambda w: spec(DATASET_ROW[w.dataset]),
    log:
        str(paths.logs_dir(OUT) / "prepare_{dataset}.log"),
    benchmark:
        str(paths.benchmarks_dir(OUT) / "rules" / "prepare_{dataset}.tsv")
    shell:
        "{PYTHON} -m dsd prepare --spec {params.spec:q} 2> {log:q}"
