"""Vision data: ImageFolder splits (ImageNet's layout, and the generated `shapes` in the same layout), the
training augmentation (data.train_crop: RandomResizedCrop, or a random crop at one scale as Caffe's crop_size;
either with a flip) and the evaluation transform (resize + centre crop)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms import v2

from dsd import hparams, paths
from dsd.engine import distributed, loaders
from dsd.errors import DataError
from dsd.paths import read_text
from dsd.spec import Experiment
from dsd.tracks.vision import synthetic
from dsd.tracks.vision.config import Data

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def decode(path: str) -> torch.Tensor:
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except Exception as err:
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None


class SampleTable:
    """(path, label) pairs held as arrays (loaders.PackedStrings and the labels): a list of ImageNet's 1.28M
    (str, int) tuples was copied into every loader worker, ~220 MB each (see PackedStrings)."""

    def __init__(self, samples):
        self.paths = loaders.PackedStrings(path for path, _ in samples)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.paths[index], int(self.labels[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class ImageFolderData(Dataset):
    """Images with labels, one decoder for every image (corrupt files named).

    In memory (small data sets of one image size) a batch is transformed in one go: `__getitems__` crops
    every image of the batch with `batch_random_resized_crop` (one kernel call per batch, not per image) or
    `batch_random_crop`.
    """

    def __init__(self, samples: list[tuple[str, int]], cfg: Data, train: bool, in_memory: bool):
        self.samples = SampleTable(samples)
        self.cfg, self.train, self.transform = cfg, train, transforms(cfg, train)
        self.images = None
        if in_memory:
            images = [decode(p) for p, _ in self.samples]
            sizes = {tuple(image.shape) for image in images}
            self.images = torch.stack(images) if len(sizes) == 1 else images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        """`key`: an index, or (index, seed) from a persistent loader (augmentation seeded per sample)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        if self.train and self.cfg.decode == "device":
            with _seeded(seed):
                return encoded_crop(path, self.transform, self.cfg.image_size), label
        image = self.images[index] if self.images is not None else decode(path)
        with _seeded(seed):
            if not self.train:
                return self.transform(image), label
            scaled, box, flipped = draw_crop(self.transform, *image.shape[-2:])
            if self.cfg.train_crop == "random":
                return scaled_crop(image, scaled, box, flipped), label
            return resized_crop(image, box, flipped, self.cfg.image_size), label

    def __getitems__(self, keys: list):
        """In memory, a batch is one draw: keyed, its first key's seed seeds it (so under DDP, where each rank
        transforms its slice, the crops differ from one process's, the order and samples do not)."""
        if not isinstance(self.images, torch.Tensor):
            return [self[key] for key in keys]
        keyed = isinstance(keys[0], tuple)
        with _seeded(keys[0][1] if keyed else None):
            return self._batch([key[0] for key in keys] if keyed else keys)

    def _batch(self, indices: list[int]):
        batch = self.images[indices]
        if self.train:
            if self.cfg.train_crop == "random":
                batch = batch_random_crop(batch, self.cfg.resize, self.cfg.image_size)
            else:
                batch = batch_random_resized_crop(batch, self.cfg.image_size, (self.cfg.crop_scale_min, 1.0))
            flip = torch.rand(len(indices)) < 0.5
            batch[flip] = batch[flip].flip(-1)
            batch = v2.functional.normalize(batch, IMAGENET_MEAN, IMAGENET_STD)
        else:  # deterministic: the same resize and crop for every image
            batch = self.transform(batch)
        return list(zip(batch, [self.samples[i][1] for i in indices], strict=True))


class EncodedCrops(NamedTuple):
    """A training batch to decode on the device: the JPEG files back to back in one tensor (one shared-memory
    block from a worker, not one per image) and each one's length; other images (not a JPEG; a grayscale or
    CMYK one) decoded by the worker instead (length 0, in `decoded`); each image's size (height, width) scaled
    to before cropping (train_crop random; else its own), crop box (top, left, height, width) in it, flip, and
    the crop side."""

    files: torch.Tensor
    lengths: torch.Tensor
    decoded: list[torch.Tensor]
    scaled: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    size: int
    paths: list[str]


