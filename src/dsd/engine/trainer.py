"""Train one phase of a recipe: from the previous phase's checkpoint to this phase's checkpoint and metrics.

    build (seed, model, optimizer) -> resume or init -> for each epoch: train_epoch, monitor, resume point
    -> model.pt, metrics.json

The `control` phase runs every post-dense phase's epochs and learning rates without pruning, in one job.
Test metrics are not computed here: evaluation is its own step (`dsd.engine.evaluation`), so changing how a
model is evaluated never retrains it.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsd import paths, tracks
from dsd.core.masks import Pruner, in_layout_of
from dsd.core.schedule import CONTROL, Phase, phase_steps
from dsd.engine import checkpoint, distributed, prepare, resume
from dsd.engine.epoch import train_epoch
from dsd.engine.loaders import epoch_seed
from dsd.errors import ConfigError, Preempted
from dsd.spec import Experiment, PhaseSpec, RunOptions
from dsd.tracking import Tracker
from dsd.words import counted


@dataclass
class State:
    """Everything a phase carries from step to step (and into its checkpoints)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None = None  # autocast type (None: fp32)
    pruner: Pruner | None = None
    history: list[dict] = field(default_factory=list)
    position: dict = field(default_factory=lambda: {"sub": 0, "epoch": 0, "step": 0})
    partial: dict = field(default_factory=dict)  # accumulators of an epoch interrupted by a signal
    # the wandb run of the job that wrote the resume point, continued rather than a new one
    wandb_id: str | None = None
    seconds_before: float = 0.0  # the phase's wall time in the jobs before a resumed one

    def checkpoint(self, exp: Experiment, spec: PhaseSpec, identity: dict, position: dict) -> dict:
        return {
            "row": exp.row,
            "arch": getattr(exp.model, "arch", exp.track),
            "phase": spec.phase,
            "identity": identity,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner is not None and self.pruner.active else None,
            "history": self.history,
            "position": position,
            "rng": resume.rng_state(),
        }


