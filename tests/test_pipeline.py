"""The Snakemake chain end to end on tiny generated data, and bad input failing cleanly."""

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, dsd_cli, snakemake, tiny_vision_config, write_config
from test_reliability import slow_sparse_config

from dsd import paths
from dsd.report.tables import item_differences, item_shares, paired_ci_items


def test_pipeline_end_to_end_then_nothing_to_do(tmp_path):
    config = tiny_vision_config(tmp_path)
    configfile = write_config(tmp_path, config)
    first = snakemake(tmp_path, configfile, env=os.environ | {"DSD_PREFORK": "1"})  # as make run does
    assert first.returncode == 0, first.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "tables" / "paper_comparison.csv")
    assert list(table["row"]) == ["resnet18"]
    row = table.iloc[0]
    assert row["metric"] == "top1_error_pct" and not row["higher_is_better"]
    assert row["n_seeds"] == 2 and row["paper_baseline"] == pytest.approx(30.43)
    for column in ("baseline_mean", "dsd_mean", "control_mean", "baseline_std", "rel_gain_vs_control_pct"):
        assert pd.notna(row[column]), column
    # the interval resamples the seeds and the test images: each evaluation kept its per-image outcomes
    evals = {
        phase: [json.loads(paths.evaluation(paths.run_dir(config["output_dir"], "resnet18", s, phase)).read_text())
                for s in (0, 1)]
        for phase in ("redense1", "control")
    }  # fmt: skip
    for evaluation in evals["redense1"]:
        assert np.mean(item_shares(evaluation["test_items"])) == pytest.approx(
            evaluation["test"]["top1_error_pct"]
        )
    _, low, high, _, _ = paired_ci_items(item_differences(evals["redense1"], evals["control"]))
    assert row["interval_over"] == "seeds and test items"
    assert (row["dsd_minus_control_ci95_low"], row["dsd_minus_control_ci95_high"]) == pytest.approx(
        (low, high)
    )
    # every phase of every seed ran, the sparse phase really was 30% sparse, the control had equal epochs
    for seed in (0, 1):

        def run(phase, seed=seed):
            return json.loads(
                paths.metrics(paths.run_dir(config["output_dir"], "resnet18", seed, phase)).read_text()
            )

        assert run("sparse1")["measured_sparsity"] == pytest.approx(0.3, abs=0.01)
        assert run("sparse1")["fingerprint"] != run("redense1")["fingerprint"]
        assert run("redense1")["measured_sparsity"] == 0.0
        assert run("control")["epochs"] == run("sparse1")["epochs"] + run("redense1")["epochs"]
        assert not paths.resume(paths.run_dir(config["output_dir"], "resnet18", seed, "sparse1")).exists()
    second = snakemake(tmp_path, configfile)
    assert second.returncode == 0
    assert "Nothing to be done" in second.stdout + second.stderr
    # the job logs say what each epoch did; the report opens on the rendered results table
    log = (tmp_path / "results" / "logs" / "resnet18" / "seed0" / "sparse1.log").read_text()
    assert len([line for line in log.splitlines() if " sparse1 epoch " in line]) == 2
    report = snakemake(tmp_path, configfile, "--report", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr[-2000:]
    page = (tmp_path / "report.html").read_text()
    landing = page[page.index("var workflow_desc") :][:20000]
    assert "<table" in landing and "resnet18" in landing and "no significant difference" in landing
    # run options change no result, so they rerun nothing
    for options in (["wandb={mode: online}", "threads=2", "workers=2"], ["wandb={mode: disabled}"]):
        plan = snakemake(tmp_path, configfile, "-n", "--config", *options)
        assert "Nothing to be done" in plan.stdout + plan.stderr, (options, plan.stdout[-2000:])
    # the sparse phase's sparsity: its phase and the one after it, per seed, then the tables
    config["experiments"]["resnet18"]["phases"][1]["sparsity"] = 0.5
    assert planned(tmp_path, write_config(tmp_path, config)) == {
        "train_phase": 4, "evaluate_phase": 4, "tables": 1, "plots": 1, "row_plots": 1, "all": 1,
        "stale_output": 8,  # a flag per output that records the old spec: what the plan shows, and why
    }  # fmt: skip
    # how models are evaluated: evaluation and tables only, no training
    config["experiments"]["resnet18"]["phases"][1]["sparsity"] = 0.3
    config["experiments"]["resnet18"]["eval"] = {"batch_size": 3}
    assert planned(tmp_path, write_config(tmp_path, config)) == {
        "evaluate_phase": 8,
        "stale_output": 8,
        "tables": 1,
        "plots": 1,
        "row_plots": 1,
        "all": 1,
    }
    # Skinny-DNN / IHT from YAML: sparse1, redense1, sparse2 and the control per seed; the dense phase is kept
    phases = config["experiments"]["resnet18"]["phases"]
    iht = {"kind": "iht", "cycles": 2, "epochs": 1, "lr": 0.005, "sparsity": 0.3}
    config["experiments"]["resnet18"]["phases"] = [phases[0], iht]
    assert planned(tmp_path, write_config(tmp_path, config))["train_phase"] == 8
    config["experiments"]["resnet18"]["phases"] = phases
    # a new recipe retrains the row but keeps its data (rows sharing a data set are not all retrained)
    config["experiments"]["resnet18"]["phases"][0]["lr"] = 0.04
    jobs = planned(tmp_path, write_config(tmp_path, config))
    assert jobs["train_phase"] == 8 and "prepare_data" not in jobs


def test_dsd_run_retrains_the_phases_after_one_it_retrains(tmp_path):
    """A dense phase trained again (its record deleted, say, after a code fix) gives the phases that start from
    it a new starting checkpoint: they are trained again too, as Snakemake reruns them, never kept."""
    configfile = write_config(tmp_path, tiny_vision_config(tmp_path, seeds=[0]))
    command = ["run", "--config", str(configfile), "--row", "resnet18", "--seed", "0"]
    assert dsd_cli(*command).returncode == 0
    (tmp_path / "results" / "runs" / "resnet18" / "seed0" / "dense" / "metrics.json").unlink()
    again = dsd_cli(*command)
    assert again.returncode == 0, again.stderr[-2000:]
    trained = [line.split(" [")[0] for line in again.stdout.splitlines() if "trained;" in line]
    assert trained == [f"resnet18 seed 0 {p}" for p in ("dense", "sparse1", "redense1", "control")]


def test_dsd_run_waits_for_a_data_set_another_process_is_preparing(tmp_path):
    """Several `dsd run` at once (a row per GPU) each generated the shared data set, one deleting the images
    another was writing or reading (`cannot write (No such file or directory)`), and a marker one wrote could
    stand for images another left half rewritten. One prepares it; the others wait, then use it as it is."""
    import sys
    import time

    from dsd.config import parse_config
    from dsd.engine import prepare

    config = tiny_vision_config(tmp_path, seeds=[0])
    configfile = write_config(tmp_path, config)
    data = parse_config(config).row("resnet18").data_spec().experiment(parse_config(config).options)
    lock = prepare.marker(data).with_suffix(".lock")
    with prepare.exclusive(data):  # another process preparing it
        run = subprocess.Popen(
            [sys.executable, "-m", "dsd", "run", "--config", str(configfile), "--row", "resnet18"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        folder, deadline = Path(f"/proc/{run.pid}/fd"), time.time() + 120
        while time.time() < deadline and run.poll() is None:  # until the run waits on the lock
            if any(os.path.realpath(fd) == str(lock.resolve()) for fd in folder.glob("*")):
                break
            time.sleep(0.05)
        assert run.poll() is None, run.communicate()[1][-2000:]  # waiting, not finished
        prepare._prepare(data)
        images = {f: f.stat().st_mtime_ns for f in (tmp_path / "data" / "shapes").rglob("*.jpg")}
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-2000:]
    assert "shapes:" not in err  # it did not generate the images again
    assert {f: f.stat().st_mtime_ns for f in images} == images


def test_dsd_run_retrains_the_phases_after_one_trained_again_by_hand(tmp_path):
    """The dense phase trained again by `dsd train` (here with another thread count: the same spec, other bits
    possible) between two `dsd run`: the phases that start from its checkpoint were kept, trained from the
    old one, where Snakemake reruns them by the checkpoint's time; `dsd run` does so too now."""
    configfile = write_config(tmp_path, tiny_vision_config(tmp_path, seeds=[0]))
    command = ["run", "--config", str(configfile), "--row", "resnet18", "--seed", "0"]
    assert dsd_cli(*command).returncode == 0
    by_hand = dsd_cli("train", *command[1:], "--phase", "dense", "--set", "threads=2")
    assert by_hand.returncode == 0, by_hand.stderr[-2000:]
    again = dsd_cli(*command)
    assert again.returncode == 0, again.stderr[-2000:]
    trained = [line.split(" [")[0] for line in again.stdout.splitlines() if "trained;" in line]
    assert trained == [f"resnet18 seed 0 {p}" for p in ("sparse1", "redense1", "control")]


def _mark_prepared(parsed, row: str) -> None:
    """The row's data set marked as prepared with these settings (no data: the test plans, it trains nothing)."""
    spec = parsed.row(row).data_spec()
    marker = paths.prepared(parsed.options.data_root, spec.dataset)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"spec": json.loads(spec.to_json()), "fingerprint": "x"}))