def encoded_crop(path: str, transform: v2.Compose, size: int):
    """A file's bytes and the scaling, crop and flip `transform` would draw for it (`draw_crop`): the same
    draws in the same order, so the same crops as the workers' decoding path. Only the header is parsed here."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        with Image.open(io.BytesIO(raw)) as header:
            width, height, jpeg = *header.size, header.format == "JPEG" and header.mode == "RGB"
    except Exception as err:
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None
    scaled, box, flipped = draw_crop(transform, height, width)
    data = raw if jpeg else decode(path)
    return data, scaled, box, flipped, size, path


def draw_crop(transform: v2.Compose, height: int, width: int) -> tuple[list[int], list[int], bool]:
    """For an image of this size, the size (height, width) `transform` scales it to first, the crop box (top,
    left, height, width) in that, and the flip: the transform's own draws, in its order. RandomResizedCrop,
    flip: not scaled (its box is resized); Resize, RandomCrop, flip: an image_size box, placed uniformly."""
    *crops, flip = transform.transforms
    scaled = [height, width]
    if isinstance(crops[0], v2.Resize):
        scaled = scaled_size(height, width, crops[0].size[0])
    box = crops[-1].make_params([torch.empty(()).expand(3, *scaled)])
    flipped = bool(torch.rand(1) < flip.p)  # v2.RandomHorizontalFlip's draw
    return scaled, [box["top"], box["left"], box["height"], box["width"]], flipped


def scaled_size(height: int, width: int, shorter: int) -> list[int]:
    """(height, width) after v2.Resize(shorter): the shorter side `shorter`, the longer one in proportion,
    truncated (torchvision's rule), so a worker knows the size from the file's header alone."""
    short, long = min(height, width), max(height, width)
    long = int(shorter * long / short)
    return [shorter, long] if height <= width else [long, shorter]


def scaled_crop(image: torch.Tensor, scaled: list[int], box: list[int], flipped: bool) -> torch.Tensor:
    """train_crop random: the uint8 image resized to `scaled` as v2.Resize does (bilinear, antialiased), the box
    cut out of it at that scale, flipped."""
    top, left, height, width = box
    out = v2.functional.resize(image, scaled, antialias=True)[:, top : top + height, left : left + width]
    return out.flip(-1) if flipped else out


def resized_crop(image: torch.Tensor, box: list[int], flipped: bool, size: int) -> torch.Tensor:
    """A uint8 image's crop, resized to size x size as RandomResizedCrop does (bilinear, antialiased) and
    flipped: the pixels of `v2.functional.resized_crop`, from the crop copied to channels-last memory first,
    where torch's uint8 resampling kernel is vectorised (the copy costs less than it saves)."""
    top, left, height, width = box
    crop = image[None, :, top : top + height, left : left + width].contiguous(
        memory_format=torch.channels_last
    )
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
    return out.flip(-1) if flipped else out


def collate_encoded(samples: list) -> tuple[EncodedCrops, torch.Tensor]:
    (data, scaled, boxes, flips, sizes, paths) = zip(*(sample for sample, _ in samples), strict=True)
    files = [d for d in data if isinstance(d, bytes)]
    batch = EncodedCrops(
        files=torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8) if files else torch.empty(0),
        lengths=torch.tensor([len(d) if isinstance(d, bytes) else 0 for d in data]),
        decoded=[d for d in data if not isinstance(d, bytes)],
        scaled=torch.tensor(scaled),
        boxes=torch.tensor(boxes),
        flips=torch.tensor(flips),
        size=sizes[0],
        paths=list(paths),
    )
    return batch, torch.tensor([label for _, label in samples])


def _decode_files(batch: EncodedCrops, device) -> list[torch.Tensor]:
    """The batch's JPEGs in one decoding call; if that fails, one by one, on the CPU (libjpeg-turbo, as the
    workers) where the device's decoder cannot take a file, naming a file that neither decodes."""
    lengths = batch.lengths.tolist()
    files = list(torch.split(batch.files, [n for n in lengths if n > 0]))
    try:
        return _decode_jpeg(files, device)
    except RuntimeError:
        paths = [path for path, n in zip(batch.paths, lengths, strict=True) if n > 0]
        return [
            _decode_one(data, path, torch.device(device)) for data, path in zip(files, paths, strict=True)
        ]


