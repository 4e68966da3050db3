"""Vision track: GoogLeNet, VGG-16, ResNet-18, ResNet-50 on ImageFolder data; top-1 / top-5 error.

Paper scale uses torchvision's models unchanged. Embedded scale (`size: mini`) builds members of the same
families from torchvision's own blocks (BasicBlock, Bottleneck, Inception, VGG conv stacks) with fewer
channels and blocks and a stride-1 stem for small inputs. The first conv has the same parameter name at both
scales, so one `exclude` pattern keeps it dense.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision import datasets, models
from torchvision.io import ImageReadMode, decode_image
from torchvision.models.googlenet import BasicConv2d, Inception
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import roi_align
from torchvision.transforms import v2

from dsd import data, shapes
from dsd.config import Experiment, parse_dataclass
from dsd.tracks import DataError

METRIC = "top1_error_pct"
HIGHER_IS_BETTER = False
ARCHS = ("resnet18", "resnet50", "vgg16", "googlenet")
FIRST_CONV = {"resnet18": "conv1.weight", "resnet50": "conv1.weight", "vgg16": "features.0.weight"}
FIRST_CONV["googlenet"] = "conv1.conv.weight"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    size: str = "full"  # full: torchvision's model; mini: same family, scaled down
    width: int = 16  # mini: channels of the first stage
    num_classes: int = 1000
    dropout: float = 0.5
    aux_loss_weight: float = 0.3  # GoogLeNet auxiliary classifiers (full size; dropped at evaluation)
    weights: str | None = (
        None  # a local state-dict file, or "IMAGENET1K_V1" (needs network) for a pretrained start
    )


class MiniResNet(nn.Module):
    """ResNet with torchvision's blocks, one block per stage, widths w, 2w, 4w, 8w; the stem keeps full
    resolution and the first stage halves it (small inputs, CPU budget)."""

    def __init__(self, block: type[nn.Module], width: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, inplanes = [], width
        for i in range(4):
            planes, stride = width * 2**i, 2
            out = planes * block.expansion
            downsample = None
            if stride != 1 or inplanes != out:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
                )
            stages.append(block(inplanes, planes, stride, downsample))
            inplanes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MiniVGG(nn.Module):
    """VGG: 3x3 conv stacks and max pools, no batch norm (like the paper's Caffe model), 3 FC layers."""

    def __init__(self, width: int, num_classes: int, dropout: float):
        super().__init__()
        plan = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width, "M"]
        layers, channels = [], 3
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = 16 * width
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

        for m in self.features:  # He initialisation: without batch norm the default init stalls training
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MiniGoogLeNet(nn.Module):
    """GoogLeNet: BasicConv2d stem and torchvision's Inception modules (no auxiliary heads at this size)."""

    def __init__(self, width: int, num_classes: int, dropout: float):
        super().__init__()
        w = width
        self.conv1 = BasicConv2d(3, w, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(2)
        self.conv2 = BasicConv2d(w, 2 * w, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(2)
        self.inception3a = Inception(2 * w, w, w, 2 * w, w // 4, w // 2, w // 2)  # -> 4w channels
        self.inception3b = Inception(4 * w, 2 * w, 2 * w, 3 * w, w // 2, w, w)  # -> 7w
        self.maxpool3 = nn.MaxPool2d(2)
        self.inception4a = Inception(7 * w, 3 * w, 2 * w, 4 * w, w // 2, w, w)  # -> 9w
        self.inception5a = Inception(9 * w, 4 * w, 3 * w, 5 * w, w // 2, 2 * w, 2 * w)  # -> 13w
        self.dropout = nn.Dropout(dropout * 0.4)
        self.fc = nn.Linear(13 * w, num_classes)

    def forward(self, x):
        x = self.maxpool2(self.conv2(self.maxpool1(self.conv1(x))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception5a(self.inception4a(x))
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def build_model(exp: Experiment) -> nn.Module:
    cfg = parse_dataclass(ModelConfig, exp.model, f"config.experiments.{exp.row}.model")
    if cfg.arch not in ARCHS:
        raise ValueError(
            f"config.experiments.{exp.row}.model.arch: expected one of {ARCHS}, got {cfg.arch!r}"
        )
    if cfg.size == "mini":
        if cfg.arch == "resnet18":
            return MiniResNet(BasicBlock, cfg.width, cfg.num_classes)
        if cfg.arch == "resnet50":
            return MiniResNet(Bottleneck, cfg.width, cfg.num_classes)
        if cfg.arch == "vgg16":
            return MiniVGG(cfg.width, cfg.num_classes, cfg.dropout)
        return MiniGoogLeNet(cfg.width, cfg.num_classes, cfg.dropout)
    if cfg.size != "full":
        raise ValueError(f"config.experiments.{exp.row}.model.size: expected full or mini, got {cfg.size!r}")
    extra = {"aux_logits": True, "init_weights": True} if cfg.arch == "googlenet" else {}
    if cfg.arch == "vgg16":
        extra = {"dropout": cfg.dropout}
    model = models.get_model(cfg.arch, num_classes=cfg.num_classes, **extra)
    if cfg.weights == "IMAGENET1K_V1":  # only when the config asks: this downloads
        pretrained = models.get_model(
            cfg.arch, weights="IMAGENET1K_V1", **({"aux_logits": True} if extra else {})
        )
        model.load_state_dict(pretrained.state_dict())
    elif cfg.weights:
        path = Path(cfg.weights)
        if not path.is_file():
            raise DataError(f"{path}: pretrained weights file not found (model.weights)")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if cfg.arch == "googlenet":
        model.aux_loss_weight = cfg.aux_loss_weight
    return model


def first_conv(arch: str) -> str:
    return FIRST_CONV[arch]


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig:
    image_size: int = 224
    resize: int = 256
    crop_scale_min: float = 0.08
    train_dir: str = "train"
    val_dir: str = "val"
    test_dir: str = "val"  # ImageNet reports on its validation set
    in_memory: bool = False  # decode every image once per process (small data sets)
    generate: dict | None = None  # embedded data set: per-class counts, image size, seed


def _data_config(exp: Experiment) -> DataConfig:
    return parse_dataclass(DataConfig, exp.data, f"config.experiments.{exp.row}.data")


def _decode(path: str) -> torch.Tensor:
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except Exception as err:
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None


class ImageFolderData(Dataset):
    """torchvision's ImageFolder indexing with one decoder for every image (corrupt files named).

    In memory (small data sets of one image size) a batch is transformed in one go: `__getitems__` crops
    every image of the batch with `batch_random_resized_crop` (about 2 ms per batch of 32 on one CPU thread,
    against 11 ms image by image).
    """

    def __init__(self, root: Path, cfg: DataConfig, train: bool, in_memory: bool):
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found (expected <split>/<class>/*.jpg)")
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            if not any(f.is_file() for f in class_dir.iterdir()):
                raise DataError(f"{class_dir}: class folder is empty")
        try:
            folder = datasets.ImageFolder(root)
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"{root}: {err}") from None
        self.classes, self.samples = folder.classes, folder.samples
        self.cfg, self.train, self.transform = cfg, train, transforms(cfg, train)
        self.images = None
        if in_memory:
            images = [_decode(p) for p, _ in self.samples]
            sizes = {tuple(image.shape) for image in images}
            self.images = torch.stack(images) if len(sizes) == 1 else images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = self.images[index] if self.images is not None else _decode(path)
        return self.transform(image), label

    def __getitems__(self, indices: list[int]):
        if not isinstance(self.images, torch.Tensor):
            return [self[i] for i in indices]
        batch = self.images[indices]
        if self.train:
            batch = batch_random_resized_crop(batch, self.cfg.image_size, (self.cfg.crop_scale_min, 1.0))
            flip = torch.rand(len(indices)) < 0.5
            batch[flip] = batch[flip].flip(-1)
            batch = v2.functional.normalize(batch, IMAGENET_MEAN, IMAGENET_STD)
        else:  # deterministic: the same resize and crop for every image
            batch = self.transform(batch)
        return list(zip(batch, [self.samples[i][1] for i in indices], strict=True))


def batch_random_resized_crop(
    images: torch.Tensor, size: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> torch.Tensor:
    """RandomResizedCrop for a whole uint8 batch, a box per image; float output in [0, 1].

    The boxes are resampled with roi_align (bilinear, averaging when shrinking): one kernel call per batch.
    """
    n, _, height, width = images.shape
    top, left, h, w = random_resized_boxes(n, height, width, scale, ratio)
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), left, top, left + w, top + h], dim=1)
    floats = images.float().div_(255)
    return roi_align(floats, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def random_resized_boxes(n: int, height: int, width: int, scale, ratio, tries: int = 10):
    """n draws of RandomResizedCrop's box as (top, left, height, width) float tensors.

    Per box up to `tries` (area, aspect) draws, the first that fits is kept; else torchvision's fallback,
    the largest centered box within the ratio range.
    """
    area = height * width * torch.empty(n, tries).uniform_(*scale)
    log_ratio = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * torch.exp(log_ratio)).round()
    h = torch.sqrt(area / torch.exp(log_ratio)).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    fallback_w, fallback_h = width, height
    if width / height < ratio[0]:
        fallback_h = round(width / ratio[0])
    elif width / height > ratio[1]:
        fallback_w = round(height * ratio[1])
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    top = torch.where(found, (torch.rand(n) * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(found, (torch.rand(n) * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return top, left, h, w


def transforms(cfg: DataConfig, train: bool):
    if train:
        head = [
            v2.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, 1.0)),
            v2.RandomHorizontalFlip(),
        ]
    else:
        head = [v2.Resize(cfg.resize), v2.CenterCrop(cfg.image_size)]
    return v2.Compose(
        [*head, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


_CACHE: dict = {}


def dataset(exp: Experiment, split: str) -> ImageFolderData:
    """One dataset object per (folder, split) per process, so in-memory images are decoded once."""
    cfg = _data_config(exp)
    folder = {"train": cfg.train_dir, "val": cfg.val_dir, "test": cfg.test_dir}[split]
    key = (exp.data_dir, folder, split == "train", json.dumps(exp.data, sort_keys=True))
    if key not in _CACHE:
        _CACHE[key] = ImageFolderData(Path(exp.data_dir) / folder, cfg, split == "train", cfg.in_memory)
    return _CACHE[key]


def train_loader(exp: Experiment, seed: int, epoch: int, skip_batches: int = 0):
    return data.loader(
        dataset(exp, "train"),
        exp.train.batch_size,
        train=True,
        seed=seed,
        epoch=epoch,
        workers=exp.train.workers,
        skip_batches=skip_batches,
    )


def eval_loader(exp: Experiment, split: str):
    return data.loader(dataset(exp, split), exp.train.eval_batch_size, train=False, workers=exp.train.workers)


def prepare_shapes(exp: Experiment) -> dict:
    options = dict(_data_config(exp).generate or {})
    return shapes.generate(exp.data_dir, **options)


def check_imagefolder(exp: Experiment) -> dict:
    """Checks a real ImageFolder data set (ImageNet): folders present, no empty class, same classes."""
    cfg = _data_config(exp)
    root = Path(exp.data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (set data.{exp.dataset} to the data set's folder)")
    summary = {}
    for folder in dict.fromkeys((cfg.train_dir, cfg.val_dir, cfg.test_dir)):
        split_dir = root / folder
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: split folder not found (expected <class>/*.JPEG inside)")
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{split_dir}: no class folders")
        for name in classes:
            if not any((split_dir / name).iterdir()):
                raise DataError(f"{split_dir / name}: class folder is empty")
        summary[folder] = {"classes": len(classes)}
    class_counts = {v["classes"] for v in summary.values()}
    if len(class_counts) != 1:
        raise DataError(f"{root}: splits have different numbers of classes: {json.dumps(summary)}")
    return summary


DATASETS = {"shapes": prepare_shapes, "imagenet": check_imagefolder}
CONFIGS = {"model": ModelConfig, "data": DataConfig}


# ----------------------------------------------------------------------------------------------- loss
def loss(model: nn.Module, batch, device: torch.device) -> torch.Tensor:
    images, labels = (t.to(device, non_blocking=True) for t in batch)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    out = model(images)
    if isinstance(out, models.GoogLeNetOutputs):
        weight = getattr(model, "aux_loss_weight", 0.3)
        return F.cross_entropy(out.logits, labels) + weight * (
            F.cross_entropy(out.aux_logits1, labels) + F.cross_entropy(out.aux_logits2, labels)
        )
    return F.cross_entropy(out, labels)


# --------------------------------------------------------------------------------------------- metric
@torch.no_grad()
def evaluate(model: nn.Module, exp: Experiment, split: str, device: torch.device) -> dict[str, float]:
    model.eval()
    top1 = top5 = total = 0
    loss_sum = 0.0
    for images, labels in eval_loader(exp, split):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=1).sum())
        total += labels.numel()
    return {
        "top1_error_pct": 100.0 * (1 - top1 / total),
        "top5_error_pct": 100.0 * (1 - top5 / total),
        "loss": loss_sum / total,
    }


def check(exp: Experiment) -> None:
    """Evaluation needs nothing beyond the data, which the data rule checks."""


def samples(model: nn.Module, exp: Experiment, device: torch.device, n: int) -> list[dict]:
    return []
