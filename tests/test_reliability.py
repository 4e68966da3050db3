"""Crashes, preemption and bad checkpoints: resumed runs equal uninterrupted ones bitwise on the CPU."""

import argparse
import copy
import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, parse, prepare_data, sigint_as, tiny_vision_config, train

from dsd import paths
from dsd.engine import checkpoint
from dsd.errors import CheckpointError, DataError, NonFiniteLoss

VOLATILE = {"seconds", "wall_seconds", "machine"}


def slow_sparse_config(tmp):
    """Long enough a sparse phase (6 epochs of 8 steps) to be killed in the middle of it."""
    config = tiny_vision_config(tmp, seeds=[0])
    exp = config["experiments"]["resnet18"]
    exp["data"]["generate"] = {"per_class": {"train": 13, "val": 3, "test": 3}}
    exp["model"]["width"] = 8
    exp["train"]["max_steps_per_epoch"] = 8
    exp["phases"][1]["epochs"] = 6
    return config


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def assert_same_run(dir_a, dir_b, row, seed, phases):
    for phase in phases:
        run_a, run_b = (paths.run_dir(d, row, seed, phase) for d in (dir_a, dir_b))
        metrics_a, metrics_b = (json.loads(paths.metrics(r).read_text()) for r in (run_a, run_b))
        assert strip(metrics_a) == strip(metrics_b), phase
        eval_a, eval_b = (json.loads(paths.evaluation(r).read_text()) for r in (run_a, run_b))
        assert eval_a["test"] == eval_b["test"] and eval_a["val"] == eval_b["val"], phase
        model_a, model_b = (
            torch.load(paths.checkpoint(r), weights_only=True)["model"] for r in (run_a, run_b)
        )
        for name in model_a:
            assert torch.equal(model_a[name], model_b[name]), f"{phase}: {name} differs"