def _decode_jpeg(data, device) -> torch.Tensor | list[torch.Tensor]:
    """torchvision's decode_jpeg, after draining the current CUDA stream when it decodes there. Its GPU decoder
    takes its output blocks from the caching allocator on this stream but writes them from its own stream
    without waiting for this one, so a block freed here while queued kernels still read it (the last step's
    activations, say) is overwritten under them: NaN losses on an H100 (make gpu-bench, decode: device) until
    this wait. pytorch/vision#9606 describes the race. The decode call already blocks until its own work is
    done, so the extra wait costs little: on H100s it stayed within the spread between machines (README)."""
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    try:
        return _decode_jpeg(data, device)
    except RuntimeError as err:
        if device.type == "cpu":
            raise DataError(f"{path}: cannot decode image (RuntimeError: {err})") from None
    return _decode_one(data, path, torch.device("cpu")).to(device)


def decode_crops(batch: EncodedCrops, device) -> torch.Tensor:
    """The uint8 crops of an encoded batch, decoded (nvJPEG on a GPU, one batched call), scaled (train_crop
    random; v2's resize returns an image of the size asked as it is), cropped, resized with antialiasing as
    RandomResizedCrop does (the same: a box of the crop's size) and flipped, on `device`."""
    decoded = iter(_decode_files(batch, device) if len(batch.files) else [])
    by_worker = iter(batch.decoded)
    images = [next(decoded) if n > 0 else next(by_worker).to(device) for n in batch.lengths.tolist()]
    crops = [
        v2.functional.resized_crop(
            v2.functional.resize(image, scaled.tolist(), antialias=True),
            *box.tolist(),
            [batch.size, batch.size],
            antialias=True,
        )
        for image, scaled, box in zip(images, batch.scaled, batch.boxes, strict=True)
    ]
    out = torch.stack(crops)
    flips = distributed.to_device(batch.flips, device)  # a pageable copy would wait for the crops above
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Draw from torch's global CPU generator seeded with `seed` (None: as it is); in the main process its state
    is restored afterwards, so dropout and the next epoch's draws do not depend on the data path. The CPU
    generator alone: `torch.manual_seed` also queues a seeding of every CUDA generator, with a stack trace per
    call while CUDA is not initialised (as in a worker), a cost per image."""
    if seed is None:
        yield
        return
    in_worker = torch.utils.data.get_worker_info() is not None
    with contextlib.nullcontext() if in_worker else torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


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


def batch_random_crop(images: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """train_crop random for a whole uint8 batch: resized in one call (the shorter side to `resize`, as
    `scaled_crop`), a uniformly placed size x size box per image; float output in [0, 1]."""
    scaled = v2.functional.resize(images, scaled_size(*images.shape[-2:], resize), antialias=True)
    top, left = random_crop_offsets(len(images), *scaled.shape[-2:], size)
    crops = [image[:, y : y + size, x : x + size] for image, y, x in zip(scaled, top, left, strict=True)]
    return torch.stack(crops).float().div_(255)


def random_crop_offsets(n: int, height: int, width: int, size: int) -> tuple[list[int], list[int]]:
    """n uniform (top, left) offsets of a size x size box inside height x width."""
    top = torch.randint(0, height - size + 1, (n,)).tolist()
    left = torch.randint(0, width - size + 1, (n,)).tolist()
    return top, left


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


def transforms(cfg: Data, train: bool):
    """Crop (and flip) in uint8: a quarter of float32's bytes through the workers' queues and the copy to the
    device; `to_model_input` scales and normalises there."""
    if train and cfg.train_crop == "random":  # Caffe's crop_size + mirror, at one scale
        return v2.Compose([v2.Resize(cfg.resize), v2.RandomCrop(cfg.image_size), v2.RandomHorizontalFlip()])
    if train:
        return v2.Compose(
            [v2.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, 1.0)), v2.RandomHorizontalFlip()]
        )
    return v2.Compose([v2.Resize(cfg.resize), v2.CenterCrop(cfg.image_size)])


def to_model_input(images: torch.Tensor, device) -> torch.Tensor:
    """A batch on the device, as the model takes it: uint8 crops scaled to [0, 1] and normalised there (the
    same operations the workers did before, so the same numbers); float batches (in memory, training) as
    they come."""
    if isinstance(images, EncodedCrops):
        images = decode_crops(images, device)
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = v2.functional.to_dtype(images, torch.float32, scale=True)
        mean, std = _normalisation(images.device)
        images = images.sub(mean).div_(std)  # v2.functional.normalize's arithmetic, bitwise
    return images


_NORMALISATION: dict = {}


def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (3, 1, 1) float32 tensors on `device`, made once per device. torchvision's
    `normalize` makes them from Python numbers on every call: on a GPU a blocking copy, which waits for all the
    work queued before it (the last step's backward and optimizer), every step."""
    if device not in _NORMALISATION:
        _NORMALISATION[device] = tuple(
            torch.as_tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)
            for values in (IMAGENET_MEAN, IMAGENET_STD)
        )
    return _NORMALISATION[device]


