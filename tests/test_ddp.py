"""DSD under DistributedDataParallel (and FSDP): two gloo processes on the CPU against one process, same global batch."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import (
    evaluate,
    leave_process_group,
    parse,
    prepare_data,
    snakemake,
    tiny_vision_config,
    write_config,
)
from conftest import train as train_phase
from torch import nn

import dsd
from dsd import gpus, paths
from dsd.core.masks import shaped_state

STEPS, GLOBAL_BATCH = 12, 16


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 10, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))
        for _ in range(STEPS)
    ]


def train(model, optimizer, pruner, data, wrapped=None):
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy((wrapped or model)(x), y).backward()
        optimizer.step()
        pruner.step(optimizer)


def rank_main(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    pruner = dsd.Pruner(model, 0.5)  # the wrapped module: same weights on every rank -> same masks
    per_rank = GLOBAL_BATCH // world
    shard = [
        (x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank])
        for x, y in batches()
    ]
    train(model, optimizer, pruner, shard, wrapped=ddp)
    masks = [None] * world
    dist.all_gather_object(masks, {n: m.tolist() for n, m in pruner.masks.items()})
    if rank == 0:
        torch.save({"masks": masks, "model": model.state_dict()}, out_file)
    leave_process_group()


def test_two_rank_ddp_matches_single_process(tmp_path):
    mp.spawn(rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    result = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert result["masks"][0] == result["masks"][1]  # identical masks on both ranks

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    pruner = dsd.Pruner(model, 0.5)
    train(model, optimizer, pruner, batches())
    for name, value in model.state_dict().items():
        # DDP averages the two half-batch gradients = the full-batch mean gradient, up to float32 summation
        # order: 1e-5 absolute after 12 momentum steps
        torch.testing.assert_close(result["model"][name], value, atol=1e-5, rtol=0)
    for name, mask in pruner.masks.items():
        assert torch.all(result["model"][name][~mask] == 0)


def make_odd_model():
    """Its middle layer's 7 rows shard 4 + 3 over two ranks, as FSDP2 does with an uneven dim 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 7), nn.Tanh(), nn.Linear(7, 4))


FSDP_OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=1e-3),
}


def fsdp2_main(rank, world, init_file, out_file):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh, result = init_device_mesh("cpu", (world,)), {}
    for kind, make_optimizer in FSDP_OPTIMIZERS.items():
        model = make_odd_model()
        for layer in model[::2]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = make_optimizer(model.parameters())
        pruner = dsd.Pruner(model, 0.5)
        train(model, optimizer, pruner, [(x[rank::world], y[rank::world]) for x, y in batches()])
        state = pruner.state_dict()
        resumed, params = dsd.Pruner.from_state_dict(model, state), dict(model.named_parameters())
        result[kind] = {
            "masks": {n: m.full_tensor() for n, m in pruner.masks.items()},
            "weights": {n: p.full_tensor() for n, p in params.items()},
            "state": {n: [t.full_tensor() for t in shaped_state(optimizer, params[n])] for n in pruner.masks},
            "state_dict": state,
            "resumed": {n: m.full_tensor() for n, m in resumed.masks.items()},
            "sparsity": pruner.sparsity(),
        }
    if rank == 0:
        torch.save(result, out_file)
    leave_process_group()


def test_an_fsdp2_model_gets_the_unsharded_models_masks(tmp_path):
    """fully_shard (FSDP2) shards each weight on dim 0: the masks rank each whole weight, as the unsharded
    model's do (ranking per shard would keep each shard's own largest entries), pruned weights and optimizer
    state stay exactly zero, and the state dict holds whole masks that resume sharded or not."""
    mp.spawn(fsdp2_main, args=(2, str(tmp_path / "init"), str(tmp_path / "fsdp2.pt")), nprocs=2, join=True)
    result = torch.load(tmp_path / "fsdp2.pt", weights_only=True)
    unsharded = dsd.Pruner(make_odd_model(), 0.5)
    for kind, run in result.items():
        assert run["masks"].keys() == unsharded.masks.keys() == {"0.weight", "2.weight", "4.weight"}
        for name, mask in unsharded.masks.items():
            assert torch.equal(run["masks"][name], mask) and torch.equal(run["resumed"][name], mask), kind
            assert run["weights"][name][~mask].eq(0).all() and run["weights"][name][mask].ne(0).all(), kind
            assert run["state"][name] and all(t[~mask].eq(0).all() for t in run["state"][name]), kind
            assert run["sparsity"][name] == (~mask).sum() / mask.numel(), kind
        saved, expected = run["state_dict"], unsharded.state_dict()
        assert saved["shapes"] == expected["shapes"]
        assert all(torch.equal(saved["masks"][n], packed) for n, packed in expected["masks"].items()), kind
        portable = dsd.Pruner.from_state_dict(make_odd_model(), saved)
        assert all(torch.equal(portable.masks[n], m) for n, m in unsharded.masks.items()), kind