def _tiny_neuraltalk(tmp_path) -> dict:
    config = tiny_vision_config(tmp_path, seeds=[0], rows=["neuraltalk"])
    config["experiments"]["neuraltalk"] = {
        "track": "captioning",
        "dataset": "scenes",
        "model": {"embed_dim": 8, "hidden_dim": 8},
        "data": {"min_count": 1, "image_size": 32, "encoder_row": "resnet18", "scenes_splits": [20, 5, 5]},
        "phases": [
            {"kind": "dense", "epochs": 1, "lr": 0.005},
            {"kind": "sparse", "epochs": 1, "lr": 0.0005, "sparsity": 0.5},
            {"kind": "redense", "epochs": 1},
        ],
    }
    return config


def test_dsd_run_encodes_the_images_again_after_the_encoder_is_retrained(tmp_path):
    """The image features are named by the encoder's spec: a dense encoder trained again under it (on another
    machine, say) writes a newer checkpoint, and `dsd run` then encodes again and retrains the captioning
    phases, as Snakemake would by the files' times; they were kept."""
    configfile = write_config(tmp_path, _tiny_neuraltalk(tmp_path))
    encoder = ["run", "--config", str(configfile), "--row", "resnet18", "--seed", "0"]
    captions = ["run", "--config", str(configfile), "--row", "neuraltalk", "--seed", "0"]
    for command in (encoder, captions):
        assert dsd_cli(*command).returncode == 0
    again = dsd_cli(*captions)
    assert "wrote" not in again.stdout and "trained;" not in again.stdout  # nothing changed: nothing done
    dense = paths.checkpoint(tmp_path / "results" / "runs" / "resnet18" / "seed0" / "dense")
    # the encoder trained again: a checkpoint under the same spec, newer than anything written so far (on a
    # busy machine the captioning run ended well after the encoder's)
    later = max(f.stat().st_mtime for f in tmp_path.rglob("*") if f.is_file()) + 1
    os.utime(dense, (later, later))
    again = dsd_cli(*captions)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "wrote" in again.stdout
    trained = [line.split(" [")[0] for line in again.stdout.splitlines() if "trained;" in line]
    assert trained == [f"neuraltalk seed 0 {p}" for p in ("dense", "sparse1", "redense1", "control")]