def make_optimizer(model: torch.nn.Module, exp: Experiment, lr: float) -> torch.optim.Optimizer:
    """The row's optimizer: SGD, Adam and AdamW with torch's fused kernels where the device has them (one
    pass over all tensors per step, where the default implementation runs small operations tensor by tensor;
    `make bench` section 10 measures the two SGD steps on the CPU)."""
    hp = exp.train
    params = [p for p in model.parameters() if p.requires_grad]
    if hp.optimizer == "rmsprop":  # no fused kernels
        return torch.optim.RMSprop(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    if hp.optimizer == "sgd":
        kind, settings = torch.optim.SGD, {"momentum": hp.momentum, "nesterov": hp.nesterov}
    else:
        kind, settings = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[hp.optimizer], {}
    try:
        return kind(params, lr=lr, weight_decay=hp.weight_decay, fused=True, **settings)
    except RuntimeError:  # a device without fused kernels
        return kind(params, lr=lr, weight_decay=hp.weight_decay, **settings)


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A checkpoint's optimizer state and settings, but this build's implementation (fused or not) and its
    parameters' memory layout: the ones this device has, not those of the machine or version that wrote the
    checkpoint."""
    implementation = [
        {k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups
    ]
    optimizer.load_state_dict(saved)
    for group, keep in zip(optimizer.param_groups, implementation, strict=True):
        group.update(keep)
    in_parameter_layout(optimizer)


def in_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Each per-weight state tensor (momentum, Adam's moments) laid out in memory as its parameter is.
    `load_state_dict` keeps the layout a checkpoint was written in (channels-last where a GPU trained, say),
    and torch 2.11's fused CPU kernels pair a parameter's and its state's elements by memory position: a
    channels-last momentum buffer under a contiguous weight makes every fused SGD step wrong, silently."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                state[key] = in_layout_of(param, value)


def compile_mode(options: RunOptions, exp: Experiment, world: int) -> str:
    """torch.compile's mode for this row. CUDA graphs are recorded per batch shape, so rows whose shapes
    change every step (speech, captioning) compile in the default mode under `reduce-overhead`: one setting
    serves a whole pipeline."""
    if options.compile_mode != "reduce-overhead":
        return options.compile_mode
    if not tracks.get(exp.track).config.FIXED_SHAPES:
        distributed.say(
            f"dsd: {exp.row}: compile_mode reduce-overhead needs fixed batch shapes, this row's change every "
            "step: compiled in the default mode"
        )
        return "default"
    if world > 1:  # one line per job: every rank's warning made an N-rank job's log say it N times
        distributed.say(
            "dsd: warning: compile_mode reduce-overhead (CUDA graphs) has not been checked under DDP"
        )
    return "reduce-overhead"


def phases_of(spec: PhaseSpec) -> tuple[int, tuple[Phase, ...]]:
    """(index of the phase in its recipe, the phases this job trains)."""
    if spec.phase == CONTROL:  # the chain is the dense phase, then the control's own phases
        return len(spec.phases), spec.phases[1:]
    return spec.recipe.names.index(spec.phase), (spec.recipe[spec.phase],)


def build(exp: Experiment, spec: PhaseSpec, device: torch.device, first_lr: float) -> State:
    """Seeded model, optimizer and scaler (the seed fixes the initial weights of a dense phase)."""
    torch.manual_seed(epoch_seed(spec.seed))
    track = tracks.get(exp.track)
    model = track.model.build(exp).to(device)
    if distributed.prefers_channels_last(model, device):  # faster for CNNs on CPUs (oneDNN) as on GPUs
        model = model.to(memory_format=torch.channels_last)
    distributed.fast_kernels(device, track.config.FIXED_SHAPES)
    optimizer = make_optimizer(model, exp, first_lr)
    dtype = distributed.autocast_dtype(exp.train.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return State(model, optimizer, scaler, dtype)


def restore(
    state: State,
    resume_path: Path,
    init: str | Path | None,
    spec: PhaseSpec,
    identity: dict,
    started_from: str | None = None,
    inputs: dict[str, str] | None = None,
) -> None:
    """Continue from this phase's resume point (one written from the same `init`, by its digest `started_from`,
    and with the same `inputs` digests), else start from the previous phase's final checkpoint."""
    saved = resume.load_resume(resume_path, identity, started_from, inputs)
    if saved is not None:
        checkpoint.load_model(state.model, saved, resume_path)
        load_optimizer(state.optimizer, saved["optimizer"])
        if state.scaler.is_enabled() and saved["scaler"]:  # a resume point of a bf16 or CPU job has none
            state.scaler.load_state_dict(saved["scaler"])
        if saved.get("pruner") is not None:
            state.pruner = Pruner.from_state_dict(state.model, saved["pruner"])
        state.history, state.position = saved["history"], saved["position"]
        state.partial = saved.get("partial") or {}
        state.wandb_id = saved.get("wandb_id")
        state.seconds_before = saved.get("wall_seconds", 0.0)
        say_resumed(spec, resume_path, state)
        return
    if init is None:
        return
    previous = spec.previous()
    saved = resume.load_init(init, resume.identity(previous, identity["data_fingerprint"]))
    checkpoint.load_model(state.model, saved, init)
    load_optimizer(state.optimizer, saved["optimizer"])  # momentum carries over; LR is set per step
    if saved.get("pruner") is not None:  # coming out of a sparse phase: drop the mask (re-dense)
        Pruner.from_state_dict(state.model, saved["pruner"]).remove(state.optimizer)


def say_resumed(spec: PhaseSpec, path: Path, state: State) -> None:
    """One line before training: a resumed job's first epoch line can be a whole epoch away."""
    epochs, steps = len(state.history), state.position["step"]
    where = f"after {counted(epochs, 'epoch')}" + (f" and {counted(steps, 'step')}" if steps else "")
    distributed.say(f"dsd: {spec.row} seed {spec.seed} {spec.phase}: resuming from {path} {where}")


def init_digest(init: str | Path | None) -> str | None:
    return None if init is None else checkpoint.digest(init)


def input_digests(exp: Experiment) -> dict[str, str]:
    """The files the phase reads whose content no spec holds, by content digest (those that are here): the
    spec names them by path (`data.encoder_weights`, `model.weights`) or by the run that writes them
    (captioning's image features, encoded again under the same name when the encoder row's dense run is
    retrained), so a file replaced mid-phase must not continue the resume point trained on the old one."""
    files = tracks.get(exp.track).config.content_inputs(exp)
    return {name: checkpoint.digest(path) for name, path in files.items() if path and Path(path).is_file()}