def old_fsdp_main(rank, world, init_file, out_file):
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    recipe = [
        {"kind": "dense", "epochs": 1, "lr": 0.1},
        {"kind": "sparse", "epochs": 1, "lr": 0.1, "sparsity": 0.5},
    ]
    errors = []
    for use_orig_params in (False, True):
        model = FullyShardedDataParallel(make_odd_model(), use_orig_params=use_orig_params, device_id="cpu")
        for prune, args in ((dsd.Pruner, (model, 0.5)), (dsd.DSD, (model, None, recipe, 1))):
            try:
                prune(*args)
                errors.append(None)
            except ValueError as error:
                errors.append(str(error))
    torch.save(errors, f"{out_file}.{rank}")
    leave_process_group()


def test_the_older_fully_sharded_data_parallel_is_refused(tmp_path):
    """FullyShardedDataParallel's flat parameters hide each weight's shape (every weight was silently left
    dense): the Pruner and the driver refuse it, naming fully_shard instead."""
    mp.spawn(old_fsdp_main, args=(1, str(tmp_path / "init"), str(tmp_path / "errors")), nprocs=1, join=True)
    errors = torch.load(tmp_path / "errors.0")
    assert len(errors) == 4 and all(
        e and "FullyShardedDataParallel" in e and "fully_shard" in e for e in errors
    )


def zero_main(rank, world, init_file, out_file):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(model.parameters(), torch.optim.Adam, lr=0.01)
    dense = dsd.Pruner(model, 0.0)  # masks nothing: dense steps give Adam state at every entry
    train(model, optimizer, dense, batches()[:3], wrapped=ddp)
    pruner = dsd.Pruner(model, 0.5)
    train(model, optimizer, pruner, batches()[3:], wrapped=ddp)
    params = dict(model.named_parameters())
    moments = {n: optimizer.optim.state[params[n]] for n in pruner.masks}  # this rank's shard: all of them
    state = {n: [moments[n][k].clone() for k in ("exp_avg", "exp_avg_sq")] for n in pruner.masks}
    torch.save(({n: m.clone() for n, m in pruner.masks.items()}, state), out_file)
    leave_process_group()


