"""What a phase checkpoint holds, and the checks that keep a stale one from being used.

A checkpoint (`resume.pt` mid-phase, `model.pt` at the end) holds the weights, optimizer and scaler state,
the masks (bit-packed), the per-epoch history, the position in the phase, the RNG state, and the phase's
identity: its spec fingerprint, the spec itself (so a mismatch can be named key by key) and the data set's
content fingerprint. `resume.pt` of another spec or other data, or started from another `--init` file (the
previous phase retrained since), or from another content of a file the phase reads that no spec names by
content (captioning's image features and `data.encoder_weights`, a vision row's `model.weights` file), or
unreadable (a disk error: written atomically, it is never torn), is discarded with one line (the phase starts
afresh, and its first checkpoint replaces the file); an `--init` checkpoint of another spec is refused.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import torch

from dsd.engine import checkpoint, distributed
from dsd.errors import CheckpointError
from dsd.spec import PhaseSpec, differences


def identity(spec: PhaseSpec, data_fingerprint: str) -> dict:
    return {"fingerprint": spec.fingerprint, "spec": spec.identity(), "data_fingerprint": data_fingerprint}


def mismatch(saved: dict, expected: dict) -> str | None:
    """None when `saved` (a checkpoint's identity) is `expected`; else the first differing keys, in words."""
    if saved.get("fingerprint") == expected["fingerprint"]:
        if saved.get("data_fingerprint") == expected["data_fingerprint"]:
            return None
        return f"data set content {saved.get('data_fingerprint')} -> {expected['data_fingerprint']}"
    if "spec" not in saved:
        return "written before checkpoints carried their spec"
    diff = differences(saved["spec"], expected["spec"])
    return "; ".join(diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")


def load_resume(
    path: Path, expected: dict, init: str | None = None, inputs: dict[str, str] | None = None
) -> dict | None:
    """The resume state when it belongs to this phase and data, and continues from the same previous
    checkpoint (`init`, its digest: one retrained since, on another machine say, has other weights under the
    same spec) and the same `inputs` (what names a file -> its content digest: files the spec names by path
    or by the run that writes them, such as captioning's image features, encoded again when their encoder was
    retrained); otherwise None, after saying why. The file stays (every DDP rank reads it) until the phase's
    first checkpoint replaces it."""
    if not path.exists():
        return None
    try:
        state = checkpoint.load(path)
    except CheckpointError as err:  # the progress is lost, not the run
        distributed.say(f"dsd: {err}; starting the phase afresh")
        return None
    why = mismatch(state.get("identity") or {}, expected)
    if why is None and state.get("init") != init:
        why = f"started from another checkpoint of the previous phase ({state.get('init')} -> {init})"
    for name, digest in (inputs or {}).items():
        if why is None and (state.get("inputs") or {}).get(name) != digest:
            why = f"{name} replaced since ({(state.get('inputs') or {}).get(name)} -> {digest})"
    if why is None:
        return state
    distributed.say(f"dsd: {path} is from another spec ({why}); starting the phase afresh")
    return None


def load_init(path: str | Path, expected: dict) -> dict:
    """The previous phase's final checkpoint; refused when it was trained for another spec or other data."""
    state = finished(path)
    why = mismatch(state.get("identity") or {}, expected)
    if why is not None:
        raise CheckpointError(f"{path}: trained for another spec than this phase starts from ({why})")
    return state


def finished(path: str | Path) -> dict:
    """A phase's final checkpoint; a mid-phase resume point (resume.pt) carries the same identity, so it is
    told apart by what only it holds: the interrupted epoch's position and accumulators."""
    state = checkpoint.load(path)
    if "partial" in state:
        raise CheckpointError(
            f"{path}: a mid-phase resume point, not a finished phase's checkpoint (model.pt)"
        )
    return state


def rng_state() -> dict:
    """The CPU generator's state, and the job's own GPU's where it uses one: not every visible GPU's (a resume
    that sees fewer GPUs failed on them), and not by starting CUDA in a CPU job."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict | None) -> None:
    if state is None:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(own_gpu_state(state["cuda"]))


def own_stream(saved, rank: int) -> dict | None:
    """This rank's generator states in a mid-epoch resume point: one per rank, or (written before each rank had
    its own stream) one dict for all. None for a rank the point has none for (it was written with fewer ranks):
    that rank keeps the stream its epoch was seeded with."""
    if isinstance(saved, dict):
        return saved
    return saved[rank] if rank < len(saved) else None


def own_gpu_state(saved) -> torch.Tensor:
    """The saved state for this job's GPU. Resume points written before held a list, one per visible GPU, of
    rank 0's process, whose stream every rank drew then: its own GPU's is the first (under dsd.gpus)."""
    if torch.is_tensor(saved):
        return saved
    return saved[0]


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption) and a first Ctrl-C (SIGINT) ask the loop to checkpoint at the next
    step and exit: an interrupted phase loses a step, not its epoch. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {}
        signals = [signal.SIGTERM, signal.SIGUSR1]
        # Ctrl-C only where Python's own handler has it: an ignored SIGINT (nohup, `&`) stays ignored
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signals.append(signal.SIGINT)
        for sig in signals:
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C raises KeyboardInterrupt; os.write: safe in a handler
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])
            os.write(2, b"dsd: Ctrl-C: checkpointing at the next step (Ctrl-C again to stop at once)\n")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