def test_image_features_on_a_gpu_take_a_gpu_no_other_job_holds(tmp_path):
    """Encoding the images runs on cuda where there is one: the job must ask Snakemake for its GPU and lock it
    (dsd.gpus), as training and evaluation do, or it shares GPU 0 with the phase training there."""
    config = _tiny_neuraltalk(tmp_path) | {"device": "cuda"}
    plan = snakemake(tmp_path, write_config(tmp_path, config), "-n", "-p")
    assert plan.returncode == 0, plan.stderr[-2000:]
    job = plan.stdout.split("rule image_features_neuraltalk:")[1].split("\n\n")[0]
    assert "gpu=1" in job, job
    command = job.split("Shell command:")[1].split()
    assert command[1].endswith("dsd/gpus.py") and command[2:4] == ["1", "--"], command[:6]


def test_cpu_training_jobs_ask_for_no_gpu_and_still_run_their_ranks(tmp_path):
    """`device: cpu`: a training job asked Snakemake for gpus_per_job GPUs of `--resources gpu=N`, so CPU jobs
    took GPU jobs' tokens (and waited for them). It asks for none; the prefix, given 0, still starts
    gpus_per_job CPU ranks (from the run options): the same training as before."""
    config = tiny_vision_config(tmp_path, device="cpu", gpus_per_job=2, seeds=[0])
    plan = snakemake(tmp_path, write_config(tmp_path, config), "-n", "-p")
    assert plan.returncode == 0, plan.stderr[-2000:]
    job = plan.stdout.split("rule train_phase:")[1].split("\n\n")[0]
    assert "gpu=0" in job, job
    command = shlex.split(job.split("Shell command:")[1].split(" 2> ")[0])
    assert command[0] == "exec", command[:2]  # no shell left between Snakemake and the job (SLURM's SIGTERM)
    command = command[1:]
    assert command[1].endswith("dsd/gpus.py") and command[2:5] == ["0", "--dsd", "--"], command[:6]
    options = command[command.index("--options") + 1]
    ranks = subprocess.run(
        [*command[:5], "--help", "--options", options], capture_output=True, text=True, timeout=120
    )  # each rank prints dsd's usage instead of training
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    assert ranks.stdout.count("usage:") == 2, ranks.stdout


