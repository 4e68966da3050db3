"""One epoch of steps: the scheduled LR, forward and loss, the optimizer step, then `pruner.step` (masks and
optimizer state back to zero). A signal stops it at the next step boundary with a resume checkpoint: under DDP
at the same step on every rank, since each step's flags are all-reduced (a signal reaches ranks at different
steps)."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from dsd.core.schedule import CONTROL, Phase, lr_at
from dsd.engine import distributed, resume
from dsd.engine.loaders import epoch_seed
from dsd.errors import NonFiniteLoss


def train_epoch(
    loop, current: Phase, order_key, epoch, n_epochs, skip, budget, steps_per_epoch, total, stop
) -> dict:
    """Train steps `skip` .. `budget` - 1 of one epoch; returns its history record (validation comes after)."""
    exp, spec, state = loop.exp, loop.spec, loop.state
    hp, partial = exp.train, state.partial
    seed_dropout(spec.seed, order_key, epoch, loop.rank, loop.world)
    first = tuple(order_key) == (0, 0) and epoch == 0  # training's first epoch (SortaGrad's shortest first)
    batches = loop.track.data.train_loader(
        exp, seed=epoch_seed(spec.seed, *order_key), epoch=epoch, skip_batches=skip, first=first
    )
    if skip:  # mid-epoch resume: continue the random streams exactly where the signal stopped them
        resume.set_rng_state(resume.own_stream(partial["rng"], loop.rank))
    counted = (partial.get(k, 0) for k in ("loss_sum", "count", "bad")) if skip else (0.0, 0, 0)
    # the phase's earlier epochs (the control job's history holds each phase it stands in for)
    earlier_bad = sum(h["bad_batches"] for h in state.history if h["phase"] == current.name)
    tally = Tally(loop, epoch, *counted, earlier_bad=earlier_bad)
    pending = None  # the last step's loss, read one step late (defers_loss_read)
    seconds_before = partial.get("seconds", 0.0) if skip else 0.0
    loop.trained.train()
    label = current.name if spec.phase != CONTROL else f"control:{current.name}"
    bar = tqdm(
        total=budget, initial=skip, desc=f"{exp.row} s{spec.seed} {label} ep{epoch + 1}/{n_epochs}",
        unit="step", leave=False, disable=not loop.progress, mininterval=2.0,
    )  # fmt: skip
    started = time.time()
    for step, batch in enumerate(batches, start=skip):
        if step >= budget:
            break
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(
                current.lr, epoch * steps_per_epoch + step, total, hp.lr_schedule,
                steps_per_epoch, hp.lr_step_epochs, hp.lr_power, hp.lr_anneal,
            )  # fmt: skip
        with distributed.autocast(state.dtype):
            loss = loop.track.metric.loss(loop.trained, batch, loop.device)
        if defers_loss_read(state):
            queued, pending = (
                pending,
                queue_step(state, loss, hp.grad_clip, loop.world, step, signalled=stop.received is not None),
            )
            tally.add(queued)
        else:  # wait for the forward pass: a non-finite step must not reach the optimizer
            tally.add(pending)
            pending = None
            flags = distributed.step_flags(loss, stop.received is not None, loop.world)
            if not tally.add(LossRead(loss, flags, step)):
                continue
            _step(state, loss, hp.grad_clip)
        bar.update()
        if tally.stopping and step + 1 < budget:  # the same step on every rank
            tally.add(pending)
            pending = None
            elapsed = seconds_before + time.time() - started
            partial = {  # the ranks' mean sum: what each rank restores, as the epoch's loss is their mean
                "loss_sum": distributed.mean_over_ranks(tally.loss_sum, loop.device, loop.world),
                "count": tally.count,
                "bad": tally.bad,
                "seconds": elapsed,
                "rng": distributed.from_every_rank(resume.rng_state(), loop.world),
            }
            loop.save_resume({"sub": state.position["sub"], "epoch": epoch, "step": step + 1}, partial)
            raise loop.preempted(stop, f"at epoch {epoch}, step {step + 1}")
    bar.close()
    tally.add(pending)
    return {
        "phase": current.name,
        "kind": "control" if spec.phase == CONTROL else current.kind,
        "epoch": epoch,
        "steps": tally.count,
        "lr": current.lr,
        "train_loss": distributed.mean_over_ranks(
            tally.loss_sum / max(tally.count, 1), loop.device, loop.world
        ),
        "bad_batches": tally.bad,
        "seconds": seconds_before + time.time() - started,
    }


def seed_dropout(seed: int, order_key, epoch: int, rank: int, world: int) -> None:
    """Seed the main process's generator for an epoch: dropout's stream (augmentation draws from each sample's
    own seed). Each DDP rank gets its own, or the ranks' slices of one global batch would repeat each other's
    dropout masks; one process keeps the stream it always had."""
    ranks = (rank,) if world > 1 else ()
    torch.manual_seed(epoch_seed(seed, *order_key, epoch, *ranks))


def _step(state, loss: torch.Tensor, grad_clip: float | None, found_inf: torch.Tensor | None = None) -> None:
    """Backward, optional clipping, optimizer step, then the masks (also when the scaler or `found_inf`
    skipped the step)."""
    state.scaler.scale(loss).backward()
    if grad_clip:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
    if found_inf is None:
        state.scaler.step(state.optimizer)
    else:  # read by fused optimizers (as a GradScaler sets it): 1 skips the whole update on the device
        state.optimizer.found_inf = found_inf
        state.scaler.step(state.optimizer)
        del state.optimizer.found_inf
    state.scaler.update()
    if state.pruner is not None:
        state.pruner.step(state.optimizer)
    state.optimizer.zero_grad(set_to_none=True)  # freed before the next forward pass, not after it


def queue_step(
    state, loss: torch.Tensor, grad_clip: float | None, world: int, step: int, signalled: bool = False
) -> LossRead:
    """`_step` without waiting for the loss (`defers_loss_read`): the optimizer skips a non-finite step on the
    device; the returned read says later what the loss was and whether some rank was signalled."""
    flags = distributed.step_flags(loss, signalled, world)
    _step(state, loss, grad_clip, found_inf=flags[0])
    return LossRead(loss, flags, step)


def defers_loss_read(state) -> bool:
    """Whether this step's loss can be read one step late, so that the host queues backward and the optimizer
    without waiting for the forward pass: where a fused optimizer skips a non-finite step on the device
    (`found_inf`) and no GradScaler sets that flag itself. Only once every parameter has optimizer state: a
    fused SGD step skipped before its first step would leave its momentum buffers uninitialised."""
    optimizer = state.optimizer
    if not optimizer.defaults.get("fused") or state.scaler.is_enabled():
        return False
    return len(optimizer.state) == sum(len(group["params"]) for group in optimizer.param_groups)


class LossRead:
    """A step's loss and all ranks' flags (`step_flags`), copied to the host behind the step's queued work."""

    def __init__(self, loss: torch.Tensor, flags: torch.Tensor, step: int):
        self.step = step
        self.values = torch.cat([loss.detach().float().reshape(1), flags]).to("cpu", non_blocking=True)
        self.done = None
        if loss.device.type == "cuda":
            self.done = torch.cuda.Event()
            self.done.record()

    def read(self) -> tuple[float, bool, bool]:
        """(loss, finite on every rank, some rank signalled to stop)."""
        if self.done is not None:
            self.done.synchronize()
        value, not_finite, stop = self.values.tolist()
        return value, not_finite == 0, stop != 0


