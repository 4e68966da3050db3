"""Vision track settings: GoogLeNet, VGG-16, ResNet-18 / ResNet-50 (or any torchvision classification model) on
ImageFolder data; top-1 / top-5 error.

Plain Python (no torch): read when a config is checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dsd.errors import ConfigError
from dsd.hparams import option

METRIC = "top1_error_pct"
HIGHER_IS_BETTER = False
MONITOR_PREFIX = ""  # the per-epoch validation computes what evaluation does
FIXED_SHAPES = True  # fixed crops: cuDNN's autotuner pays off
# imagenet and imagefolder read the same layouts (class folders; ImageNet's flat val/ with its labels file too);
# the name tells the tables and the fidelity check which one it is
DATASETS = {"shapes": "generated", "imagenet": "folder", "imagefolder": "folder"}
MINI_ARCHS = ("resnet18", "resnet50", "vgg16", "googlenet")
SOURCE_KEYS = (
    "train_dir",
    "val_dir",
    "test_dir",
    "val_labels",
    "val_meta",
    "generate",
)  # what preparing the data set reads


def chance_level(model: dict) -> float:
    """METRIC of a model that guesses: top-1 error when one of num_classes is picked at random."""
    return 100.0 * (1.0 - 1.0 / model["num_classes"])


@dataclass(frozen=True)
class Model:
    arch: str = option(
        "resnet18",
        "full: any torchvision classification model by name (resnet18, vgg16, mobilenet_v3_small, ...) or "
        "timm:<name> where timm is installed; mini: resnet18, resnet50, vgg16 or googlenet",
    )
    size: Literal["full", "mini"] = option(
        "full", "full: torchvision's model; mini: same family, scaled down"
    )
    args: dict = option(
        factory=dict, help="full: more constructor arguments of the torchvision model (e.g. {dropout: 0.2})"
    )
    width: int = option(16, "mini: channels of the first stage", min=1)
    num_classes: int = option(1000, "output classes (at least the data set's)", min=2)
    dropout: float = option(
        0.5,
        "dropout of the classifier of vgg16 (mini and full) and mini googlenet (0.4 times this); other models "
        "take none from here (full: give it in args)",
        min=0,
        lt=1,
    )
    aux_loss_weight: float = option(
        0.3,
        "GoogLeNet (full): weight of the auxiliary classifiers' losses; 0 builds the network without them "
        "(torchvision's pretrained weights have none trained)",
        min=0,
    )
    weights: str | None = option(
        None,
        "pretrained start: a local state-dict file, or torchvision's by name (IMAGENET1K_V1) from the torch cache",
    )


@dataclass(frozen=True)
class Generate:
    """The embedded `shapes` data set: 10 classes of generated photographs."""

    seed: int = option(0, "generator seed", min=0)
    size: int = option(32, "image side in pixels", min=8)
    per_class: dict[str, int] = option(
        factory=lambda: {"train": 200, "val": 50, "test": 150},
        help="images per class and split, every split the row reads (a mapping given replaces this one whole; "
        "the test set is shared by every seed: its draw is in the interval)",
    )


@dataclass(frozen=True)
class Data:
    image_size: int = option(224, "training crop and evaluation crop side", min=1)
    resize: int = option(
        256,
        "evaluation (and training with train_crop random): resize the shorter side to this, then crop",
        min=1,
    )
    crop_scale_min: float = option(
        0.08, "train_crop random_resized: RandomResizedCrop's smallest area fraction", gt=0, max=1
    )
    train_crop: Literal["random_resized", "random"] = option(
        "random_resized",
        "training crop: RandomResizedCrop (random_resized: crop_scale_min-1 of the area, aspect 3/4-4/3, resized "
        "to image_size) or Caffe's crop_size at one scale (random: the shorter side resized to `resize`, a "
        "uniformly placed image_size square cut out); either flipped at random",
        added=True,
    )
    train_dir: str = option("train", "training split folder, inside the data set")
    val_dir: str = option("val", "validation split folder (per-epoch monitor, sweep choice)")
    test_dir: str = option("val", "test split folder (ImageNet reports on its validation set)")
    val_labels: str | None = option(
        None,
        "flat val/: LOC_val_solution.csv (Kaggle) or the devkit's ground truth, inside the data folder "
        "(default: found by their usual names)",
    )
    val_meta: str | None = option(None, "the devkit's meta.mat, for its ground truth (default: beside it)")
    in_memory: bool = option(False, "decode every image once per process (small data sets)")
    decode: Literal["cpu", "device"] = option(
        "cpu",
        "training JPEGs: decoded and cropped by the DataLoader workers (cpu), or read and their crops drawn there "
        "and decoded and cropped on the training device (device: nvJPEG on a GPU; the same crops)",
    )
    generate: Generate = option(factory=Generate, help="embedded data set only: how it is generated")


@dataclass(frozen=True)
class Eval:
    batch_size: int = option(256, "evaluation batch size", min=1)


def weights_file(model: Model) -> str | None:
    """`model.weights` when it names a local state-dict file rather than torchvision's weights by name."""
    weights = model.weights
    return (
        weights if weights and (Path(weights).suffix in (".pth", ".pt", ".bin") or "/" in weights) else None
    )