_CACHE: dict = {}


def dataset(exp: Experiment, split: str) -> ImageFolderData:
    """One dataset object per (folder, split, settings) per process, so in-memory images are decoded once."""
    cfg = exp.data
    folder = {"train": cfg.train_dir, "val": cfg.val_dir, "test": cfg.test_dir}[split]
    key = (exp.data_dir, folder, split == "train", json.dumps(hparams.as_dict(cfg), sort_keys=True))
    if key not in _CACHE:
        found = samples(exp, folder)
        check_unchanged_since_prepared(exp, folder, len(found))
        _CACHE[key] = ImageFolderData(found, cfg, split == "train", cfg.in_memory)
    return _CACHE[key]


def check_unchanged_since_prepared(exp: Experiment, folder: str, found: int) -> None:
    """As many images in `folder` as when the data set was prepared: images deleted since (a clean-up, a copy
    cut short) trained and scored silently on the rest. No marker, or one without counts: nothing to compare."""
    expected = prepared_images(exp, folder)
    if expected is not None and found != expected:
        raise DataError(
            f"{Path(exp.data_dir) / folder}: {found} images, {expected} when data set {exp.dataset!r} was "
            f"prepared (files removed or added since); run: dsd prepare --config ... --row {exp.row}"
        )


def prepared_images(exp: Experiment, folder: str) -> int | None:
    """The images `folder` held when the data set was prepared, from its marker's summary (generated: per
    split; real: per split folder)."""
    try:
        summary = paths.read_json(paths.prepared(exp.options.data_root, exp.dataset)).get("summary") or {}
    except (OSError, DataError):
        return None
    counts = summary.get("splits", {}).get(folder, {}).get("images") if "splits" in summary else None
    return counts if counts is not None else (summary.get("images") or {}).get(folder)


def classes(exp: Experiment) -> list[str]:
    """The class names (ImageNet: synsets), sorted, from the training split's class folders."""
    root = Path(exp.data_dir) / exp.data.train_dir
    names = [p.name for p in class_folders(root)] if root.is_dir() else []
    if not names:
        raise DataError(f"{root}: no class folders (expected {exp.data.train_dir}/<class>/*.JPEG)")
    return names


