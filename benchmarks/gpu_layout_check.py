"""Memory layout on the device: three checks behind the trainer's layout choices.

    python3 benchmarks/gpu_layout_check.py               # on a GPU (--device cpu: a smoke run)

1. Optimizer state in another layout than its weight (a channels-last checkpoint resumed under contiguous
   weights): the fused SGD and AdamW step after torch's own `load_state_dict` and after the trainer's
   `load_optimizer`, each against a resume in the writer's layout (max |difference| of the weights). On the CPU
   torch 2.11's fused kernels pair elements by memory position: torch's load is wrong there, ours is not.
2. `pruner.step`'s multiply (weights and momentum by the masks) on a channels-last ResNet-50: masks in the
   weights' layout (the Pruner's) against masks in the default layout; median ms.
3. Peak memory of a channels-last VGG-16 training step (bf16 autocast on CUDA) with the gradients freed once the
   step is done (the trainer) against freed just before backward: MiB (CUDA only).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dsd.core.masks import Pruner  # noqa: E402
from dsd.engine.trainer import load_optimizer  # noqa: E402

CL = torch.channels_last


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resumed_step(device, kind: str, layout, loader) -> torch.Tensor:
    """One step after resuming, in `layout`, the state of a fused optimizer that stepped once channels-last."""

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3)).to(
            device
        )

    def optimizer(params):
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
        return torch.optim.AdamW(params, lr=0.01, fused=True)

    images = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1)).to(device)
    writer = net().to(memory_format=CL)
    written = optimizer(writer.parameters())
    writer(images.contiguous(memory_format=CL)).mean().backward()
    written.step()
    model = net().to(memory_format=layout)
    model.load_state_dict(writer.state_dict())
    resumed = optimizer(model.parameters())
    loader(resumed, written.state_dict())
    model(images.contiguous(memory_format=layout)).mean().backward()
    resumed.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def check_resume(device) -> None:
    print(
        "1. fused step after resuming channels-last state under contiguous weights (max |diff| to a CL resume)"
    )
    loaders = {
        "torch load_state_dict": lambda o, s: o.load_state_dict(s),
        "dsd load_optimizer": load_optimizer,
    }
    for kind in ("sgd", "adamw"):
        reference = resumed_step(device, kind, CL, load_optimizer)
        for name, loader in loaders.items():
            try:
                resumed = resumed_step(device, kind, torch.contiguous_format, loader)
            except RuntimeError as err:  # CUDA's fused kernels refuse mixed layouts (CPU's pair them wrongly)
                print(f"   {kind} {name}: refused ({str(err).splitlines()[0][:120]})")
                continue
            print(f"   {kind} {name}: {(resumed - reference).abs().max().item():.3g}")


def check_masking(device, reps: int) -> None:
    model = torchvision.models.resnet50().to(device, memory_format=CL)
    pruner = Pruner(model, 0.5, exclude=("conv1.weight",))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    params = pruner._param_list
    tensors = params + [optimizer.state[p]["momentum_buffer"] for p in params]
    ours = pruner._mask_list * 2
    default = [m.contiguous() for m in ours]
    times = {"masks in the weights' layout": [], "masks in the default layout": []}
    with torch.no_grad():
        for rep in range(reps + 1):
            for name, masks in list(times.items())[rep % 2 :] + list(times.items())[: rep % 2]:
                synchronize(device)
                start = time.perf_counter()
                torch._foreach_mul_(tensors, ours if name.startswith("masks in the w") else default)
                synchronize(device)
                if rep:
                    masks.append(time.perf_counter() - start)
    print("2. pruner.step's multiply, channels-last ResNet-50 (weights and momentum), median ms:")
    for name, seconds in times.items():
        print(f"   {name}: {1e3 * statistics.median(seconds):.3f}")


def peak_step_mib(device, free_after_step: bool, batch: int) -> float:
    model = torchvision.models.vgg16().to(device, memory_format=CL)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, fused=True)
    images = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=CL)
    labels = torch.randint(0, 1000, (batch,), device=device)
    for step in range(3):
        if step == 2:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        if not free_after_step:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if free_after_step:
            optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del model, optimizer, images, labels, loss
    torch.cuda.empty_cache()
    return peak


def check_peak(device, batch: int) -> None:
    if device.type != "cuda":
        print("3. peak memory: CUDA only (skipped)")
        return
    print(f"3. peak memory of a channels-last VGG-16 step, batch {batch}, bf16:")
    for free_after_step, name in ((False, "gradients freed before backward"), (True, "freed after the step")):
        print(f"   {name}: {peak_step_mib(device, free_after_step, batch):.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(2 if device.type == "cpu" else torch.get_num_threads())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    check_resume(device)
    check_masking(device, reps=40 if device.type == "cuda" else 2)
    check_peak(device, batch=32)


if __name__ == "__main__":
    main()