def run_phase(
    spec: PhaseSpec,
    out_dir: str | Path,
    init: str | Path | None = None,
    options: RunOptions = RunOptions(),
    progress: bool = False,
) -> dict:
    """Train `spec.phase` for run `spec.seed`; resumes from `out_dir/resume.pt` when it belongs to this spec.

    Under DDP every rank trains its shard of each global batch; masks are a function of the
    weights, identical on every rank, and re-applied on every rank; rank 0 alone writes files and wandb.
    """
    out_dir = Path(out_dir)
    paths.check_writable(out_dir)
    paths.remove_stale_temporaries(out_dir)  # of this phase's job killed while writing
    exp = spec.experiment(options)
    recipe_index, phases = phases_of(spec)
    if init is None and recipe_index != 0:
        raise ConfigError(f"phase {spec.phase!r} starts from the previous phase's checkpoint: pass --init")
    if init is not None and recipe_index == 0:  # there is no previous phase to check the checkpoint against
        raise ConfigError(
            f"phase {spec.phase!r} is its recipe's first and starts from no checkpoint: --init is for the later "
            "phases (a pretrained start is model.weights)"
        )
    identity = resume.identity(spec, prepare.data_fingerprint(exp))
    device, rank, world = distributed.setup(options.device)
    distributed.rank_zero_first(lambda: tracks.get(exp.track).data.check(exp), rank, world)
    if device.type == "cpu":
        torch.set_num_threads(options.threads)
    state = build(exp, spec, device, phases[0].lr)
    checkpoint.check_space(out_dir, state.model)
    resume_path = paths.resume(out_dir)
    started_from = init_digest(init)  # recorded in resume points: they continue only from this checkpoint
    inputs = input_digests(exp)  # and only with these weights and features
    restore(state, resume_path, init, spec, identity, started_from, inputs)
    trained = state.model
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(state.model, device_ids=ids)
    if options.compile:  # shares state.model's parameters, which the pruner masks in place after each step
        trained = torch.compile(trained, mode=compile_mode(options, exp, world))
    tracker = Tracker(
        options.wandb if rank == 0 else None,
        paths.wandb_dir(options.output_dir),
        gpu=device.type == "cuda",
        group=f"{exp.row}-seed{spec.seed}",
        job_type=spec.phase,
        name=f"{exp.row}-seed{spec.seed}-{spec.phase}",
        config={
            "spec": spec.identity(),
            "fingerprint": spec.fingerprint,
            "seed": spec.seed,
            "phase": spec.phase,
        },
        **({"id": state.wandb_id, "resume": "allow"} if state.wandb_id else {}),
    )

    def save_resume(position: dict, partial: dict | None = None) -> None:
        if rank == 0:
            extra = {
                "partial": partial or {},
                "wandb_id": tracker.run_id,
                "wall_seconds": state.seconds_before + time.time() - started,
                "init": started_from,
                "inputs": inputs,
            }
            payload = state.checkpoint(exp, spec, identity, position) | extra
            checkpoint.save(payload, resume_path)
        distributed.barrier(world)  # no rank stops (and ends the job) while rank 0 is still writing

    started = time.time()
    loop = _Loop(
        exp, spec, state, trained, tracker, device, world, recipe_index, save_resume, progress and rank == 0
    )
    try:
        with resume.StopSignal() as stop:
            for sub in range(state.position["sub"], len(phases)):
                loop.run_phase_part(sub, phases, stop)
                state.position = {"sub": sub + 1, "epoch": 0, "step": 0}
        seconds = state.seconds_before + time.time() - started  # a resumed phase's earlier jobs included
        metrics = _metrics(exp, spec, state, phases, identity, world, device, seconds)
        if state.pruner is not None:
            per_layer = metrics["sparsity_per_layer"]
            tracker.log({f"sparsity/{n}": s for n, s in per_layer.items()}, step=loop.global_step)
            tracker.histograms(state.model, list(per_layer)[:4], step=loop.global_step)
        if rank == 0:
            checkpoint.save(state.checkpoint(exp, spec, identity, state.position), paths.checkpoint(out_dir))
            if options.wandb.checkpoints:
                name = f"{exp.row}-seed{spec.seed}-{spec.phase}"
                tracker.artifact(paths.checkpoint(out_dir), name, {"fingerprint": spec.fingerprint})
            tracker.finish()
            # last: its presence means the phase is complete
            paths.write_json(paths.metrics(out_dir), metrics)
            resume_path.unlink(missing_ok=True)
        distributed.end_together(rank, world)
        return metrics
    finally:  # also when a signal or a non-finite loss ends the job: its run's records reach the disk
        tracker.finish()