def test_the_state_a_zero_redundancy_optimizer_holds_is_masked(tmp_path):
    """ZeroRedundancyOptimizer keeps each rank's state in the optimizer it wraps (`.optim`), its own `.state`
    empty: Adam's moments at pruned entries were never zeroed, so re-dense did not restart them from zero."""
    mp.spawn(zero_main, args=(1, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=1, join=True)
    masks, state = torch.load(tmp_path / "out")
    for name, mask in masks.items():
        assert all(torch.all(t[~mask] == 0) for t in state[name]), name


LOSSES = {0: [float("nan"), 0.5, 2.0], 1: [1.5, float("inf"), 3.0]}  # per rank, step by step


def loss_read_main(rank, world, init_file, out_file):
    from dsd.engine.distributed import step_flags
    from dsd.engine.epoch import LossRead

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    losses = [torch.tensor(loss) for loss in LOSSES[rank]]
    flags = [step_flags(loss, False, world) for loss in losses]
    seen = [
        LossRead(loss, flag, step).read() for step, (loss, flag) in enumerate(zip(losses, flags, strict=True))
    ]
    torch.save((seen, [float(flag[0]) for flag in flags]), f"{out_file}.{rank}")  # found_inf of the optimizer
    leave_process_group()


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The trainer skips a step whose loss is not finite (`train.max_bad_batches`): under DDP every rank must
    skip the same steps, or their gradient all-reduces pair different steps."""
    out = tmp_path / "seen"
    mp.spawn(loss_read_main, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    for rank in (0, 1):
        seen, flags = torch.load(f"{out}.{rank}", weights_only=True)
        assert [finite for _, finite, _ in seen] == [False, False, True] and flags == [1.0, 1.0, 0.0], rank
        assert seen[1 - rank][0] == LOSSES[rank][1 - rank] and seen[2][0] == LOSSES[rank][2]  # its own loss


def test_a_job_asking_for_two_gpus_trains_as_two_ranks(tmp_path):
    """`gpus_per_job: 2` starts each phase as two ranks: here two gloo ranks on the CPU, rank 0 writing."""
    config = tiny_vision_config(tmp_path, seeds=[0], gpus_per_job=2)
    exp = config["experiments"]["resnet18"]  # steps enough for the ranks' BatchNorm statistics to part
    exp["data"]["generate"]["per_class"]["train"] = 13
    exp["train"]["max_steps_per_epoch"] = 8
    target = paths.metrics(paths.run_dir(config["output_dir"], "resnet18", 0, "sparse1"))
    result = snakemake(tmp_path, write_config(tmp_path, config), str(target), "--resources", "gpu=2")
    assert result.returncode == 0, result.stderr[-3000:]
    for phase in ("dense", "sparse1"):
        metrics = json.loads(
            paths.metrics(paths.run_dir(config["output_dir"], "resnet18", 0, phase)).read_text()
        )
        assert metrics["world_size"] == 2
    assert abs(metrics["measured_sparsity"] - 0.3) < 0.01
    # the per-epoch validation ran sharded over the two ranks, counts summed: the same figures as one process
    # scoring the final checkpoint on the whole split
    whole = evaluate(parse(config), "resnet18", 0, "sparse1", splits=("val",))["val"]
    sharded = metrics["history"][-1]["val"]
    assert (sharded["top1_error_pct"], sharded["top5_error_pct"]) == (
        whole["top1_error_pct"],
        whole["top5_error_pct"],
    )
    # float32 logits of other batch shapes part the losses by about 1e-7; rank 1 scoring its shard with its
    # own BatchNorm statistics instead of the checkpoint's (rank 0's), by 3e-6 in this run
    assert sharded["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def gather_main(rank, world, init_file, out_dir):
    from dsd.engine.distributed import gather_strided

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    merged = gather_strided([f"item{i}" for i in range(rank, 7, world)])  # the eval loader's shard of 7 items
    torch.save(merged, f"{out_dir}/rank{rank}.pt")
    leave_process_group()


def test_per_item_outcomes_of_a_sharded_evaluation_come_back_in_the_splits_order(tmp_path):
    """Three ranks, seven items (uneven shards): every rank gets all items once, in order, so that DSD's and
    the control's outcomes pair item by item whatever the world size was."""
    mp.spawn(gather_main, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        assert torch.load(tmp_path / f"rank{rank}.pt") == [f"item{i}" for i in range(7)]


def slow_upload_main(rank, world, init_file, config, wait_s):
    """A phase's rank in a process group whose collectives time out after `wait_s`, rank 0's upload of the
    checkpoint (`wandb.checkpoints`) taking longer: a network slower than NCCL's 10 minutes."""
    from datetime import timedelta

    from dsd.tracking import Tracker

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    timeout = timedelta(seconds=wait_s)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout
    )
    if rank == 0:
        Tracker.artifact = lambda self, *args, **kwargs: time.sleep(2 * wait_s)
    torch.set_num_threads(1)
    train_phase(config, "resnet18", 0, "dense")
    os._exit(0)  # as `python -m dsd` ends (dsd.__main__)


def test_the_other_ranks_wait_out_rank_0s_checkpoint_upload_without_a_timeout(tmp_path):
    """The ranks end together once rank 0 has written and uploaded its last files, waiting on the rendezvous
    store: waiting at a barrier, a rank failed the job once the upload outlasted the group's timeout."""
    config = parse(tiny_vision_config(tmp_path, seeds=[0], wandb={"mode": "disabled", "checkpoints": True}))
    prepare_data(config, "resnet18")
    mp.spawn(slow_upload_main, args=(2, str(tmp_path / "init"), config, 5), nprocs=2, join=True)
    out = paths.run_dir(config.options.output_dir, "resnet18", 0, "dense")
    assert json.loads(paths.metrics(out).read_text())["world_size"] == 2


def too_large_batch_main(rank, world, init_file, config, out_file):
    from dsd.errors import ConfigError

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        train_phase(config, "resnet18", 0, "dense")
        outcome = "trained"
    except ConfigError as err:
        outcome = str(err)
    torch.save(outcome, f"{out_file}.{rank}")
    leave_process_group()


def test_a_training_split_smaller_than_the_global_batch_is_refused_under_ddp(tmp_path):
    """Under DDP an epoch drops its incomplete last batch; a split smaller than the global batch is nothing but
    that batch, so the phase trained no step and wrote its untrained weights as model.pt (train loss 0.0)."""
    config = tiny_vision_config(tmp_path, seeds=[0])
    config["experiments"]["resnet18"]["train"]["batch_size"] = 64  # 60 training images
    config = parse(config)
    prepare_data(config, "resnet18")
    out = tmp_path / "outcome"
    mp.spawn(too_large_batch_main, args=(2, str(tmp_path / "init"), config, str(out)), nprocs=2, join=True)
    for rank in (0, 1):
        assert "fewer items than one global batch of 64" in torch.load(f"{out}.{rank}"), rank
    assert not paths.checkpoint(paths.run_dir(config.options.output_dir, "resnet18", 0, "dense")).exists()


def end_twice_main(rank, world, init_file, out_file):
    from dsd.engine.distributed import end_together

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    waited = []
    for _ in range(2):  # two phases in one process group: rank 0 the slower to finish each
        start = time.monotonic()
        if rank == 0:
            time.sleep(1.0)
        end_together(rank, world)
        waited.append(time.monotonic() - start)
    torch.save(waited, f"{out_file}.{rank}")
    leave_process_group()


def test_the_ranks_wait_for_rank_0_at_the_end_of_every_phase_not_only_the_first(tmp_path):
    """Each phase's end has keys of its own in the store: a key left set by the first phase let the ranks of a
    second one leave before rank 0 had written its files."""
    out = tmp_path / "waited"
    mp.spawn(end_twice_main, args=(3, str(tmp_path / "init"), str(out)), nprocs=3, join=True)
    for rank in (1, 2):
        assert all(seconds >= 0.9 for seconds in torch.load(f"{out}.{rank}")), rank


def build_first_main(rank, world, init_file, cache):
    from dsd.engine.distributed import rank_zero_first

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def build():  # a cache: built by whoever finds it missing
        if not Path(cache).exists():
            time.sleep(1.0)  # slow enough that ranks starting together would all find it missing
            with open(cache, "a") as f:
                f.write(f"built by rank {rank}\n")

    rank_zero_first(build, rank, world)
    leave_process_group()


def test_a_cache_the_training_job_builds_is_built_by_rank_0_alone(tmp_path):
    """A speech row whose features differ from the prepared ones builds them on first use: every rank used to
    build the same cache at once (each with a process per core); rank 0 builds it, the others then find it."""
    cache = tmp_path / "cache"
    mp.spawn(build_first_main, args=(3, str(tmp_path / "init"), str(cache)), nprocs=3, join=True)
    assert cache.read_text() == "built by rank 0\n"


def test_a_command_other_than_train_started_as_several_ranks_is_refused(tmp_path):
    """`torchrun -m dsd run` would prepare the data, evaluate and write eval.json in every rank at once: refused
    in one line, nothing written; `dsd train` is the command that runs as DDP ranks."""
    config = write_config(tmp_path, tiny_vision_config(tmp_path, seeds=[0]))
    command = [
        sys.executable,
        "-m",
        "dsd",
        "run",
        "--config",
        str(config),
        "--row",
        "resnet18",
        "--seed",
        "0",
    ]
    env = os.environ | {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    job = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert job.returncode == 2 and job.stderr.count("\n") == 1, job.stderr
    assert "dsd run runs as one process, not as 2 ranks" in job.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()


def test_each_rank_draws_its_own_dropout_masks_and_one_process_the_stream_it_always_had():
    """Under DDP the ranks' slices of a global batch get masks of their own (they repeated each other's); one
    process's epoch seed is unchanged, so no single-process result moves."""
    from dsd.engine.epoch import seed_dropout
    from dsd.engine.loaders import epoch_seed

    def masks(rank, world):
        seed_dropout(3, (0, 1), 2, rank, world)
        return nn.functional.dropout(torch.ones(256), 0.5)

    assert not torch.equal(masks(0, 2), masks(1, 2)) and not torch.equal(masks(0, 2), masks(0, 1))
    one_process = masks(0, 1)
    torch.manual_seed(epoch_seed(3, 0, 1, 2))
    assert torch.equal(one_process, nn.functional.dropout(torch.ones(256), 0.5))


# ------------------------------------------------------------ a phase job's ranks, started as Snakemake does


def slow_dense_config(tmp, epochs=2, val_per_class=3, steps=8, arch="resnet18"):
    """A dense phase of `epochs` epochs of `steps` steps: long enough to be signalled in a chosen epoch."""
    config = tiny_vision_config(tmp, seeds=[0])
    exp = config["experiments"]["resnet18"]
    exp["model"]["arch"] = arch
    exp["prune"]["exclude"] = []  # a dense phase: nothing pruned
    train = (steps * 16 + 9) // 10  # images per class: `steps` batches of 16, the last one complete
    exp["data"]["generate"] = {"per_class": {"train": train, "val": val_per_class, "test": 3}}
    exp["train"]["max_steps_per_epoch"] = steps
    exp["phases"][0]["epochs"] = epochs
    config = parse(config)
    prepare_data(config, "resnet18")
    return config


def start_job(config, out, *prefix) -> subprocess.Popen:
    """The dense phase as `train_phase` runs it with gpus_per_job: 2 (`dsd.gpus 2 --dsd -- train ...`), in a
    process group of its own (as a terminal's foreground job)."""
    spec = config.phase("resnet18", 0, "dense")
    train = ["train", "--spec", spec.to_json(), "--options", config.options.to_json(), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    command = [sys.executable, gpus.__file__, "2", *prefix, "--dsd", "--", *train]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def wait_for_line(process: subprocess.Popen, text: str) -> list[str]:
    """The job's log up to the first line containing `text` (the job keeps writing to the pipe)."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the job ended before {text!r}:\n{''.join(lines)[-3000:]}")


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_ddp_job_says_once_that_its_resume_point_is_unreadable(tmp_path):
    """Every rank reads the resume point and comes to the same conclusion: rank 0 alone says it."""
    out = tmp_path / "run"
    out.mkdir()
    paths.resume(out).write_bytes(b"not a checkpoint")
    job = start_job(slow_dense_config(tmp_path, epochs=1, steps=2), out)
    log = job.communicate(timeout=300)[1]
    assert job.returncode == 0, log[-3000:]
    assert log.count("not a checkpoint; starting the phase afresh") == 1, log


def test_a_signal_in_the_last_epoch_of_a_ddp_job_finishes_the_phase(tmp_path):
    """SIGTERM to the job (its top process, as Snakemake and SLURM send it) during the last epoch's last step
    or validation: both ranks finish the phase and the job succeeds, so Snakemake keeps model.pt and
    metrics.json."""
    out = tmp_path / "run"
    job = start_job(slow_dense_config(tmp_path, epochs=1.125, val_per_class=10), out)  # epoch 2: one step
    wait_for_line(job, "dense epoch 1/2")
    while not paths.resume(out).exists():  # epoch 1's resume point written: epoch 2 under way
        time.sleep(0.005)
    job.send_signal(signal.SIGTERM)
    log = job.communicate(timeout=300)[1]
    assert job.returncode == 0, log[-3000:]
    assert log.count("SIGTERM in the last epoch: finishing dense") == 1, log[-3000:]
    assert log.count("dense epoch 2/2:") == 1 and "dense epoch 1/2:" not in log  # rank 0's lines alone
    assert paths.metrics(out).exists() and not paths.resume(out).exists()
    assert len(json.loads(paths.metrics(out).read_text())["history"]) == 2


def test_killing_a_ddp_job_ends_its_ranks_before_its_gpus_are_free(tmp_path):
    """kill -9 of the job's top process: no rank may go on training (and writing into the run folder) once
    another job can lock its GPUs."""
    locks = tmp_path / "locks"
    job = start_job(slow_dense_config(tmp_path), tmp_path / "run", "--total", "2", "--lock-dir", str(locks))
    wait_for_line(job, "dense epoch 1/2")
    ranks = children(job.pid)
    assert len(ranks) == 2
    job.kill()
    job.wait()
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        assert gpus.acquire(2, total=2, lock_dir=locks, timeout=60) == [0, 1]
        assert not any(alive(rank) for rank in ranks)
    finally:
        gpus.release()
    # its rendezvous folder, which it could not remove, goes when the next DDP job starts
    left = list(Path(tempfile.gettempdir()).glob(f"{gpus.RENDEZVOUS_PREFIX}{job.pid}-*"))
    assert len(left) == 1
    gpus.remove_stale_rendezvous()
    assert not left[0].exists()


def stopped_at(log: str) -> dict:
    """The position rank 0's "checkpointed" line names ("at epoch E, step S")."""
    (line,) = [line for line in log.splitlines() if "checkpointed dense" in line]
    epoch, step = re.search(r"at epoch (\d+), step (\d+)", line).groups()
    return {"sub": 0, "epoch": int(epoch), "step": int(step)}


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    """SIGTERM reaches rank 1 alone (signals reach ranks at different steps): both ranks stop at the same
    step, rank 0 writes that step's resume point and alone says so, and no rank crashes."""
    out = tmp_path / "run"
    job = start_job(slow_dense_config(tmp_path, epochs=3, steps=24), out)
    wait_for_line(job, "dense epoch 1/3")
    rank1 = children(job.pid)[1]  # started second
    while not paths.resume(out).exists():  # epoch 2 under way
        time.sleep(0.005)
    os.kill(rank1, signal.SIGTERM)
    log = job.communicate(timeout=300)[1]
    assert job.returncode == 2, log[-3000:]
    assert "Traceback" not in log and log.count("checkpointed") == 1, log[-3000:]
    assert torch.load(paths.resume(out), weights_only=True)["position"] == stopped_at(log)


def test_ctrl_c_to_a_ddp_job_checkpoints_every_rank_at_one_step(tmp_path):
    """A terminal's Ctrl-C reaches the job's whole process group. The prefix forwards it to its ranks, so a
    rank in that group got it twice, and took the second for the "again: stop at once" Ctrl-C: no checkpoint.
    Ranks have a process group of their own: one Ctrl-C, one checkpoint, exit status 130."""
    out = tmp_path / "run"
    job = start_job(slow_dense_config(tmp_path, epochs=3, steps=24), out)
    wait_for_line(job, "dense epoch 1/3")
    while not paths.resume(out).exists():  # epoch 2 under way
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGINT)
    log = job.communicate(timeout=300)[1]
    assert job.returncode == 130, log[-3000:]
    assert "Traceback" not in log and log.count("SIGINT: checkpointed dense") == 1, log[-3000:]
    assert torch.load(paths.resume(out), weights_only=True)["position"] == stopped_at(log)


def test_a_ddp_phase_resumed_mid_epoch_records_the_uninterrupted_runs_epochs(tmp_path):
    """SIGTERM mid-epoch, then a rerun: the weights and every epoch's record, the interrupted epoch's train
    loss included (the mean over both ranks' steps), are those of the run that was not interrupted. A net with
    dropout, each rank drawing its own masks: every rank resumes its own generator's stream."""
    config = slow_dense_config(tmp_path, epochs=3, steps=24, arch="googlenet")
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert start_job(config, reference).wait(timeout=300) == 0
    job = start_job(config, out)
    wait_for_line(job, "dense epoch 1/3")
    while not paths.resume(out).exists():  # epoch 2 under way
        time.sleep(0.005)
    job.send_signal(signal.SIGTERM)
    log = job.communicate(timeout=300)[1]
    assert job.returncode == 2 and stopped_at(log)["step"] > 0, log[-3000:]
    assert start_job(config, out).wait(timeout=300) == 0

    def records(run):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in torch.load(run)["history"]]

    resumed, uninterrupted = records(paths.checkpoint(out)), records(paths.checkpoint(reference))
    for epoch in resumed:
        epoch["train_loss"] = pytest.approx(epoch["train_loss"], rel=1e-12, abs=0)
    assert resumed == uninterrupted
    a, b = (torch.load(paths.checkpoint(run), weights_only=True)["model"] for run in (out, reference))
    assert all(torch.equal(a[name], b[name]) for name in a)
