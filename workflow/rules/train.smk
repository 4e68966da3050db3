# One job per phase of a run; `control` continues from dense with the later phases' epochs and LRs.
# A job asking for more than one GPU (gpus_per_job) trains under torchrun, one process per GPU.


rule train_phase:
    input:
        data=lambda w: data_inputs(w.row),
        init=previous_checkpoint,
    output:
        model=str(paths.checkpoint(paths.run_dir(OUT, "{row}", "{seed}", "{phase}"))),
        metrics=str(paths.metrics(paths.run_dir(OUT, "{row}", "{seed}", "{phase}"))),
    params:
        spec=lambda w: spec(w.row),
        init=lambda w, input: f"--init {input.init}" if input.init else "",
        out=lambda w: run_dir(w.row, w.seed, w.phase),
        dsd=lambda w, resources: shlex.join(dsd_gpus.launcher(resources.gpu, PYTHON)),
    threads: config.get("threads", 1)
    resources:
        gpu=config.get("gpus_per_job", 1),
    log:
        str(paths.logs_dir(OUT) / "{row}" / "seed{seed}" / "{phase}.log"),
    benchmark:
        str(paths.benchmarks_dir(OUT) / "rules" / "{row}" / "seed{seed}" / "{phase}.tsv")
    shell:
        "{GPUS} {resources.gpu} -- {params.dsd} train --spec {params.spec:q} --seed {wildcards.seed} --phase {wildcards.phase}"
        " {params.init} --out {params.out:q} 2> {log:q}"
