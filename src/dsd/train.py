"""Train one phase of a recipe, from the previous phase's checkpoint to this phase's checkpoint + metrics.

A phase is a flat loop: seed -> model -> (resume | init) -> epochs of steps (optimizer step, then
`pruner.step`) -> per-epoch validation and resume checkpoint -> final test evaluation. The `control` phase
runs every post-dense phase's epochs and learning rates without pruning, in one job.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from dsd import checkpoint, paths, tracks
from dsd.config import Experiment
from dsd.data import epoch_seed
from dsd.errors import NonFiniteLoss, Preempted
from dsd.masks import Pruner
from dsd.schedule import CONTROL, Phase, lr_at
from dsd.tracking import Tracker


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, exp: Experiment, lr: float) -> torch.optim.Optimizer:
    hp = exp.train
    params = [p for p in model.parameters() if p.requires_grad]
    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
        )
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    raise ValueError(f"unknown optimizer {hp.optimizer!r}")


def phases_of(exp: Experiment, name: str) -> tuple[int, tuple[Phase, ...]]:
    """(index of the phase in the recipe, the phases this job trains)."""
    recipe = exp.recipe
    if name == CONTROL:
        return len(recipe.phases), recipe.control_phases()
    recipe = recipe.resolve(name)  # a sparsity-sweep variant shares the dense phase, so the same data order
    return recipe.names.index(recipe[name].name), (recipe[name],)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class _StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption) ask the loop to checkpoint at the next step and exit."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _distributed_setup(exp: Experiment) -> tuple[torch.device, int, int]:
    """Under torchrun: join the process group (NCCL on CUDA, gloo on the CPU). Returns (device, rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return resolve_device(exp.device), 0, 1
    device = resolve_device(exp.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, torch.distributed.get_rank(), world


def _mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / world


def run_phase(
    exp: Experiment, seed: int, phase: str, out_dir: str | Path, init: str | Path | None = None, progress=None
) -> dict:
    """Train `phase` for run `seed`; resumes from `out_dir/resume.pt` when a previous attempt left one.

    Under torchrun every rank trains its shard of each global batch (DDP); masks are a function of the
    weights, identical on every rank, and re-applied on every rank; rank 0 alone writes files and wandb.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    track = tracks.get(exp.track)
    track.check(exp)
    recipe_index, phases = phases_of(exp, phase)
    if init is None and recipe_index != 0:
        raise ValueError(f"phase {phase!r} starts from the previous phase's checkpoint: pass init")
    device, rank, world = _distributed_setup(exp)
    lead = rank == 0
    if device.type == "cpu":
        torch.set_num_threads(exp.threads)
    torch.manual_seed(epoch_seed(seed))
    model = track.build_model(exp).to(device)
    if device.type == "cuda" and exp.track == "vision":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, exp, phases[0].lr)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and exp.train.amp)
    pruner: Pruner | None = None
    history: list[dict] = []
    position = {"sub": 0, "epoch": 0, "step": 0}
    partial: dict = {}  # accumulators of an epoch interrupted by a signal
    resume_path = paths.resume(out_dir)

    if resume_path.exists():
        state = checkpoint.load(resume_path)
        checkpoint.load_model(model, state, resume_path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if state.get("pruner") is not None:
            pruner = Pruner.from_state_dict(model, state["pruner"])
        history, position, partial = state["history"], state["position"], state.get("partial") or {}
    elif init is not None:
        state = checkpoint.load(init)
        checkpoint.load_model(model, state, init)
        optimizer.load_state_dict(state["optimizer"])  # momentum carries over; LR is set per step below
        if state.get("pruner") is not None:  # coming out of a sparse phase: drop the mask (re-dense)
            Pruner.from_state_dict(model, state["pruner"]).remove(optimizer)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )

    tracker = Tracker(
        exp.wandb.mode if lead else "disabled",
        exp.wandb.project,
        exp.wandb.entity,
        paths.wandb_dir(exp.output_dir),
        group=f"{exp.row}-seed{seed}",
        job_type=phase,
        name=f"{exp.row}-seed{seed}-{phase}",
        config={"experiment": json.loads(exp.to_json()), "seed": seed, "phase": phase},
    )
    started = time.time()
    global_step = sum(h.get("steps", 0) for h in history) + partial.get("count", 0)
    hp = exp.train

    def save_resume(pos: dict, extra: dict | None = None) -> None:
        if lead:
            state = _state(exp, phase, model, optimizer, scaler, pruner, history, pos)
            checkpoint.save(state | {"partial": extra or {}}, resume_path)

    with _StopSignal() as stop:
        for sub in range(position["sub"], len(phases)):
            current = phases[sub]
            if current.prunes and pruner is None:
                pruner = Pruner(model, current.sparsity, exclude=exp.prune.exclude, include=exp.prune.include)
                pruner.step(optimizer)  # no stale momentum at pruned entries from the dense phase
                tracker.histograms(model, list(pruner.masks)[:4], step=global_step)
            steps_per_epoch = len(track.train_loader(exp, seed=0, epoch=0))
            if hp.max_steps_per_epoch:
                steps_per_epoch = min(steps_per_epoch, hp.max_steps_per_epoch)
            total = math.ceil(current.epochs * steps_per_epoch)
            n_epochs = math.ceil(current.epochs)
            first_epoch = position["epoch"] if sub == position["sub"] else 0
            # The control replays the data order of the DSD phase it stands in for (a paired comparison).
            order_key = (sub + 1, 0) if phase == CONTROL else (recipe_index, sub)
            for epoch in range(first_epoch, n_epochs):
                torch.manual_seed(
                    epoch_seed(seed, *order_key, epoch)
                )  # augmentation and dropout of this epoch
                skip = position["step"] if (sub, epoch) == (position["sub"], position["epoch"]) else 0
                batches = track.train_loader(
                    exp, seed=epoch_seed(seed, *order_key), epoch=epoch, skip_batches=skip
                )
                if (
                    skip
                ):  # mid-epoch resume: continue the random streams exactly where the signal stopped them
                    torch.set_rng_state(partial["rng"]["cpu"])
                    if "cuda" in partial["rng"] and torch.cuda.is_available():
                        torch.cuda.set_rng_state_all(partial["rng"]["cuda"])
                loss_sum, count, bad = (
                    (partial.get(k, 0) for k in ("loss_sum", "count", "bad")) if skip else (0.0, 0, 0)
                )
                seconds_before = partial.get("seconds", 0.0) if skip else 0.0
                budget = min(steps_per_epoch, total - epoch * steps_per_epoch)
                trained.train()
                label = current.name if phase != CONTROL else f"control:{current.name}"
                bar = tqdm(
                    total=budget,
                    initial=skip,
                    desc=f"{exp.row} s{seed} {label} ep{epoch + 1}/{n_epochs}",
                    unit="step",
                    leave=False,
                    disable=progress is False or not lead,
                    mininterval=2.0,
                )
                epoch_start = time.time()
                for step, batch in enumerate(batches, start=skip):
                    if step >= budget:
                        break
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(current.lr, epoch * steps_per_epoch + step, total, hp.lr_schedule)
                    autocast = (
                        torch.autocast("cuda", dtype=torch.float16) if scaler.is_enabled() else nullcontext()
                    )
                    with autocast:
                        loss = track.loss(trained, batch, device)
                    if not torch.isfinite(loss.detach()):
                        bad += 1
                        if bad > hp.max_bad_batches:
                            raise NonFiniteLoss(
                                f"{exp.row} seed {seed} {phase}: non-finite loss ({float(loss.detach())}) at epoch {epoch}, "
                                f"step {step} (global step {global_step}); no weights were written for this step"
                            )
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if hp.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    if pruner is not None:
                        pruner.step(optimizer)
                    loss_sum += float(loss.detach())
                    count += 1
                    global_step += 1
                    bar.update()
                    if stop.received and step + 1 < budget:
                        save_resume(
                            {"sub": sub, "epoch": epoch, "step": step + 1},
                            {
                                "loss_sum": loss_sum,
                                "count": count,
                                "bad": bad,
                                "seconds": seconds_before + time.time() - epoch_start,
                                "rng": _rng_state(),
                            },
                        )
                        raise Preempted(
                            f"{stop.received}: checkpointed {phase} at epoch {epoch}, step {step + 1}"
                        )
                bar.close()
                val = track.evaluate(model, exp, "val", device)
                record = {
                    "phase": current.name,
                    "kind": "control" if phase == CONTROL else current.kind,
                    "epoch": epoch,
                    "steps": count,
                    "lr": current.lr,
                    "train_loss": _mean_over_ranks(loss_sum / max(count, 1), device, world),
                    "bad_batches": bad,
                    "seconds": seconds_before + time.time() - epoch_start,
                    "val": val,
                    "sparsity": pruner.overall_sparsity() if pruner else 0.0,
                }
                history.append(record)
                tracker.log(
                    {"train_loss": record["train_loss"], "lr": current.lr, "epoch": len(history)}
                    | {f"val/{k}": v for k, v in val.items()}
                    | ({"sparsity/overall": record["sparsity"]} if pruner else {}),
                    step=global_step,
                )
                position = {"sub": sub, "epoch": epoch + 1, "step": 0}
                partial = {}
                if sub < len(phases) - 1 or epoch < n_epochs - 1:  # the last one is model.pt, written next
                    save_resume(position)
                if stop.received:
                    raise Preempted(f"{stop.received}: checkpointed {phase} after epoch {epoch}")
            position = {"sub": sub + 1, "epoch": 0, "step": 0}

    test = track.evaluate(model, exp, "test", device)
    val = history[-1]["val"] if history else track.evaluate(model, exp, "val", device)
    final_phase = phases[-1]
    per_layer = pruner.sparsity() if pruner else {}
    metrics = {
        "row": exp.row,
        "track": exp.track,
        "dataset": exp.dataset,
        "seed": seed,
        "phase": phase,
        "kind": "control" if phase == CONTROL else final_phase.kind,
        "epochs": sum(p.epochs for p in phases),
        "lr": phases[0].lr,
        "target_sparsity": final_phase.sparsity,
        "measured_sparsity": pruner.overall_sparsity() if pruner else 0.0,
        "sparsity_per_layer": per_layer,
        "metric": track.METRIC,
        "higher_is_better": track.HIGHER_IS_BETTER,
        "val": val,
        "test": test,
        "history": history,
        "world_size": world,
        "wall_seconds": time.time() - started,
        "device": str(device),
        "machine": platform.node(),
        "torch": torch.__version__,
    }
    tracker.summary({f"test/{k}": v for k, v in test.items()})
    if pruner is not None:
        tracker.log({f"sparsity/{n}": s for n, s in per_layer.items()}, step=global_step)
        tracker.histograms(model, list(per_layer)[:4], step=global_step)
    tracker.finish()
    if lead:
        final = _state(exp, phase, model, optimizer, scaler, pruner, history, position)
        checkpoint.save(final, paths.checkpoint(out_dir))
        sample_rows = track.samples(model, exp, device, 8)
        if sample_rows:
            payload = {"row": exp.row, "seed": seed, "phase": phase, "samples": sample_rows}
            _write_json(paths.samples(out_dir), payload)
        _write_json(paths.metrics(out_dir), metrics)  # last: its presence means the phase is complete
        resume_path.unlink(missing_ok=True)
    if world > 1:
        torch.distributed.barrier()
    return metrics


def _state(exp, phase, model, optimizer, scaler, pruner, history, position) -> dict:
    return {
        "row": exp.row,
        "arch": exp.model.get("arch", exp.track),
        "phase": phase,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "pruner": pruner.state_dict() if pruner is not None and pruner.active else None,
        "history": history,
        "position": position,
        "rng": _rng_state(),
    }
