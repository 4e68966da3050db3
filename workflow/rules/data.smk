# Data preparation: generate an embedded data set, or check a real one, once per data set; then, for
# captioning, the frozen CNN's features of every image, once per (data set, encoder).
DATASET_ROW = {}
for _name, _row in CONFIG.experiments.items():
    DATASET_ROW.setdefault(_row.dataset, _name)


def data_is_stale(w):
    current = json.loads(CONFIG.row(DATASET_ROW[w.dataset]).data_spec().to_json())
    return rerun_if_stale(str(paths.prepared(DATA_ROOT, w.dataset)), "spec", current)


rule prepare_data:
    input:
        stale=data_is_stale,
    output:
        str(paths.prepared(DATA_ROOT, "{dataset}")),
    params:
        spec=lambda w: CONFIG.row(DATASET_ROW[w.dataset]).data_spec().to_json(),  # only what preparing reads
    log:
        str(paths.logs_dir(OUT) / "prepare_{dataset}.log"),
    benchmark:
        str(paths.benchmarks_dir(OUT) / "rules" / "prepare_{dataset}.tsv")
    shell:
        "{PYTHON} -m dsd prepare --spec {params.spec:q} --options {RUN} 2> {log:q}"


def encoder_inputs(row):
    data = CONFIG.row(row).data
    if not data.encoder_row:
        return []
    return [str(paths.checkpoint(paths.run_dir(OUT, data.encoder_row, data.encoder_seed, "dense")))]


def encoder_args(row):
    data = CONFIG.row(row).data
    if not data.encoder_row:
        return ""
    spec = phase_spec(data.encoder_row, data.encoder_seed, "dense")
    return f"--encoder-spec {shlex.quote(spec)} --encoder-checkpoint {shlex.quote(encoder_inputs(row)[0])}"


FEATURES = {features_file(row): row for row in CONFIG.experiments if features_file(row)}  # one job per file

for _path, _row in FEATURES.items():

    rule:
        name:
            f"image_features_{_row}"
        input:
            data=str(paths.prepared(DATA_ROOT, CONFIG.row(_row).dataset)),
            encoder=encoder_inputs(_row),
            weights=existing(tracks.get("captioning").config.encoder_weights(CONFIG.experiment(_row))),
        output:
            _path,
        params:
            # the file's name changes with the data set, encoder and image size; the row's dense spec covers the rest
            spec=phase_spec(_row, 0, "dense"),
            encoder=encoder_args(_row),
        resources:
            gpu=0 if OPTIONS.device == "cpu" else 1,  # a GPU of its own (dsd.gpus), counted as the others are
        log:
            str(paths.logs_dir(OUT) / f"features_{_row}.log"),
        shell:
            "{GPUS} {resources.gpu} -- {PYTHON} -m dsd features --spec {params.spec:q} {params.encoder}"
            " --options {RUN} 2> {log:q}"