class Tally:
    """An epoch's loss sum, finite steps and non-finite ones; stops the phase past `train.max_bad_batches`
    non-finite steps in the whole phase (`earlier_bad`: those of its earlier epochs), not in each epoch."""

    def __init__(self, loop, epoch: int, loss_sum: float, count: int, bad: int, earlier_bad: int = 0):
        self.loop, self.epoch = loop, epoch
        self.loss_sum, self.count, self.bad = loss_sum, count, bad
        self.earlier_bad = earlier_bad
        self.stopping = False  # some rank was signalled: every rank reads this at the same step

    def add(self, read: LossRead | None) -> bool:
        """Counts a step's loss (none: nothing to count); whether it was finite on every rank."""
        if read is None:
            return True
        (value, finite, stop), loop = read.read(), self.loop
        self.stopping |= stop
        if finite:
            self.loss_sum += value
            self.count += 1
            loop.global_step += 1
            return True
        self.bad += 1
        if self.earlier_bad + self.bad > loop.exp.train.max_bad_batches:
            where = (
                "" if loop.world == 1 else f" on rank {torch.distributed.get_rank()}; non-finite on some rank"
            )
            raise NonFiniteLoss(
                f"{loop.exp.row} seed {loop.spec.seed} {loop.spec.phase}: non-finite loss ({value}{where}) at epoch "
                f"{self.epoch}, step {read.step} (global step {loop.global_step}); no weights were written for this step"
            )
        return False
