# One job per phase of a run; `control` continues from dense with the later phases' epochs and LRs.
# A job asking for more than one GPU (gpus_per_job) trains as DDP ranks, one per GPU (started by dsd.gpus).


rule train_phase:
    input:
        data=lambda w: data_inputs(w.row),
        init=previous_checkpoint,
        weights=weights_input,
        stale=phase_is_stale,
    output:
        model=str(paths.checkpoint(paths.run_dir(OUT, "{row}", "{seed}", "{phase}"))),
        metrics=str(paths.metrics(paths.run_dir(OUT, "{row}", "{seed}", "{phase}"))),
    params:
        spec=lambda w: phase_spec(w.row, w.seed, w.phase),  # the rerun trigger: what the checkpoint depends on
        init=lambda w, input: f"--init {shlex.quote(input.init)}" if input.init else "",
        out=lambda w: run_dir(w.row, w.seed, w.phase),
    threads: OPTIONS.threads
    resources:
        # none on the CPU: GPU tokens are for GPU jobs (dsd.gpus still starts gpus_per_job ranks, from the options)
        gpu=0 if OPTIONS.device == "cpu" else OPTIONS.gpus_per_job,
    log:
        str(paths.logs_dir(OUT) / "{row}" / "seed{seed}" / "{phase}.log"),
    benchmark:
        str(paths.benchmarks_dir(OUT) / "rules" / "{row}" / "seed{seed}" / "{phase}.tsv")
    shell:
        # exec: no shell between Snakemake and the job, where SIGTERM (SLURM's, to every process) would end the
        # shell at once and with it Snakemake's wait, the SLURM step, and the job before its checkpoint
        "exec {GPUS} {resources.gpu} --dsd -- train --spec {params.spec:q} --options {RUN} {params.init}"
        " --out {params.out:q} 2> {log:q}"