class _Loop:
    """The epochs of one job: for each phase it trains, prune at its start if it is sparse, then epochs."""

    def __init__(
        self, exp, spec, state, trained, tracker, device, world, recipe_index, save_resume, progress
    ):
        self.exp, self.spec, self.state, self.trained = exp, spec, state, trained
        self.tracker, self.device, self.world = tracker, device, world
        self.rank = torch.distributed.get_rank() if world > 1 else 0
        self.recipe_index, self.save_resume, self.progress = recipe_index, save_resume, progress
        self.track = tracks.get(exp.track)
        history, partial = state.history, state.partial
        self.steps_per_epoch = _steps_per_epoch(self.track, exp, world)
        # one continuous step per (row, seed) across phases: this job starts after its chain's earlier phases
        earlier = spec.phases[:1] if spec.phase == CONTROL else spec.phases[:-1]
        self.step_offset = sum(phase_steps(p.epochs, self.steps_per_epoch) for p in earlier)
        self.global_step = (
            self.step_offset + sum(h.get("steps", 0) for h in history) + partial.get("count", 0)
        )
        jobs_phases = spec.phases[1:] if spec.phase == CONTROL else spec.phases[-1:]
        self.epochs_total = sum(math.ceil(p.epochs) for p in jobs_phases)
        self.started, self.epochs_here = time.time(), 0  # epochs this process trained: the rate of the ETA

    def run_phase_part(self, sub: int, phases: tuple[Phase, ...], stop) -> None:
        exp, state, current = self.exp, self.state, phases[sub]
        if current.prunes and state.pruner is None:
            state.pruner = Pruner(
                state.model, current.sparsity, exclude=exp.prune.exclude, include=exp.prune.include
            )
            state.pruner.step(state.optimizer)  # no stale momentum at pruned entries from the dense phase
            self.tracker.histograms(state.model, list(state.pruner.masks)[:4], step=self.global_step)
        steps_per_epoch = self.steps_per_epoch
        total = phase_steps(current.epochs, steps_per_epoch)
        n_epochs = math.ceil(current.epochs)
        position = state.position
        first_epoch = position["epoch"] if sub == position["sub"] else 0
        # The control replays the data order of the DSD phase it stands in for (a paired comparison).
        order_key = (sub + 1, 0) if self.spec.phase == CONTROL else (self.recipe_index, sub)
        for epoch in range(first_epoch, n_epochs):
            skip = position["step"] if (sub, epoch) == (position["sub"], position["epoch"]) else 0
            budget = min(steps_per_epoch, total - epoch * steps_per_epoch)
            record = train_epoch(
                self, current, order_key, epoch, n_epochs, skip, budget, steps_per_epoch, total, stop
            )
            distributed.rank0_buffers(state.model, self.world)
            with distributed.autocast(state.dtype):
                record["val"] = self.track.metric.monitor(state.model, exp, self.device)
            record["sparsity"] = state.pruner.overall_sparsity() if state.pruner else 0.0
            record["lr_last"] = state.optimizer.param_groups[0]["lr"]  # the schedule's value at the last step
            state.history.append(record)
            self._log(record, current, sub)
            state.position = position = {"sub": sub, "epoch": epoch + 1, "step": 0}
            state.partial = {}
            stopping = distributed.any_rank(stop.received is not None, self.device, self.world)
            if sub == len(phases) - 1 and epoch == n_epochs - 1:
                # nothing left to train: model.pt is written next, the epoch kept (rank 0 says so for all)
                if stopping and self.rank == 0:
                    print(
                        f"dsd: {_signal_name(stop)} in the last epoch: finishing {self.spec.phase}",
                        file=sys.stderr,
                    )
                return
            self.save_resume(position)
            if stopping:
                raise self.preempted(stop, f"after epoch {epoch}")

    def preempted(self, stop, where: str) -> Preempted:
        """The error every rank stops with, at the same step; only rank 0 wrote the checkpoint."""
        if self.rank == 0:
            return Preempted(f"{_signal_name(stop)}: checkpointed {self.spec.phase} {where}", stop.received)
        return Preempted(
            f"{_signal_name(stop)}: rank {self.rank} stopped {self.spec.phase} {where} with rank 0",
            stop.received,
        )

    def _log(self, record: dict, current: Phase, sub: int) -> None:
        """One line per epoch in the job's log, and the same values to wandb at the continuous step."""
        self.epochs_here += 1
        monitored = monitor_names(self.track, record["val"])
        metric = self.track.config.MONITOR_PREFIX + self.track.config.METRIC
        value = monitored.get(metric, float("nan"))
        elapsed = time.time() - self.started
        # a resumed job's history has the epochs of the job before it
        left = max(self.epochs_total - len(self.state.history), 0)
        eta = elapsed / self.epochs_here * left
        label = current.name if self.spec.phase != CONTROL else f"control:{current.name}"
        if self.rank == 0:  # one line per epoch: every rank's copy made an N-rank job's log N times as long
            print(
                f"{self.exp.row} seed {self.spec.seed} {label} epoch {record['epoch'] + 1}/{math.ceil(current.epochs)}: "
                f"train loss {record['train_loss']:.4f}, val {metric} {value:.2f}, lr {record['lr_last']:.3g}, "
                f"sparsity {record['sparsity']:.1%}, {elapsed:.0f} s elapsed, ETA {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        phase_index = self.recipe_index + sub if self.spec.phase != CONTROL else len(self.spec.phases) + sub
        self.tracker.log(
            {
                "train_loss": record["train_loss"],
                "lr": record["lr_last"],
                "phase": label,
                "phase_index": phase_index,
            }
            | {f"val/{k}": v for k, v in monitored.items()}
            | {"sparsity/overall": record["sparsity"]},
            step=self.global_step,
        )


def monitor_names(track, values: dict) -> dict:
    """The per-epoch validation's values under the names logs and wandb give them: speech and captioning decode
    greedily there, so their `wer_pct` is not the evaluation's (a beam search's) `wer_pct` of the same run."""
    return {f"{track.config.MONITOR_PREFIX}{k}": v for k, v in values.items()}


def _signal_name(stop) -> str:
    return stop.received or "a signal to another rank"


def _steps_per_epoch(track, exp, world: int = 1) -> int:
    steps = len(track.data.train_loader(exp, seed=0, epoch=0))
    # DDP drops an epoch's incomplete last batch: where it is the only one, no step would train
    if steps == 0 and world > 1:
        raise ConfigError(
            f"{exp.row}: the training split holds fewer items than one global batch of {exp.train.batch_size}, "
            f"the whole epoch an incomplete batch that {world} DDP ranks drop: no step would train; lower "
            "train.batch_size"
        )
    return min(steps, exp.train.max_steps_per_epoch) if exp.train.max_steps_per_epoch else steps


def _metrics(exp, spec, state, phases, identity, world, device, seconds) -> dict:
    final = phases[-1]
    return {
        "row": exp.row,
        "track": exp.track,
        "dataset": exp.dataset,
        "seed": spec.seed,
        "phase": spec.phase,
        **identity,
        "kind": "control" if spec.phase == CONTROL else final.kind,
        "epochs": sum(p.epochs for p in phases),
        "lr": phases[0].lr,
        "target_sparsity": final.sparsity,
        "measured_sparsity": state.pruner.overall_sparsity() if state.pruner else 0.0,
        "sparsity_per_layer": state.pruner.sparsity() if state.pruner else {},
        "metric": tracks.get(exp.track).config.METRIC,
        "higher_is_better": tracks.get(exp.track).config.HIGHER_IS_BETTER,
        "monitor": state.history[-1]["val"] if state.history else {},
        "history": state.history,
        "world_size": world,
        "wall_seconds": seconds,
        "device": str(device),
        "machine": platform.node(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels `cpu_isa` allowed
    }
