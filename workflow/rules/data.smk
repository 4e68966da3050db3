# Data preparation: generate an embedded data set, or check a real one, once per data set.
DATASET_ROW = {}
for _row in ROWS:
    DATASET_ROW.setdefault(EXPERIMENTS[_row].dataset, _row)


rule prepare_data:
    output:
        str(paths.prepared(DATA_ROOT, "{dataset}")),
    params:
        spec=lambda w: EXPERIMENTS[DATASET_ROW[w.dataset]].data_only().to_json(),  # rerun only on data changes
    log:
        str(paths.logs_dir(OUT) / "prepare_{dataset}.log"),
    benchmark:
        str(paths.benchmarks_dir(OUT) / "rules" / "prepare_{dataset}.tsv")
    shell:
        "{PYTHON} -m dsd prepare --spec {params.spec:q} 2> {log:q}"


def encoder_checkpoint(row):
    encoder_row, seed = captioning.encoder_source(EXPERIMENTS[row])
    return str(paths.checkpoint(paths.run_dir(OUT, encoder_row, seed, "dense")))


for _row, _exp in EXPERIMENTS.items():
    if _exp.track != "captioning" or not captioning.encoder_source(_exp):
        continue

    rule:
        name:
            f"image_features_{_row}"
        input:
            data=str(paths.prepared(DATA_ROOT, _exp.dataset)),
            encoder=encoder_checkpoint(_row),
        output:
            str(captioning.features_path(_exp)),
        params:
            spec=spec(_row),
            encoder_spec=EXPERIMENTS[captioning.encoder_source(_exp)[0]].to_json(),
        log:
            str(paths.logs_dir(OUT) / f"features_{_row}.log"),
        shell:
            "{PYTHON} -m dsd features --spec {params.spec:q} --encoder-spec {params.encoder_spec:q}"
            " --encoder-checkpoint {input.encoder:q} 2> {log:q}"
