"""Vision loss and metrics: cross-entropy (GoogLeNet's auxiliary heads weighted in), top-1 / top-5 error."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from dsd.core.masks import unwrapped
from dsd.engine import distributed
from dsd.spec import Experiment
from dsd.tracks.vision.data import eval_loader, to_model_input


def loss(model: nn.Module, batch, device: torch.device) -> torch.Tensor:
    images, labels = to_model_input(batch[0], device), batch[1].to(device, non_blocking=True)
    out = model(in_layout_of(model, images))
    if isinstance(out, models.GoogLeNetOutputs):
        # the config's, set on the network: DDP hides it, also inside torch.compile's wrapper
        weight = getattr(unwrapped(model), "aux_loss_weight", 0.3)
        return F.cross_entropy(out.logits, labels) + weight * (
            F.cross_entropy(out.aux_logits1, labels) + F.cross_entropy(out.aux_logits2, labels)
        )
    return F.cross_entropy(out, labels)


def in_layout_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The batch in the model's memory layout, read off its first convolution's weight (channels-last where
    the trainer chose it: `distributed.prefers_channels_last`). A batch in the other layout would be reordered
    inside the first convolution, in the forward pass and again in the backward pass, every step."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    if weight is None or weight.is_contiguous():  # contiguous, or a shape where the two layouts coincide
        return images
    channels_last = weight.is_contiguous(memory_format=torch.channels_last)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.no_grad()
def _top_k(
    model: nn.Module,
    exp: Experiment,
    split: str,
    device: torch.device,
    batch_size: int,
    per_item: bool = False,
) -> tuple[dict, list[int] | None]:
    """Metrics, and with `per_item` each image's top-1 error (0/1, in the split's order; kept on the device
    until the end, so no sync per batch). Under torch.distributed each rank scores its shard of the split;
    the counts are summed and the per-image errors gathered."""
    model.eval()
    errors: list[torch.Tensor] = []
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, samples, loss sum
    for images, labels in eval_loader(exp, split, batch_size, shard=True):
        images, labels = to_model_input(images, device), labels.to(device, non_blocking=True)
        logits = model(in_layout_of(model, images))
        batch, hits = _batch_counts(logits, labels)
        counts += batch
        if per_item:
            errors.append(~hits[:, 0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    top1, top5, total, loss_sum = counts.tolist()
    metrics = {
        "top1_error_pct": 100.0 * (1 - top1 / total),
        "top5_error_pct": 100.0 * (1 - top5 / total),
        "loss": loss_sum / total,
    }
    if not per_item:
        return metrics, None
    mine = torch.cat(errors).int().tolist() if errors else []
    return metrics, distributed.gather_strided(mine)


def _batch_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's (top-1 hits, top-5 hits, samples, loss sum) as float64 on the device, and its top-k hits. The
    sample count is filled in on the device: a tensor made from a Python number there (`new_tensor`) is a
    blocking copy on a GPU, a wait for the batch's forward pass."""
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices == labels[:, None]
    samples = torch.full((), labels.numel(), dtype=torch.float64, device=labels.device)
    batch = (hits[:, 0].sum(), hits.any(dim=1).sum(), samples,
             F.cross_entropy(logits.float(), labels, reduction="sum"))  # fmt: skip
    return torch.stack([value.double() for value in batch]), hits


def evaluate(model, exp: Experiment, split: str, device, n_samples: int = 0) -> tuple[dict, list, dict]:
    """Top-1 / top-5 error (percent) and mean loss on a split; each image's top-1 error (the items the
    report's interval resamples); no qualitative samples for images."""
    metrics, errors = _top_k(model, exp, split, device, exp.eval.batch_size, per_item=True)
    return metrics, [], {"errors": errors}


def monitor(model, exp: Experiment, device) -> dict:
    """The per-epoch validation during training: the same metrics, in training-size batches."""
    return _top_k(model, exp, "val", device, exp.train.batch_size)[0]


def check(exp: Experiment) -> None:
    """Evaluation needs nothing beyond the data, which preparing the data set checks."""