def test_a_stale_encoder_run_outside_the_tables_rows_is_retrained(tmp_path):
    """rows: [neuraltalk] reads resnet18's dense run without tabulating it: a dense run there that records
    another spec (written by `dsd run`, or copied, so Snakemake has no record of it) is retrained, not fed to
    the image features."""
    from dsd.config import parse_config

    config = _tiny_neuraltalk(tmp_path)
    parsed = parse_config(config)
    for row in ("resnet18", "neuraltalk"):  # both data sets prepared with these settings, before the run
        _mark_prepared(parsed, row)
    encoder = paths.run_dir(parsed.options.output_dir, "resnet18", 0, "dense")
    encoder.mkdir(parents=True)
    paths.checkpoint(encoder).write_bytes(b"an older dense run")
    paths.metrics(encoder).write_text(json.dumps({"fingerprint": "an-older-spec"}))
    jobs = planned(tmp_path, write_config(tmp_path, config))
    assert (jobs["train_phase"], jobs.get("stale_output")) == (5, 1), jobs  # neuraltalk's 4 and the encoder


def test_a_newer_local_weights_file_retrains_the_dense_phase_that_starts_from_it(tmp_path):
    """`model.weights: /path/to/start.pth`: the file's content is in no spec, so replacing it reruns the dense
    phase by its time (as for any input), where before nothing did."""
    from dsd.config import parse_config

    weights = tmp_path / "start.pth"
    weights.write_bytes(b"the first pretrained weights")
    config = tiny_vision_config(tmp_path, seeds=[0])
    row = config["experiments"]["resnet18"]
    row["model"]["weights"] = str(weights)
    row["phases"][0] = {"kind": "dense", "epochs": 0}
    row["phases"][1]["lr"] = 0.05
    configfile = write_config(tmp_path, config)
    parsed = parse_config(config)
    _mark_prepared(parsed, "resnet18")
    dense = paths.run_dir(parsed.options.output_dir, "resnet18", 0, "dense")
    dense.mkdir(parents=True)
    paths.checkpoint(dense).write_bytes(b"trained from the first weights")
    paths.metrics(dense).write_text(
        json.dumps({"fingerprint": parsed.phase("resnet18", 0, "dense").fingerprint})
    )

    def plan():
        result = snakemake(tmp_path, configfile, "-n", str(paths.metrics(dense)))
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    assert "Nothing to be done" in plan()
    os.utime(weights, ns=(paths.metrics(dense).stat().st_mtime_ns + 10**9,) * 2)  # replaced since
    assert "rule train_phase" in plan()