def check(row, where: str) -> None:
    """Settings that cannot work together; a model with fewer outputs than the generated data set has classes
    cannot learn it."""
    if row.model.size == "mini" and row.model.arch not in MINI_ARCHS:
        raise ConfigError(
            f"{where}.model.arch: size mini is one of {', '.join(MINI_ARCHS)}, got {row.model.arch!r}"
        )
    if row.data.decode == "device" and row.data.in_memory:
        raise ConfigError(
            f"{where}.data.decode: device decodes files as they are read; in_memory images are decoded once "
            "already (set one of them)"
        )
    if row.data.train_crop == "random" and row.data.resize < row.data.image_size:
        raise ConfigError(
            f"{where}.data.resize: train_crop random cuts image_size {row.data.image_size} squares from images "
            f"resized to this on the shorter side: must be >= image_size, got {row.data.resize}"
        )
    if row.dataset == "shapes":  # the generated splits must be the folders the row reads, each non-empty
        counts, data = row.data.generate.per_class, row.data
        for split in dict.fromkeys((data.train_dir, data.val_dir, data.test_dir)):
            if split not in counts:  # `per_class: {test: 1000}` replaces the default mapping whole
                raise ConfigError(
                    f"{where}.data.generate.per_class.{split}: missing (per_class replaces the default "
                    f"{Generate().per_class} whole: give every split the row reads)"
                )
            if counts[split] < 1:
                raise ConfigError(
                    f"{where}.data.generate.per_class.{split}: must be >= 1, got {counts[split]}"
                )
    if row.dataset == "shapes" and row.model.num_classes < 10:
        raise ConfigError(
            f"{where}.model.num_classes: the shapes data set has 10 classes, got {row.model.num_classes}"
        )


def check_config(row, config, where: str) -> None:
    """Where the data set is already prepared, its class count bounds num_classes."""
    marker = Path(config.options.data_root) / f"{row.dataset}.prepared.json"
    if not marker.is_file():
        return
    try:
        summary = json.loads(marker.read_text()).get("summary", {})
    except (OSError, ValueError):
        return
    classes = summary.get("classes")
    count = len(classes) if isinstance(classes, list) else classes
    if isinstance(count, int) and row.model.num_classes < count:
        raise ConfigError(
            f"{where}.model.num_classes: {row.model.num_classes}, but the prepared {row.dataset} has {count} classes"
        )


def eval_inputs(exp) -> list[str]:
    """Files an evaluation reads whose content no eval setting holds: none."""
    return []


def upstream(row) -> dict:
    return {}


def content_inputs(exp) -> dict:
    """Files a phase reads whose content no spec holds (dsd.engine.trainer.input_digests): a local
    `model.weights` file, named by its path."""
    return {"model.weights": weights_file(exp.model)}