@pytest.mark.parametrize("interrupt", ["SIGTERM", "Ctrl-C, 2 loader workers"])
def test_a_signal_checkpoints_mid_epoch_and_resume_is_exact(tmp_path, interrupt):
    """SIGTERM (SLURM, Snakemake), or Ctrl-C, which a terminal sends the job's whole process group, loader
    workers included (they died with a KeyboardInterrupt of their own): a checkpoint at the next step, then an
    exact resume. Ctrl-C exits 130, as an interrupted command does."""
    raw = slow_sparse_config(tmp_path)
    ctrl_c = interrupt.startswith("Ctrl-C")
    raw["workers"] = 2 if ctrl_c else 0
    config = parse(raw)
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    reference = train(config, "resnet18", 0, "sparse1", out=tmp_path / "reference")

    out = tmp_path / "preempted"
    spec = config.phase("resnet18", 0, "sparse1")
    dense = paths.checkpoint(paths.run_dir(config.options.output_dir, "resnet18", 0, "dense"))
    cmd = [
        sys.executable,
        "-m",
        "dsd",
        "train",
        "--spec",
        spec.to_json(),
        "--options",
        config.options.to_json(),
    ]
    cmd += ["--init", str(dense), "--out", str(out)]
    process = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=sigint_as(signal.SIG_DFL)
    )
    while not paths.resume(out).exists() and process.poll() is None:
        time.sleep(0.005)
    # at once: the epoch after the first checkpoint has just started (a later moment, its validation or its
    # last step, would checkpoint after the epoch, and leave the mid-epoch resume untested)
    if ctrl_c:
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    name, code = ("SIGINT", 130) if ctrl_c else ("SIGTERM", 2)
    assert process.returncode == code and f"{name}: checkpointed sparse1 at epoch 1, step " in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not paths.metrics(out).exists()
    resumed = train(config, "resnet18", 0, "sparse1", out=out)
    assert strip(resumed) == strip(reference)
    a = torch.load(paths.checkpoint(out), weights_only=True)
    b = torch.load(paths.checkpoint(tmp_path / "reference"), weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_resume_point_of_another_spec_is_discarded_not_used(tmp_path, capfd):
    """Interrupt a sparse phase, change its sparsity, rerun: the old resume.pt (30%) must not be continued."""
    raw = slow_sparse_config(tmp_path)
    config = parse(raw)
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    out = paths.run_dir(config.options.output_dir, "resnet18", 0, "sparse1")
    spec = config.phase("resnet18", 0, "sparse1")
    dense = paths.checkpoint(paths.run_dir(config.options.output_dir, "resnet18", 0, "dense"))
    cmd = [
        sys.executable,
        "-m",
        "dsd",
        "train",
        "--spec",
        spec.to_json(),
        "--options",
        config.options.to_json(),
    ]
    process = subprocess.Popen(
        [*cmd, "--init", str(dense), "--out", str(out)], stderr=subprocess.PIPE, text=True
    )
    while not paths.resume(out).exists() and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert paths.resume(out).exists()

    raw["experiments"]["resnet18"]["phases"][1]["sparsity"] = 0.7
    changed = parse(raw)
    metrics = train(changed, "resnet18", 0, "sparse1")
    assert metrics["target_sparsity"] == 0.7 and metrics["measured_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert len(metrics["history"]) == 6  # every epoch trained afresh, none taken from the 30% run
    message = [
        line for line in capfd.readouterr().err.splitlines() if "resume.pt is from another spec" in line
    ]
    assert message and "phases[1].sparsity: 0.3 -> 0.7" in message[0]


def test_a_resume_point_from_another_checkpoint_of_the_previous_phase_is_discarded(
    tmp_path, monkeypatch, capfd
):
    """The previous phase retrained since the sparse phase was interrupted (same spec, other weights: another
    machine or thread count): the sparse phase starts afresh from the new checkpoint, not from the old one's
    resume point."""
    from dsd.engine import resume
    from dsd.errors import Preempted

    config = parse(tiny_vision_config(tmp_path, seeds=[0]))
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    out = paths.run_dir(config.options.output_dir, "resnet18", 0, "sparse1")
    with monkeypatch.context() as patch:  # a SIGTERM as the sparse phase starts: it leaves resume.pt
        patch.setattr(resume.StopSignal, "received", "SIGTERM", raising=False)
        patch.setattr(resume.StopSignal, "__init__", lambda self: None)
        with pytest.raises(Preempted):
            train(config, "resnet18", 0, "sparse1")
    assert paths.resume(out).exists()
    dense = paths.checkpoint(paths.run_dir(config.options.output_dir, "resnet18", 0, "dense"))
    state = checkpoint.load(dense)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint.save(state, dense)  # the dense phase again, with other weights under the same identity

    train(config, "resnet18", 0, "sparse1")
    assert "started from another checkpoint of the previous phase" in capfd.readouterr().err
    train(config, "resnet18", 0, "sparse1", out=tmp_path / "fresh")
    a = torch.load(paths.checkpoint(out), weights_only=True)["model"]
    b = torch.load(paths.checkpoint(tmp_path / "fresh"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_point_of_a_replaced_local_weights_file_is_discarded(tmp_path, monkeypatch, capfd):
    """A dense phase fine-tuned from `model.weights: start.pth` (epochs > 0): the spec names the file by path,
    so one replaced mid-phase (Snakemake reruns the phase for its newer time) resumed from the old file's
    resume point. resume.pt records the file's digest: the phase starts afresh from the new weights."""
    from dsd.engine import resume
    from dsd.errors import Preempted
    from dsd.tracks.vision import model as vision_model

    raw = tiny_vision_config(tmp_path, seeds=[0])
    weights = tmp_path / "start.pth"
    raw["experiments"]["resnet18"]["model"]["weights"] = str(weights)
    raw["experiments"]["resnet18"]["phases"][0]["epochs"] = 3  # a SIGTERM in the last epoch finishes it
    config = parse(raw)
    prepare_data(config, "resnet18")
    exp = config.experiment("resnet18")
    torch.manual_seed(0)
    torch.save(vision_model.build(exp, pretrained=False).state_dict(), weights)
    with monkeypatch.context() as patch:  # a SIGTERM as the phase starts: it leaves resume.pt
        patch.setattr(resume.StopSignal, "received", "SIGTERM", raising=False)
        patch.setattr(resume.StopSignal, "__init__", lambda self: None)
        with pytest.raises(Preempted):
            train(config, "resnet18", 0, "dense")
    torch.manual_seed(1)
    torch.save(vision_model.build(exp, pretrained=False).state_dict(), weights)  # other weights, same path

    train(config, "resnet18", 0, "dense")
    assert "model.weights replaced since" in capfd.readouterr().err
    train(config, "resnet18", 0, "dense", out=tmp_path / "fresh")
    out = paths.run_dir(config.options.output_dir, "resnet18", 0, "dense")
    a, b = (
        torch.load(paths.checkpoint(run), weights_only=True)["model"] for run in (out, tmp_path / "fresh")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_an_unreadable_resume_point_is_named_and_the_phase_starts_afresh(tmp_path, capfd, damage):
    """resume.pt is written atomically, so a damaged one is a disk's doing: it costs the phase's progress (one
    line says so), not the run, which before failed on it until someone deleted the file."""
    config = parse(tiny_vision_config(tmp_path, seeds=[0]))
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    train(config, "resnet18", 0, "sparse1", out=tmp_path / "fresh")
    out = paths.run_dir(config.options.output_dir, "resnet18", 0, "sparse1")
    out.mkdir(parents=True)
    data = bytearray(paths.checkpoint(tmp_path / "fresh").read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    paths.resume(out).write_bytes(bytes(data))
    train(config, "resnet18", 0, "sparse1")
    said = [line for line in capfd.readouterr().err.splitlines() if "resume.pt" in line]
    assert len(said) == 1 and said[0].endswith("; starting the phase afresh"), said
    assert not paths.resume(out).exists()  # the finished phase removed it
    a = torch.load(paths.checkpoint(out), weights_only=True)["model"]
    b = torch.load(paths.checkpoint(tmp_path / "fresh"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_init_checkpoint_of_another_spec_is_refused(tmp_path):
    raw = tiny_vision_config(tmp_path)
    config = parse(raw)
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    raw["experiments"]["resnet18"]["phases"][0]["lr"] = 0.04
    with pytest.raises(CheckpointError, match=r"trained for another spec .*phases\[0\]\.lr: 0.05 -> 0.04"):
        train(parse(raw), "resnet18", 0, "sparse1")


def test_a_mid_phase_resume_point_is_refused_as_a_finished_phase(tmp_path):
    """resume.pt carries the phase's identity too: only its unfinished position tells it from model.pt."""
    from dsd.engine import resume

    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    out = paths.run_dir(config.options.output_dir, "resnet18", 0, "dense")
    train(config, "resnet18", 0, "dense")
    state = checkpoint.load(paths.checkpoint(out))
    checkpoint.save(state | {"partial": {}}, paths.resume(out))  # what an interrupted phase leaves
    with pytest.raises(CheckpointError, match="resume.pt: a mid-phase resume point"):
        train(config, "resnet18", 0, "sparse1", init=paths.resume(out))
    assert resume.finished(paths.checkpoint(out))["phase"] == "dense"


def test_same_config_and_seed_twice_is_identical(tmp_path):
    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    first = train(config, "resnet18", 1, "dense", out=tmp_path / "a")
    second = train(config, "resnet18", 1, "dense", out=tmp_path / "b")
    assert strip(first) == strip(second)
    other_seed = train(config, "resnet18", 2, "dense", out=tmp_path / "c")
    assert strip(other_seed)["history"] != strip(first)["history"]


def test_bad_checkpoints_are_named(tmp_path):
    raw = tiny_vision_config(tmp_path)
    config = parse(raw)
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense", out=tmp_path / "dense")
    good = paths.checkpoint(tmp_path / "dense")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        checkpoint.load(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not a DSD checkpoint"):
        checkpoint.load(foreign)

    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "dsd-checkpoint", "obj": argparse.Namespace(code="runs on load")}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pt: refused, it needs pickled code"):
        checkpoint.load(pickled)

    raw["experiments"]["resnet18"]["model"] = {"arch": "vgg16", "size": "mini", "width": 4, "num_classes": 10}
    raw["experiments"]["resnet18"]["prune"] = {"exclude": ["features.0.weight"]}
    with pytest.raises(CheckpointError, match="trained for another spec"):
        train(parse(raw), "resnet18", 0, "sparse1", out=tmp_path / "sparse", init=good)


def test_non_finite_loss_stops_with_step_number(tmp_path):
    config = tiny_vision_config(tmp_path)
    config["experiments"]["resnet18"]["phases"][0]["lr"] = (
        1e30  # the first steps blow the weights up to inf/NaN
    )
    config = parse(config)
    prepare_data(config, "resnet18")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss .* at epoch 0, step \d+"):
        train(config, "resnet18", 0, "dense", out=out)
    assert not paths.metrics(out).exists() and not paths.checkpoint(out).exists()


def test_max_bad_batches_counts_the_non_finite_steps_of_the_whole_phase(tmp_path, monkeypatch):
    """`train.max_bad_batches: 1` skips one non-finite step in the phase: a second one, in the next epoch, stops
    it (the count started again at every epoch, so a long phase skipped one per epoch)."""
    from dsd.tracks.vision import metric

    raw = tiny_vision_config(tmp_path, seeds=[0])
    raw["experiments"]["resnet18"]["train"]["max_bad_batches"] = 1
    raw["experiments"]["resnet18"]["phases"][0]["epochs"] = 2
    config = parse(raw)
    prepare_data(config, "resnet18")
    real_loss, calls = metric.loss, []

    def loss_nan_at_each_epochs_first_step(*args):
        calls.append(None)
        value = real_loss(*args)
        return value * float("nan") if len(calls) in (1, 3) else value  # two steps per epoch

    monkeypatch.setattr(metric, "loss", loss_nan_at_each_epochs_first_step)
    with pytest.raises(NonFiniteLoss, match=r"at epoch 1, step 0"):
        train(config, "resnet18", 0, "dense", out=tmp_path / "run")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_loss_read_one_step_late_skips_a_non_finite_step_as_the_waiting_read_does(
    tmp_path, monkeypatch, optimizer
):
    """With a fused optimizer the trainer reads each step's loss one step late, and the optimizer skips a
    non-finite step on the device (`found_inf`): the same weights, optimizer state and epoch record as the
    read that waits for the forward pass and skips the step on the host (`train.max_bad_batches: 1`, the
    third step's loss made NaN)."""
    from dsd.engine import epoch
    from dsd.tracks.vision import metric

    raw = tiny_vision_config(tmp_path)
    raw["experiments"]["resnet18"]["train"] |= {
        "optimizer": optimizer,
        "max_bad_batches": 1,
        "max_steps_per_epoch": 4,
    }
    config = parse(raw)
    prepare_data(config, "resnet18")
    real_loss, calls, deferred = metric.loss, [], []

    def loss_nan_at_third_step(*args):
        calls.append(None)
        value = real_loss(*args)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(metric, "loss", loss_nan_at_third_step)
    real_defers, runs = epoch.defers_loss_read, {}

    def defers(state, mode):
        deferred.append(mode == "late" and real_defers(state))
        return deferred[-1]

    for mode in ("late", "waiting"):
        calls.clear()
        monkeypatch.setattr(epoch, "defers_loss_read", functools.partial(defers, mode=mode))
        out = tmp_path / mode
        metrics = train(config, "resnet18", 0, "dense", out=out)
        runs[mode] = (checkpoint.load(paths.checkpoint(out)), metrics)
    assert any(deferred)  # the late read ran (from the second step on)
    late, waiting = runs["late"][0], runs["waiting"][0]
    for name, value in waiting["model"].items():
        assert torch.equal(late["model"][name], value), name

    def records(run):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in run["history"]]

    assert records(late) == records(waiting)
    assert waiting["history"][0]["bad_batches"] == 1 and waiting["history"][0]["steps"] == 3
    late_state, waiting_state = late["optimizer"]["state"], waiting["optimizer"]["state"]
    for key, state in waiting_state.items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(late_state[key][field]), torch.as_tensor(value)), (key, field)


@pytest.mark.parametrize("optimizer, fused", [("sgd", True), ("adamw", True), ("rmsprop", None)])
def test_the_trainer_builds_fused_optimizers_where_torch_has_them(tmp_path, optimizer, fused):
    from dsd.engine.trainer import make_optimizer

    raw = tiny_vision_config(tmp_path)
    raw["experiments"]["resnet18"]["train"]["optimizer"] = optimizer
    exp = parse(raw).experiment("resnet18")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert make_optimizer(model, exp, 0.1).defaults.get("fused") is fused


def test_reduce_overhead_compiles_rows_with_changing_batch_shapes_in_the_default_mode(capsys):
    """CUDA graphs are recorded per batch shape: one `compile_mode` for a whole pipeline graphs the vision
    rows only, and each other row says in its log that it compiled in the default mode."""
    import dataclasses

    from dsd.config import load_config
    from dsd.engine.trainer import compile_mode

    config = load_config(REPO / "configs" / "default.yaml", check_models=False)
    options = dataclasses.replace(config.options, compile=True, compile_mode="reduce-overhead")
    modes = {
        row: compile_mode(options, config.experiment(row), 1)
        for row in ("resnet18", "deepspeech2", "neuraltalk")
    }
    assert modes == {"resnet18": "reduce-overhead", "deepspeech2": "default", "neuraltalk": "default"}
    assert "deepspeech2: compile_mode reduce-overhead needs fixed batch shapes" in capsys.readouterr().err
    plain = dataclasses.replace(options, compile_mode="default")
    assert compile_mode(plain, config.experiment("deepspeech2"), 1) == "default"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_untested_cuda_graphs_under_ddp_warning_is_one_line_per_job(rank):
    """Every DDP rank decides the same: rank 0 alone says it, as the other lines of a job's log."""
    code = (
        "import dataclasses; from dsd.config import load_config; from dsd.engine.trainer import compile_mode; "
        f"config = load_config({str(REPO / 'configs' / 'default.yaml')!r}, check_models=False); "
        "options = dataclasses.replace(config.options, compile=True, compile_mode='reduce-overhead'); "
        "print(compile_mode(options, config.experiment('resnet18'), 2))"
    )
    env = os.environ | {"RANK": rank}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.stdout == "reduce-overhead\n", result.stderr
    said = [line for line in result.stderr.splitlines() if "not been checked under DDP" in line]
    assert len(said) == (1 if rank == "0" else 0), result.stderr


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_state_from_a_channels_last_run_resumes_under_contiguous_weights(kind):
    """A checkpoint written where the weights were channels-last (a GPU) and resumed where they are not (a CPU
    for a net with a narrow strided 1x1 convolution): the next fused step is the one a channels-last resume
    takes. torch's fused CPU kernels pair weights and momentum by memory position, so the state is put in the
    weights' layout on loading (without it: SGD steps 2 apart)."""
    from dsd.engine.trainer import load_optimizer

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))

    def optimizer(params):
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
        return torch.optim.AdamW(params, lr=0.01, fused=True)

    images = torch.randn(2, 3, 10, 10)
    writer = net().to(memory_format=torch.channels_last)
    writer_optimizer = optimizer(writer.parameters())
    writer(images.contiguous(memory_format=torch.channels_last)).sum().backward()
    writer_optimizer.step()
    stepped = []
    for layout in (torch.channels_last, torch.contiguous_format):
        model = net().to(memory_format=layout)
        model.load_state_dict(writer.state_dict())
        resumed = optimizer(model.parameters())
        load_optimizer(resumed, copy.deepcopy(writer_optimizer.state_dict()))
        model(images.contiguous(memory_format=layout)).sum().backward()
        resumed.step()
        stepped.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        for param in model.parameters():
            assert all(
                v.stride() == param.stride() for v in resumed.state[param].values() if v.shape == param.shape
            )
    torch.testing.assert_close(stepped[1], stepped[0])


def test_a_checkpoint_optimizer_state_loads_into_this_build_implementation():
    """Momentum and settings come from the checkpoint; fused or not is this device's, whatever wrote it."""
    from dsd.engine.trainer import load_optimizer

    model = torch.nn.Linear(3, 2)
    old = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, foreach=False
    )  # as an older version wrote
    model(torch.ones(1, 3)).sum().backward()
    old.step()
    fused = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, fused=True)
    load_optimizer(fused, old.state_dict())
    group = fused.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None and group["lr"] == 0.1
    assert torch.equal(
        fused.state[model.weight]["momentum_buffer"], old.state[model.weight]["momentum_buffer"]
    )


def test_data_prepared_with_other_settings_is_refused_naming_the_setting(tmp_path):
    """Two configs sharing a data_root: the marker holds the other one's data set; training must not read it."""
    from dsd.engine import prepare

    config = tiny_vision_config(tmp_path)
    prepare_data(parse(config), "resnet18")
    config["experiments"]["resnet18"]["data"]["generate"]["per_class"]["train"] = 9
    with pytest.raises(DataError, match=r"prepared with other settings \(.*per_class.train: 6 -> 9"):
        prepare.data_fingerprint(parse(config).experiment("resnet18"))


def test_image_features_refuse_an_encoder_checkpoint_of_another_spec(tmp_path):
    """NeuralTalk's frozen CNN is the resnet18 row's dense run: one trained with other settings must not be
    encoded from and labelled with this config's encoder."""
    from conftest import dsd_cli, write_config

    raw = tiny_vision_config(tmp_path, seeds=[0])
    raw["experiments"]["neuraltalk"] = {
        "track": "captioning", "dataset": "scenes", "model": {"embed_dim": 8, "hidden_dim": 8},
        "data": {"encoder_row": "resnet18", "encoder_seed": 0, "image_size": 32, "scenes_image_size": 32,
                 "scenes_splits": [6, 2, 2], "min_count": 1},
        "phases": [{"kind": "dense", "epochs": 1, "lr": 0.01}],
    }  # fmt: skip
    config = parse(raw)
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    raw["experiments"]["resnet18"]["phases"][0]["lr"] = 0.04
    result = dsd_cli("features", "--config", str(write_config(tmp_path, raw)), "--row", "neuraltalk")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "not resnet18 seed 0's dense run of this config (phases[0].lr: 0.05 -> 0.04)" in result.stderr


def test_a_phase_resumed_with_loader_workers_replays_dropout_exactly(tmp_path, monkeypatch):
    """With DataLoader workers (a persistent loader) a mid-epoch resume starts the workers afresh: their base
    seed must not come from torch's global generator, or every dropout mask after the resume is another one
    (mini VGG-16 has dropout; SIGTERM sent to this process in the first step, resumed in-process)."""
    import os

    from dsd.errors import Preempted
    from dsd.tracks.vision import metric

    raw = tiny_vision_config(tmp_path, seeds=[0], workers=1)
    exp = raw["experiments"]["resnet18"]
    exp["model"] |= {"arch": "vgg16", "dropout": 0.5}
    exp["prune"]["exclude"] = ["first_conv"]
    exp["train"]["max_steps_per_epoch"] = 3
    exp["phases"][0]["epochs"] = 2
    exp["data"]["generate"] = {"per_class": {"train": 5, "val": 1, "test": 1}}
    config = parse(raw)
    prepare_data(config, "resnet18")
    reference = train(config, "resnet18", 0, "dense", out=tmp_path / "reference")
    real_loss, calls = metric.loss, []

    def loss_then_sigterm(*args):
        calls.append(None)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args)

    monkeypatch.setattr(metric, "loss", loss_then_sigterm)
    out = tmp_path / "preempted"
    with pytest.raises(Preempted, match="at epoch 0, step 1"):
        train(config, "resnet18", 0, "dense", out=out)
    monkeypatch.setattr(metric, "loss", real_loss)
    assert strip(train(config, "resnet18", 0, "dense", out=out)) == strip(reference)
    a, b = (checkpoint.load(paths.checkpoint(d)) for d in (out, tmp_path / "reference"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_resume_point_keeps_the_jobs_own_gpu_generator_not_every_visible_ones():
    """Resume points held one CUDA generator state per visible GPU, restored to as many: one written where 8
    GPUs were visible failed (IndexError) where its resume saw 1, and a CPU job started CUDA to read them. Now
    the job's own GPU's state; an older list gives its first (rank 0's own GPU under dsd.gpus)."""
    from dsd.engine import resume

    assert set(resume.rng_state()) == {"cpu"} and not torch.cuda.is_initialized()  # a CPU job: no CUDA
    first, second = torch.zeros(816, dtype=torch.uint8), torch.ones(816, dtype=torch.uint8)
    assert resume.own_gpu_state(first) is first
    assert resume.own_gpu_state([first, second]) is first