def test_dsd_run_retrains_what_starts_from_a_replaced_local_weights_file(tmp_path):
    """`dsd run` kept every phase trained from a `model.weights` file replaced since (its content is in no
    spec), where Snakemake reruns them by the file's time; it decides as Snakemake does now."""
    import torch

    from dsd.config import parse_config
    from dsd.tracks.vision import model as vision_model

    config = tiny_vision_config(tmp_path, seeds=[0])
    weights = tmp_path / "start.pth"
    config["experiments"]["resnet18"]["model"]["weights"] = str(weights)
    config["experiments"]["resnet18"]["phases"][0] = {"kind": "dense", "epochs": 0}
    configfile = write_config(tmp_path, config)
    exp = parse_config(config).experiment("resnet18")
    command = ["run", "--config", str(configfile), "--row", "resnet18", "--seed", "0"]
    for seed in (0, 1):  # the first weights, then others under the same path
        torch.manual_seed(seed)
        torch.save(vision_model.build(exp, pretrained=False).state_dict(), weights)
        result = dsd_cli(*command)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.count("trained;") == 4, result.stdout
    assert "trained;" not in dsd_cli(*command).stdout  # nothing newer: nothing done


def test_tables_by_hand_refuse_runs_of_another_config(tmp_path):
    """`dsd table --config` reads the runs Snakemake would have checked: one recording another spec (a changed
    sparsity, the run not redone) is named, not tabulated."""
    from dsd.config import parse_config
    from dsd.spec import eval_fingerprint

    config = tiny_vision_config(tmp_path, seeds=[0])
    old = parse_config(config)
    for phase in old.row("resnet18").phase_names:  # the records `dsd run` left for sparsity 0.3
        run = paths.run_dir(old.options.output_dir, "resnet18", 0, phase)
        run.mkdir(parents=True)
        spec = old.phase("resnet18", 0, phase)
        paths.metrics(run).write_text(json.dumps({"fingerprint": spec.fingerprint}))
        evaluated = eval_fingerprint(spec, old.row("resnet18").eval)
        paths.evaluation(run).write_text(json.dumps({"eval_fingerprint": evaluated}))
    config["experiments"]["resnet18"]["phases"][1]["sparsity"] = 0.5
    result = dsd_cli("table", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "sparse1/metrics.json: missing, or of another spec than this config's resnet18 seed 0" in line


def test_a_newer_language_model_file_reruns_the_evaluation_that_reads_it(tmp_path):
    """`eval: {decoder: beam, lexicon: ..., lm: /data/4-gram.bin}`: the files' content is in no eval setting, so
    replacing one reruns the evaluations by its time (as for any input), where before nothing did."""
    from dsd.config import parse_config
    from dsd.spec import eval_fingerprint

    lexicon, lm = tmp_path / "lexicon.txt", tmp_path / "4-gram.bin"
    lexicon.write_text("a\ta |\n")
    lm.write_bytes(b"the first language model")
    phases = [{"kind": "dense", "epochs": 1, "lr": 0.01}]
    row = {"track": "speech", "dataset": "spoken", "phases": phases}
    row["eval"] = {"decoder": "beam", "lexicon": str(lexicon), "lm": str(lm)}
    config = {"output_dir": str(tmp_path / "results"), "data_root": str(tmp_path / "data"), "seeds": [0]}
    config |= {"wandb": {"mode": "disabled"}, "experiments": {"ds": row}}
    configfile = write_config(tmp_path, config)
    parsed = parse_config(config)
    _mark_prepared(parsed, "ds")
    run = paths.run_dir(parsed.options.output_dir, "ds", 0, "dense")
    run.mkdir(parents=True)
    dense = parsed.phase("ds", 0, "dense")
    paths.checkpoint(run).write_bytes(b"a trained model")
    paths.metrics(run).write_text(json.dumps({"fingerprint": dense.fingerprint}))
    evaluated = eval_fingerprint(dense, parsed.row("ds").eval)
    paths.evaluation(run).write_text(json.dumps({"eval_fingerprint": evaluated}))

    def plan():
        result = snakemake(tmp_path, configfile, "-n", str(paths.evaluation(run)))
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    assert "Nothing to be done" in plan()
    os.utime(lm, ns=(paths.evaluation(run).stat().st_mtime_ns + 10**9,) * 2)  # replaced since
    assert "rule evaluate_phase" in plan()


def test_dsd_run_evaluates_again_after_the_lexicon_is_replaced(tmp_path):
    """A beam search's lexicon (or LM) replaced since the evaluation: `dsd run` kept the eval.json decoded with
    the old one, where Snakemake reruns the evaluation by the file's time; it decides as Snakemake does now."""
    row = {"track": "speech", "dataset": "spoken", "phases": [{"kind": "dense", "epochs": 1, "lr": 0.01}]}
    row["model"] = {"arch": "deepspeech", "hidden": 16, "rnn_hidden": 8, "rnn_layers": 1}
    row["data"] = {"utterances_per_speaker": {"train": 2, "dev": 1, "test": 1}}
    row["train"] = {"batch_size": 8, "max_steps_per_epoch": 1}
    row["eval"] = {"decoder": "beam", "lexicon": "lexicon.txt", "beam_size": 2}
    config = {"output_dir": str(tmp_path / "results"), "data_root": str(tmp_path / "data"), "seeds": [0]}
    config |= {"threads": 1, "wandb": {"mode": "disabled"}, "experiments": {"ds": row}}
    command = ["run", "--config", str(write_config(tmp_path, config)), "--row", "ds"]
    assert dsd_cli(*command).returncode == 0
    evaluation = paths.evaluation(paths.run_dir(str(tmp_path / "results"), "ds", 0, "dense"))
    evaluated = evaluation.stat().st_mtime_ns
    assert dsd_cli(*command).returncode == 0 and evaluation.stat().st_mtime_ns == evaluated  # kept
    lexicon = tmp_path / "data" / "spoken" / "lexicon.txt"
    os.utime(lexicon, ns=(evaluated + 10**9,) * 2)  # replaced since
    again = dsd_cli(*command)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "trained;" not in again.stdout and evaluation.stat().st_mtime_ns != evaluated


def planned(workdir, configfile) -> dict[str, int]:
    """Snakemake's dry-run job counts per rule."""
    plan = snakemake(workdir, configfile, "-n", "--quiet", "rules")
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = {}
    for line in plan.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def test_dry_run_plans_every_phase_and_control(tmp_path):
    config = tiny_vision_config(tmp_path, seeds=[0, 1, 2])
    result = snakemake(tmp_path, write_config(tmp_path, config), "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "train_phase" in out and "prepare_data" in out and "tables" in out


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"experiments.resnet18.trian": {}},
            "config.experiments.resnet18.trian: unknown key (did you mean 'train'?",
        ),
        ({"seeds": "zero"}, "config.seeds: expected a list"),
        ({"experiments.resnet18.prune.include": []}, "prune.include: an empty list prunes nothing"),
        (
            {"experiments.resnet18.data.generate.per_class": {"train": 6, "val": 2}},
            "data.generate.per_class.test: missing (per_class replaces the default",
        ),
        (
            {"experiments.resnet18.phases": [{"kind": "sparse", "epochs": 1, "lr": 0.1, "sparsity": 0.5}]},
            "dense phase before",
        ),
        (
            {
                "experiments.resnet18.phases": [
                    {"kind": "dense", "epochs": 1, "lr": 0.1},
                    {"kind": "sparse", "epochs": 1, "lr": 0.1, "sparsity": 1.5},
                ]
            },
            "config.experiments.resnet18.phases[1].sparsity: must be < 1, got 1.5",
        ),
    ],
)
def test_bad_config_stops_with_one_line(tmp_path, change, message):
    from dsd.config import set_dotted

    config = tiny_vision_config(tmp_path)
    for key, value in change.items():
        set_dotted(config, key, value)
    result = snakemake(tmp_path, write_config(tmp_path, config), "-n")
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("dsd: error:")]
    assert len(errors) == 1 and message in errors[0], result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_missing_data_folder_is_one_clear_line(tmp_path):
    config = tiny_vision_config(tmp_path, data={"imagenet": str(tmp_path / "no_such_imagenet")})
    config["experiments"]["resnet18"]["dataset"] = "imagenet"
    result = snakemake(tmp_path, write_config(tmp_path, config))
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "prepare_imagenet.log").read_text().strip().splitlines()
    assert log[-1].startswith("dsd: error:") and "no_such_imagenet" in log[-1] and "not found" in log[-1]
    assert not paths.prepared(config["data_root"], "imagenet").exists()