def samples(exp: Experiment, folder: str) -> list[tuple[str, int]]:
    """(image path, class index) of a split: class folders (ImageFolder), or a flat folder with a labels file
    (ImageNet's validation set as distributed: the devkit's ground truth, or Kaggle's LOC_val_solution.csv)."""
    root = Path(exp.data_dir) / folder
    if not root.is_dir():
        raise DataError(
            f"{root}: image folder not found (expected <class>/*.JPEG, or images and a labels file)"
        )
    if not class_folders(root):
        return flat_samples(exp, root)
    for class_dir in class_folders(root):
        if not any(f.is_file() and not hidden(f) for f in class_dir.iterdir()):
            raise DataError(f"{class_dir}: class folder is empty")
    try:
        found = VisibleImageFolder(root)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{root}: {err}") from None
    if folder != exp.data.train_dir and found.classes != classes(exp):
        extra = sorted(set(found.classes) - set(classes(exp)))
        lacking = sorted(set(classes(exp)) - set(found.classes))
        example = f"{extra[0]!r} only here" if extra else f"no {lacking[0]!r} here"
        raise DataError(
            f"{root}: class folders differ from {exp.data.train_dir}'s ({len(found.classes)} here, "
            f"{len(classes(exp))} there; e.g. {example})"
        )
    return found.samples


def hidden(path: Path) -> bool:
    """A dot-file or dot-folder: never a class or an image (macOS's `._x.JPEG` and `.DS_Store`, Jupyter's
    `.ipynb_checkpoints/`). As a class, such a folder shifted every class index after it."""
    return path.name.startswith(".")


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not hidden(p))


class VisibleImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder without hidden class folders and files."""

    def __init__(self, root: Path):
        super().__init__(root, is_valid_file=self._is_image)

    @staticmethod
    def _is_image(path: str) -> bool:
        return not hidden(Path(path)) and path.lower().endswith(datasets.folder.IMG_EXTENSIONS)

    def find_classes(self, directory):
        names = [p.name for p in class_folders(Path(directory))]
        if not names:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return names, {name: i for i, name in enumerate(names)}


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
KAGGLE_LABELS = "LOC_val_solution.csv"
DEVKIT_LABELS = "ILSVRC2012_validation_ground_truth.txt"


def labels_file(exp: Experiment) -> Path | None:
    """data.val_labels (relative: inside the data folder), else the usual names of the two distributions."""
    root = Path(exp.data_dir)
    if exp.data.val_labels:
        return root / exp.data.val_labels
    for candidate in (
        root / KAGGLE_LABELS,
        root / DEVKIT_LABELS,
        root / "ILSVRC2012_devkit_t12" / "data" / DEVKIT_LABELS,
    ):
        if candidate.is_file():
            return candidate
    return None


def flat_samples(exp: Experiment, root: Path) -> list[tuple[str, int]]:
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not hidden(p))
    path = labels_file(exp)
    if path is None or not path.is_file():
        raise DataError(
            f"{path or root}: {root} holds images but no class folders, and no labels file was found "
            f"(set data.val_labels to {KAGGLE_LABELS} or the devkit's {DEVKIT_LABELS})"
        )
    wnids = kaggle_labels(path) if path.suffix == ".csv" else devkit_labels(exp, path, len(images))
    index = {name: i for i, name in enumerate(classes(exp))}
    stems = [p.stem for p in images]
    check_one_image_per_name(images, root)
    missing = [s for s in stems if s not in wnids]
    if missing or len(wnids) != len(images):
        unlabelled = set(wnids) - set(stems)
        example = (
            f"no label for {missing[0]!r}" if missing else f"a label for {sorted(unlabelled)[0]!r}, no image"
        )
        raise DataError(f"{path}: labels for {len(wnids)} images, {root} has {len(images)} (e.g. {example})")
    out = []
    for image, stem in zip(images, stems, strict=True):
        label, line = wnids[stem]
        if label not in index:
            raise DataError(f"{path}:{line}: synset {label!r} is not a class of {exp.data.train_dir}/")
        out.append((str(image), index[label]))
    return out


def check_one_image_per_name(images: list[Path], root: Path) -> None:
    """A labels file names an image without its suffix: two files of one name (`x.JPEG` and a converted
    `x.png` or a copied `x.jpeg`) would both take its label, and failed the count check with an IndexError."""
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise DataError(
                f"{image}: a second image named {image.stem!r} in {root} ({seen[image.stem].name})"
            )
        seen[image.stem] = image


def kaggle_labels(path: Path) -> dict[str, tuple[str, int]]:
    """LOC_val_solution.csv: `ImageId,PredictionString`, the class being the first word of the string."""
    import csv

    out = {}
    with io.StringIO(read_text(path), newline="") as f:  # read_text drops a spreadsheet's byte-order mark
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                image, label = row["ImageId"], row["PredictionString"].split()[0]
            except (KeyError, IndexError, AttributeError):
                raise DataError(
                    f"{path}:{line}: expected ImageId,PredictionString (Kaggle's {KAGGLE_LABELS})"
                ) from None
            if image in out:  # the later line's label silently won, and the count check still passed
                raise DataError(f"{path}:{line}: {image!r} again (first on line {out[image][1]})")
            out[image] = (label, line)
    return out


def devkit_labels(exp: Experiment, path: Path, count: int) -> dict[str, tuple[str, int]]:
    """The devkit's ground truth: line i is the ILSVRC2012 id of ILSVRC2012_val_<i>.JPEG; meta.mat maps ids
    to synsets."""
    meta = Path(exp.data_dir) / exp.data.val_meta if exp.data.val_meta else path.parent / "meta.mat"
    if not meta.is_file():
        raise DataError(
            f"{meta}: the devkit's meta.mat is needed to map {path.name}'s ids to synsets (data.val_meta)"
        )
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except Exception as err:  # scipy raises several types for a file that is not the devkit's
        raise DataError(
            f"{meta}: not the ILSVRC2012 devkit's meta.mat ({type(err).__name__}: {err})"
        ) from None
    out = {}
    for line, text in enumerate(read_text(path).split(), start=1):
        if not text.isdigit() or int(text) not in wnid:
            raise DataError(f"{path}:{line}: {text!r} is not an ILSVRC2012 id of {meta.name}")
        out[f"ILSVRC2012_val_{line:08d}"] = (wnid[int(text)], line)
    return out


_PERSISTENT: dict = {}


def train_loader(exp: Experiment, seed: int, epoch: int, skip_batches: int = 0, first: bool = False):
    """One loader per phase (workers start once), set to each epoch's order. Also without worker processes:
    each sample's crop is then seeded as the workers seed it, so `workers` (a run option) changes no result;
    drawn from the global generator instead, 0 workers trained on other crops than 1 or more."""
    data, workers = dataset(exp, "train"), exp.options.workers
    collate = collate_encoded if exp.data.decode == "device" else None
    key = (id(data), seed, exp.train.batch_size, workers)
    if _PERSISTENT.get("key") != key:
        _PERSISTENT.clear()  # the previous phase's workers stop with their loader
        batches = loaders.persistent_loader(
            data, exp.train.batch_size, seed=seed, workers=workers, collate_fn=collate
        )
        _PERSISTENT.update(key=key, loader=batches)
    _PERSISTENT["loader"].sampler.set_epoch(epoch, skip_batches)
    return _PERSISTENT["loader"]


def eval_loader(exp: Experiment, split: str, batch_size: int, shard: bool = False):
    return loaders.loader(
        dataset(exp, split), batch_size, train=False, workers=exp.options.workers, shard=shard
    )


def sources(exp: Experiment) -> list[Path]:
    """What the data set is read from, for its fingerprint: its split folders, and the labels of a flat
    validation folder (with the devkit's meta.mat): corrected labels are another data set."""
    cfg = exp.data
    out = [Path(exp.data_dir) / d for d in dict.fromkeys((cfg.train_dir, cfg.val_dir, cfg.test_dir))]
    labels = labels_file(exp)
    if labels is not None:
        out.append(labels)
        if labels.name == DEVKIT_LABELS:
            out.append(Path(exp.data_dir) / cfg.val_meta if cfg.val_meta else labels.parent / "meta.mat")
    return out


def prepare(exp: Experiment, data_fingerprint: str) -> dict:
    """Generate the embedded data set, or check a real ImageFolder one; a small summary for the marker."""
    if exp.generated:
        g = exp.data.generate
        return synthetic.generate(exp.data_dir, seed=g.seed, size=g.size, per_class=dict(g.per_class))
    return check_imagefolder(exp)


def check_imagefolder(exp: Experiment) -> dict:
    """A real ImageNet-style data set: every split readable (class folders, or flat with a labels file), the
    same classes everywhere, no empty class."""
    root = Path(exp.data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (set data.{exp.dataset} to the data set's folder)")
    names = classes(exp)
    summary, files = {}, []
    for folder in dict.fromkeys((exp.data.train_dir, exp.data.val_dir, exp.data.test_dir)):
        found = samples(exp, folder)
        summary[folder] = {"images": len(found), "classes": len({label for _, label in found})}
        files += [Path(p) for p, _ in found]
    if exp.options.verify_data:
        verify_images(files, exp)
    else:
        check_readable_files(files)
    return {"classes": len(names), "splits": summary}


def check_readable_files(files: list[Path]) -> None:
    """Every image a non-empty file this process may read: a zero-byte file (a copy or an extraction cut short)
    or one without read permission passed `dsd prepare` and stopped training when an epoch reached it, hours
    in. A stat per file, as the data set's fingerprint takes anyway; decoding every image is verify_data's."""
    bad = [f"{p} (empty)" if p.stat().st_size == 0 else f"{p} (not readable)" for p in files if _unusable(p)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} of {len(files)} images are empty or not readable: {shown}")


def _unusable(path: Path) -> bool:
    return path.stat().st_size == 0 or not os.access(path, os.R_OK)


VERIFY_CHUNK = 4096  # images decoded per batch of futures


def verify_images(files: list[Path], exp: Experiment) -> None:
    """Decode every image in parallel; one error listing every file that fails, not just the first."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def bad(path: Path) -> str | None:
        try:
            decode(str(path))
        except DataError:
            return str(path)
        return None

    threads, failed = max(1, exp.options.workers or exp.options.threads), []
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(files), desc="verify images", unit="img") as bar:
        # in chunks: `map` makes every future at once, ~1.6 KB each (2 GB for ImageNet's 1.33M images)
        for start in range(0, len(files), VERIFY_CHUNK):
            for p in pool.map(bad, files[start : start + VERIFY_CHUNK]):
                bar.update()
                failed += [p] if p else []
    if failed:
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        raise DataError(f"{len(failed)} of {len(files)} images cannot be decoded: {shown}")


def check(exp: Experiment) -> None:
    """Before training: every split this phase reads can be listed (a missing one fails now, not after an epoch)."""
    for split in ("train", "val"):
        dataset(exp, split)
    check_class_count(exp)


def check_class_count(exp: Experiment) -> None:
    """More class folders than the model's outputs: a label past them failed mid-training (cross_entropy's
    IndexError, CUDA's device-side assert) or, evaluating a pretrained model, scored as wrong without a word.
    Fewer than a pretrained model's outputs (a synset lost in extraction) shift the labels after it: said, as a
    subset (a miniature of ImageNet's layout) may be meant.
    The configuration check sees the count only once the data set was prepared, not in a first run."""
    names, outputs = classes(exp), exp.model.num_classes
    if len(names) > outputs:
        odd = [n for n in names if not re.fullmatch(r"n\d{8}", n)] if exp.dataset == "imagenet" else []
        raise DataError(
            f"{Path(exp.data_dir) / exp.data.train_dir}: {len(names)} class folders, more than model.num_classes "
            f"{outputs} (e.g. {(odd or names)[-1]!r})"
        )
    if exp.model.weights and len(names) < outputs:  # a pretrained head's class i is the i-th of them all
        distributed.say(
            f"dsd: warning: {Path(exp.data_dir) / exp.data.train_dir}: {len(names)} class folders, fewer than "
            f"the {outputs} outputs of the pretrained model.weights: a folder's label is its place among these, "
            "so after a missing class (a synset lost in extraction) every folder counts as its neighbour's class"
        )


def same_folder(exp: Experiment, a: str, b: str) -> bool:
    """Whether two splits are one folder (ImageNet's test split is its validation set)."""
    folders = {"train": exp.data.train_dir, "val": exp.data.val_dir, "test": exp.data.test_dir}
    return folders[a] == folders[b]
