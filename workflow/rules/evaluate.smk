# Evaluation of every phase's final checkpoint (validation and test splits) with the row's eval settings.
# Its own step: changing how models are evaluated (decoder, beam, lexicon, batch size) reruns only this.


rule evaluate_phase:
    input:
        data=lambda w: data_inputs(w.row),
        model=str(paths.checkpoint(paths.run_dir(OUT, "{row}", "{seed}", "{phase}"))),
        decoder=eval_files,
        stale=evaluation_is_stale,
    output:
        str(paths.evaluation(paths.run_dir(OUT, "{row}", "{seed}", "{phase}"))),
    params:
        spec=lambda w: phase_spec(w.row, w.seed, w.phase),
        eval=lambda w: json.dumps(hparams.as_dict(CONFIG.row(w.row).eval), sort_keys=True),
    threads: OPTIONS.threads
    resources:
        gpu=0 if OPTIONS.device == "cpu" else 1,
    log:
        str(paths.logs_dir(OUT) / "{row}" / "seed{seed}" / "{phase}.eval.log"),
    benchmark:
        str(paths.benchmarks_dir(OUT) / "rules" / "{row}" / "seed{seed}" / "{phase}.eval.tsv")
    shell:
        "{GPUS} {resources.gpu} -- {PYTHON} -m dsd evaluate --spec {params.spec:q} --eval {params.eval:q}"
        " --checkpoint {input.model:q} --options {RUN_ONE_PROCESS} --out {output:q} 2> {log:q}"