def test_cli_rejects_bad_sparsity_and_key(tmp_path):
    configfile = write_config(tmp_path, tiny_vision_config(tmp_path))
    bad_phases = "[{kind: dense, epochs: 1, lr: 0.1}, {kind: sparse, epochs: 1, lr: 0.1, sparsity: 1.5}]"
    result = dsd_cli("check-config", str(configfile), "--set", f"experiments.resnet18.phases={bad_phases}")
    assert result.returncode == 2 and "phases[1].sparsity: must be < 1, got 1.5" in result.stderr
    result = dsd_cli("check-config", str(configfile), "--set", "experiments.resnet18.model.wdith=3")
    assert result.returncode == 2 and "model.wdith: unknown key (did you mean 'width'?" in result.stderr
    result = dsd_cli("check-config", str(configfile), "--set", "seeds=[0, 1")
    assert result.returncode == 2 and "--set seeds:1:6: YAML syntax error" in result.stderr
    result = dsd_cli("spec", "--config", str(configfile), "--row", "resnet18", "--seed", "0", "--phase", "dense",
                     "--set", "threads=0")  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().startswith(
        "dsd: error: config.threads: must be >= 1"
    )


def test_no_output_of_the_default_pipeline_is_committed():
    """A fresh clone must train: were a table or plot tracked, Snakemake would find the targets present and
    skip every run. Published copies live in results/published/ instead (`make publish`)."""
    outputs = [paths.tables_dir("results"), paths.plots_dir("results"), Path("results/report.html")]
    tracked = subprocess.run(
        ["git", "ls-files", "--", *map(str, outputs)], cwd=REPO, capture_output=True, text=True
    )
    if tracked.returncode:
        pytest.skip(f"not a git checkout: {tracked.stderr.strip()}")
    assert tracked.stdout == ""
    assert (REPO / "results" / "published" / "tables" / "paper_comparison.md").is_file()


