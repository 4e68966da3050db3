"""One epoch of steps: the scheduled LR, forward and loss, the optimizer step, then `pruner.step` (masks and
optimizer state back to zero). A signal stops it at the next step boundary with a resume checkpoint."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from dsd.core.schedule import CONTROL, Phase, lr_at
from dsd.engine import distributed, resume
from dsd.engine.loaders import epoch_seed
from dsd.errors import NonFiniteLoss, Preempted


def train_epoch(
    loop, current: Phase, order_key, epoch, n_epochs, skip, budget, steps_per_epoch, total, stop
) -> dict:
    """Train steps `skip` .. `budget` - 1 of one epoch; returns its history record (validation comes after)."""
    exp, spec, state = loop.exp, loop.spec, loop.state
    hp, partial = exp.train, state.partial
    torch.manual_seed(epoch_seed(spec.seed, *order_key, epoch))  # augmentation and dropout of this epoch
    batches = loop.track.data.train_loader(
        exp, seed=epoch_seed(spec.seed, *order_key), epoch=epoch, skip_batches=skip
    )
    if skip:  # mid-epoch resume: continue the random streams exactly where the signal stopped them
        resume.set_rng_state(partial["rng"])
    loss_sum, count, bad = (partial.get(k, 0) for k in ("loss_sum", "count", "bad")) if skip else (0.0, 0, 0)
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
                steps_per_epoch, hp.lr_step_epochs, hp.lr_power,
            )  # fmt: skip
        with distributed.autocast(state.dtype):
            loss = loop.track.metric.loss(loop.trained, batch, loop.device)
        # the step's one wait for the device, before backward: read after the step, the value would wait for
        # the whole step, and the next batch could not be queued meanwhile
        value, finite = distributed.step_loss(loss, loop.world)
        if not finite:  # on this rank or another
            bad += 1
            if bad > hp.max_bad_batches:
                where = (
                    ""
                    if loop.world == 1
                    else f" on rank {torch.distributed.get_rank()}; non-finite on some rank"
                )
                raise NonFiniteLoss(
                    f"{exp.row} seed {spec.seed} {spec.phase}: non-finite loss ({value}{where}) at epoch "
                    f"{epoch}, step {step} (global step {loop.global_step}); no weights were written for this step"
                )
            state.optimizer.zero_grad(set_to_none=True)
            continue
        _step(state, loss, hp.grad_clip)
        loss_sum += value
        count += 1
        loop.global_step += 1
        bar.update()
        if stop.received and step + 1 < budget:
            elapsed = seconds_before + time.time() - started
            partial = {
                "loss_sum": loss_sum,
                "count": count,
                "bad": bad,
                "seconds": elapsed,
                "rng": resume.rng_state(),
            }
            loop.save_resume({"sub": state.position["sub"], "epoch": epoch, "step": step + 1}, partial)
            raise Preempted(f"{stop.received}: checkpointed {spec.phase} at epoch {epoch}, step {step + 1}")
    bar.close()
    return {
        "phase": current.name,
        "kind": "control" if spec.phase == CONTROL else current.kind,
        "epoch": epoch,
        "steps": count,
        "lr": current.lr,
        "train_loss": distributed.mean_over_ranks(loss_sum / max(count, 1), loop.device, loop.world),
        "bad_batches": bad,
        "seconds": seconds_before + time.time() - started,
    }


def _step(state, loss: torch.Tensor, grad_clip: float | None) -> None:
    """Backward, optional clipping, optimizer step, then the masks (also when the scaler skipped the step)."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if grad_clip:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.pruner is not None:
        state.pruner.step(state.optimizer)