def test_dsd_run_trains_one_row_and_seed_in_order_then_keeps_what_is_done(tmp_path):
    """`dsd run`: torchvision's train.py experience, the same files the pipeline writes, nothing redone."""
    configfile = write_config(tmp_path, tiny_vision_config(tmp_path, seeds=[0]))
    command = ["run", "--config", str(configfile), "--row", "resnet18", "--seed", "0"]
    first = dsd_cli(*command)
    assert first.returncode == 0, first.stderr[-2000:]
    phases = ["dense", "sparse1", "redense1", "control"]
    assert [line.split(" [")[0] for line in first.stdout.splitlines() if "trained;" in line] == [
        f"resnet18 seed 0 {p}" for p in phases
    ]
    runs = tmp_path / "results" / "runs" / "resnet18" / "seed0"
    for phase in phases:
        assert json.loads((runs / phase / "eval.json").read_text())["phase"] == phase
    again = dsd_cli(*command)
    assert again.returncode == 0 and "trained;" not in again.stdout
    assert again.stdout.count("test top1_error_pct =") == 4
    # Snakemake has no record of files `dsd run` wrote: it plans from the identities they record
    config = tiny_vision_config(tmp_path, seeds=[0])
    jobs = planned(tmp_path, configfile)
    assert not {"prepare_data", "train_phase", "evaluate_phase", "stale_output"} & set(jobs), jobs
    config["experiments"]["resnet18"]["phases"][1]["sparsity"] = 0.5
    jobs = planned(tmp_path, write_config(tmp_path, config))
    assert (jobs["train_phase"], jobs["evaluate_phase"], jobs["stale_output"]) == (2, 2, 4), jobs
    # and `dsd run` retrains what another config's data set would make stale
    config["experiments"]["resnet18"]["phases"][1]["sparsity"] = 0.3
    config["experiments"]["resnet18"]["data"]["generate"]["per_class"]["train"] = 5
    rerun = dsd_cli(*command[:2], str(write_config(tmp_path, config)), *command[3:])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("trained;") == 4


def _training_pid(out: Path) -> int | None:
    """The pid of the `dsd train` process writing `out`, or None."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in argv and str(out).encode() in argv and b"snakemake" not in b" ".join(argv):
            return int(proc.name)
    return None


def _cut_after_a_checkpoint(out: Path, earlier: int | None, deadline: float) -> int:
    """SIGTERM the `dsd train` job of `out` (SLURM's at a time limit) once it has written a resume point of its
    own (after an epoch), where `earlier` was the last job's pid; return its pid."""
    while (pid := _training_pid(out)) in (None, earlier) and time.monotonic() < deadline:
        time.sleep(0.02)
    written = paths.resume(out).stat().st_mtime_ns if paths.resume(out).exists() else 0
    while (not paths.resume(out).exists() or paths.resume(out).stat().st_mtime_ns == written) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    os.kill(pid, signal.SIGTERM)
    return pid


@pytest.mark.slow
def test_a_phase_cut_by_two_time_limits_finishes_under_the_slurm_profile_and_its_log_keeps_every_attempt(
    tmp_path,
):
    """A phase stopped by SIGTERM (SLURM's at a time limit) checkpoints and fails; Snakemake's `retries` runs it
    again from its resume point. The SLURM profile's `retries: 1` let a phase span two time-limit windows only:
    one needing three failed. And Snakemake deletes a job's log before each attempt: the phase's log said
    nothing of why it was cut."""
    retries = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())["retries"]
    config = slow_sparse_config(tmp_path)
    config["experiments"]["resnet18"]["phases"][0]["epochs"] = 8  # the dense phase, cut twice here
    configfile = write_config(tmp_path, config)
    out = paths.run_dir(config["output_dir"], "resnet18", 0, "dense")
    log = tmp_path / "results" / "logs" / "resnet18" / "seed0" / "dense.log"
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
           str(configfile), "--cores", "1", "--retries", str(retries), str(paths.metrics(out))]  # fmt: skip
    snakemake_run = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        first = _cut_after_a_checkpoint(out, None, deadline)  # the first window's end
        _cut_after_a_checkpoint(out, first, deadline)  # the second's
        output, _ = snakemake_run.communicate(timeout=300)
    finally:
        if snakemake_run.poll() is None:
            snakemake_run.kill()
    assert snakemake_run.returncode == 0, output[-3000:]
    text = log.read_text()
    assert (
        text.count("SIGTERM: checkpointed dense") == 2 and text.count("a new attempt at this phase") == 2
    ), text
    cut, marked, resumed = (
        text.find(s) for s in ("SIGTERM: checkpointed dense", "a new attempt", "resuming from")
    )
    assert 0 <= cut < marked < resumed, text
    assert text.count(" dense epoch 8/8") == 1, text
