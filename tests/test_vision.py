"""Vision track: the paper's full-size torchvision models through DSD on an ImageNet-layout folder."""

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dsd_cli, parse, reachable_objects, snakemake, tiny_vision_config, write_config
from PIL import Image
from torch.overrides import TorchFunctionMode

from dsd.errors import DataError
from dsd.tracks.vision import data as vision_data
from dsd.tracks.vision.config import Data

WNIDS = ("n01440764", "n01443537")


def make_imagenet(root, per_class=3):
    """A tiny ILSVRC-2012 layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, odd sizes like the real thing."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = rng.integers(240, 330, size=2)
                pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a learnable hint: class 0 red, class 1 green
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=85)
    return root


def imagenet_config(imagenet, out):
    """A resnet18 row on an ImageNet-layout folder."""
    raw = {
        "data": {"imagenet": str(imagenet)}, "output_dir": str(out), "data_root": str(out / "data"),
        "device": "cpu", "wandb": {"mode": "disabled"},
        "experiments": {"resnet18": {"track": "vision", "dataset": "imagenet", "model": {"num_classes": 1000},
                                     "prune": {"exclude": ["conv1.weight"]},
                                     "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}},
    }  # fmt: skip
    return parse(raw)


def test_corrupt_jpeg_and_empty_class_named(tmp_path):
    imagenet = make_imagenet(tmp_path / "imagenet", per_class=2)
    bad = imagenet / "val" / WNIDS[0] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    exp = imagenet_config(imagenet, tmp_path / "out").experiment("resnet18")
    with pytest.raises(DataError, match="broken.JPEG: cannot decode image"):
        for _ in vision_data.eval_loader(exp, "val", 4):
            pass
    (imagenet / "train" / "n99999999").mkdir()
    with pytest.raises(DataError, match="n99999999: class folder is empty"):
        vision_data.check_imagefolder(exp)


@pytest.mark.parametrize(("height", "width", "scale"), [(32, 32, (0.6, 1.0)), (24, 40, (0.08, 1.0))])
def test_batched_crop_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    """The in-memory batch augmentation draws boxes from the same distribution as torchvision's transform."""
    from torchvision.transforms import RandomResizedCrop

    n, ratio = 4000, (3 / 4, 4 / 3)
    torch.manual_seed(0)
    top, left, h, w = vision_data.random_resized_boxes(n, height, width, scale, ratio)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= height) & ((left + w) <= width) & (h > 0)).all())
    image = torch.zeros(3, height, width)
    reference = torch.tensor(
        [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)]
    )
    ours = torch.stack([top, left, h, w], dim=1)
    area_ours, area_ref = (ours[:, 2] * ours[:, 3]).mean(), (reference[:, 2] * reference[:, 3]).float().mean()
    assert abs(float(area_ours / area_ref) - 1) < 0.03
    for column in range(4):  # every coordinate's mean within a few standard errors of torchvision's
        ref = reference[:, column].float()
        assert abs(float(ours[:, column].mean() - ref.mean())) < 4 * float(ref.std()) / math.sqrt(n) + 0.05


def test_workers_crop_is_torchvisions_resized_crop_and_flip(tmp_path):
    """The workers' resample (the crop copied to channels-last memory first, for torch's vectorised uint8
    kernel) gives torchvision's pixels: crops shrunk and enlarged, odd sizes, flipped or not, from a decoded
    JPEG (interleaved memory) and from a planar tensor."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(1)
    path = tmp_path / "odd.JPEG"
    Image.fromarray(rng.integers(0, 255, size=(157, 203, 3), dtype=np.uint8)).save(path, quality=90)
    decoded = vision_data.decode(str(path))
    planar = torch.from_numpy(rng.integers(0, 255, size=(3, 157, 203), dtype=np.uint8))
    for image in (decoded, planar):
        for size in (7, 64, 224):
            for _ in range(6):
                height, width = int(rng.integers(1, 158)), int(rng.integers(1, 204))
                top, left = int(rng.integers(0, 158 - height)), int(rng.integers(0, 204 - width))
                flipped = bool(rng.integers(0, 2))
                expected = v2.functional.resized_crop(
                    image, top, left, height, width, [size, size], antialias=True
                )
                expected = expected.flip(-1) if flipped else expected
                got = vision_data.resized_crop(image, [top, left, height, width], flipped, size)
                assert got.shape == (3, size, size) and torch.equal(got, expected), (size, height, width)


class FactoryCalls(TorchFunctionMode):
    """Records the tensors made from Python numbers (`torch.tensor`, `torch.as_tensor`, `Tensor.new_tensor`) on
    a device other than the CPU: on a GPU each is a blocking copy, a wait for all the work queued before it."""

    FACTORIES = ("tensor", "as_tensor", "new_tensor")

    def __init__(self):
        super().__init__()
        self.on_device = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in self.FACTORIES and out.device.type != "cpu":
            self.on_device.append(func.__name__)
        return out


def test_normalising_a_batch_on_the_device_builds_no_tensor_from_python_numbers_there():
    """Each step's `to_model_input` must not make a tensor from Python numbers on the device: on a GPU that is a
    blocking copy (torch's `memcpy_and_sync`), which waits for all the work queued before it, the last step's
    backward and optimizer, and so undoes the trainer's late loss read (torchvision's `normalize` made its mean
    and std so on every call). "meta" stands in for the GPU: the same calls, no GPU needed."""
    batch = torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device="meta")
    vision_data.to_model_input(batch, "meta")  # a first call may make what it keeps
    with FactoryCalls() as calls:
        for _ in range(3):
            out = vision_data.to_model_input(batch, "meta")
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    assert calls.on_device == []


def test_counting_a_validation_batch_on_the_device_builds_no_tensor_from_python_numbers_there():
    """The per-epoch validation keeps its counts on the device until the end (no wait per batch): counting a
    batch makes no tensor from Python numbers there ("meta" stands in for the GPU)."""
    from dsd.tracks.vision import metric as vision_metric

    logits, labels = torch.zeros(4, 10, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    with FactoryCalls() as calls:
        counts, hits = vision_metric._batch_counts(logits, labels)
    assert counts.shape == (4,) and counts.dtype == torch.float64 and hits.shape == (4, 5)
    assert calls.on_device == []
    cpu_counts, _ = vision_metric._batch_counts(torch.eye(3, 10), torch.tensor([0, 1, 5]))
    assert cpu_counts[:3].tolist() == [2.0, 3.0, 3.0]  # top-1 hits, top-5 hits, samples


def test_uint8_crops_normalised_on_the_device_give_the_float_path_numbers(tmp_path):
    """Workers hand over uint8 crops (a quarter of the bytes) and `to_model_input` scales and normalises them
    where the model runs: bitwise the float32 crops the workers made before, in training (files) and in
    evaluation (files, and a same-size set in memory)."""
    from torchvision.transforms import v2

    def float_path(head):  # the transforms as they were: scaled and normalised in the worker
        steps = [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(vision_data.IMAGENET_MEAN, vision_data.IMAGENET_STD),
        ]
        return v2.Compose([*head.transforms, *steps])

    root = make_imagenet(tmp_path / "imagenet", per_class=3)
    samples = [(str(p), 0) for p in sorted((root / "train").rglob("*.JPEG"))]
    cfg = Data(image_size=96, resize=112, crop_scale_min=0.08)
    train = vision_data.ImageFolderData(samples, cfg, train=True, in_memory=False)
    for i, (path, _) in enumerate(samples):
        torch.manual_seed(i)
        expected = float_path(train.transform)(vision_data.decode(path))
        torch.manual_seed(i)
        crop, _ = train[i]
        assert crop.dtype == torch.uint8 and crop.shape == (3, 96, 96)
        assert torch.equal(vision_data.to_model_input(crop[None], "cpu")[0], expected)
    evaluation = vision_data.ImageFolderData(samples, cfg, train=False, in_memory=False)
    reference = float_path(evaluation.transform)
    crops = torch.stack([crop for crop, _ in evaluation.__getitems__(list(range(len(samples))))])
    expected = torch.stack([reference(vision_data.decode(path)) for path, _ in samples])
    assert torch.equal(vision_data.to_model_input(crops, "cpu"), expected)
    same_size = []
    for i, (path, _) in enumerate(samples[:4]):  # in memory: one batch tensor, transformed in one go
        Image.open(path).resize((40, 40)).save(tmp_path / f"{i}.png")
        same_size.append((str(tmp_path / f"{i}.png"), 0))
    in_memory = vision_data.ImageFolderData(
        same_size, Data(image_size=24, resize=28), train=False, in_memory=True
    )
    crops = torch.stack([crop for crop, _ in in_memory.__getitems__([0, 1, 2, 3])])
    expected = torch.stack([float_path(in_memory.transform)(in_memory.images[i]) for i in range(4)])
    assert torch.equal(vision_data.to_model_input(crops, "cpu"), expected)
    floats = torch.rand(2, 3, 8, 8)
    assert (
        vision_data.to_model_input(floats, "cpu") is floats
    )  # in-memory training batches: already normalised


def test_crops_decoded_on_the_device_are_the_workers_crops(tmp_path):
    """decode: device: the workers read the bytes and draw RandomResizedCrop's box and the flip with the same
    draws as the decoding path, so the crops are the same (bitwise here, where the device is the CPU and the
    decoder libjpeg). Images other than RGB JPEGs (a grayscale or CMYK JPEG; a PNG: ImageNet holds one named
    .JPEG) are decoded by the worker and cropped with the rest."""
    from torch.utils.data import default_collate

    root = make_imagenet(tmp_path / "imagenet", per_class=3)
    samples = [(str(p), 0) for p in sorted((root / "train").rglob("*.JPEG"))]
    odd = [(tmp_path / "gray.JPEG", "L", "JPEG"), (tmp_path / "png.JPEG", "RGB", "PNG")]
    odd.append((tmp_path / "cmyk.JPEG", "CMYK", "JPEG"))
    for path, mode, kind in odd:
        Image.open(samples[0][0]).convert(mode).save(path, format=kind)
        samples.append((str(path), 1))
    cfg = Data(image_size=64)
    workers = vision_data.ImageFolderData(samples, cfg, train=True, in_memory=False)
    readers = vision_data.ImageFolderData(samples, Data(image_size=64, decode="device"), True, False)
    keys = [(i, 1000 + i) for i in range(len(samples))]
    images, labels = default_collate([workers[key] for key in keys])
    encoded, encoded_labels = vision_data.collate_encoded([readers[key] for key in keys])
    assert (encoded.lengths > 0).tolist() == [True] * (len(samples) - 3) + [False] * 3  # gray, PNG, CMYK
    assert len(encoded.decoded) == 3 and int(encoded.lengths.sum()) == len(encoded.files)
    assert 0 < int(encoded.flips.sum()) < len(samples)
    assert torch.equal(encoded_labels, labels)
    assert torch.equal(vision_data.to_model_input(encoded, "cpu"), vision_data.to_model_input(images, "cpu"))


def test_random_crop_boxes_are_image_size_squares_placed_uniformly_at_one_scale():
    """train_crop random (Caffe's crop_size + mirror): every box an image_size square inside the image resized
    to `resize` on its shorter side (aspect kept, as v2.Resize), its offsets uniform over every place (each
    value drawn, mean and variance of a discrete uniform), half the crops flipped."""
    transform = vision_data.transforms(Data(image_size=224, resize=256, train_crop="random"), train=True)
    n = 6000
    torch.manual_seed(0)
    for height, width, scaled in ((300, 400, [256, 341]), (500, 333, [384, 256]), (256, 256, [256, 256])):
        draws = [vision_data.draw_crop(transform, height, width) for _ in range(n)]
        assert all(s == scaled for s, _, _ in draws)
        boxes = torch.tensor([box for _, box, _ in draws], dtype=torch.float64)
        assert bool((boxes[:, 2:] == 224).all())
        for column, room in ((0, scaled[0] - 224), (1, scaled[1] - 224)):
            offsets = boxes[:, column]
            assert set(offsets.long().tolist()) == set(range(room + 1))
            mean, var = room / 2, ((room + 1) ** 2 - 1) / 12
            assert abs(float(offsets.mean()) - mean) < 4 * math.sqrt(var / n) + 1e-9
            assert abs(float(offsets.var()) - var) < 0.1 * var + 1e-9
        assert abs(sum(flipped for _, _, flipped in draws) / n - 0.5) < 4 * 0.5 / math.sqrt(n)


def test_random_crop_is_resize_then_random_crop_and_flip_on_both_decode_paths(tmp_path):
    """train_crop random: the workers' crops are torchvision's Resize(resize), RandomCrop(image_size),
    RandomHorizontalFlip on the same draws (bitwise), and decode: device, which draws the scaled size, box and
    flip in the worker and scales and crops on the device, gives the same crops (bitwise on the CPU)."""
    from dataclasses import replace

    from torch.utils.data import default_collate
    from torchvision.transforms import v2

    root = make_imagenet(tmp_path / "imagenet", per_class=3)
    samples = [(str(p), 0) for p in sorted((root / "train").rglob("*.JPEG"))]
    gray = tmp_path / "gray.JPEG"  # decoded by the worker under decode: device
    Image.open(samples[0][0]).convert("L").save(gray)
    samples.append((str(gray), 1))
    cfg = Data(image_size=64, resize=80, train_crop="random")
    workers = vision_data.ImageFolderData(samples, cfg, train=True, in_memory=False)
    readers = vision_data.ImageFolderData(samples, replace(cfg, decode="device"), True, False)
    keys = [(i, 500 + i) for i in range(len(samples))]
    images, _ = default_collate([workers[key] for key in keys])
    encoded, _ = vision_data.collate_encoded([readers[key] for key in keys])
    reference = v2.Compose([v2.Resize(80), v2.RandomCrop(64), v2.RandomHorizontalFlip()])
    for (path, _), (_, seed), image in zip(samples, keys, images, strict=True):
        torch.manual_seed(seed)
        assert torch.equal(image, reference(vision_data.decode(path)))
    assert images.shape == (len(samples), 3, 64, 64) and 0 < int(encoded.flips.sum()) < len(samples)
    assert bool((encoded.scaled.min(dim=1).values == 80).all()) and bool((encoded.boxes[:, 2:] == 64).all())
    assert torch.equal(vision_data.to_model_input(encoded, "cpu"), vision_data.to_model_input(images, "cpu"))


def test_in_memory_random_crops_are_uniform_cuts_of_the_resized_batch():
    """In memory a batch is cropped in one go: resized as one (here to its own size: nothing to resample), each
    image an image_size cut at its own uniform offset (read back from pixels that hold their coordinates)."""
    height, width, size, n = 20, 30, 12, 4000
    rows = torch.arange(height, dtype=torch.uint8)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.uint8)[None, :].expand(height, width)
    image = torch.stack([rows, cols, torch.zeros_like(rows)])
    images = image.expand(n, 3, height, width).contiguous()
    torch.manual_seed(0)
    crops = (vision_data.batch_random_crop(images, height, size) * 255).round().long()
    assert crops.shape == (n, 3, size, size)
    top, left = crops[:, 0, 0, 0], crops[:, 1, 0, 0]
    assert torch.equal(crops[:, 0, :, 0] - top[:, None], torch.arange(size).expand(n, size))  # a plain cut
    assert torch.equal(crops[:, 1, 0, :] - left[:, None], torch.arange(size).expand(n, size))
    for offsets, room in ((top, height - size), (left, width - size)):
        assert set(offsets.tolist()) == set(range(room + 1))
        mean, var = room / 2, ((room + 1) ** 2 - 1) / 12
        assert abs(float(offsets.double().mean()) - mean) < 4 * math.sqrt(var / n)


def test_random_crop_larger_than_the_resized_image_is_refused_naming_the_key(tmp_path):
    from dsd.errors import ConfigError

    raw = tiny_vision_config(tmp_path)
    raw["experiments"]["resnet18"]["data"].update(train_crop="random", image_size=32, resize=28)
    with pytest.raises(
        ConfigError, match=r"experiments.resnet18.data.resize: train_crop random .* >= image_size"
    ):
        parse(raw)


def test_a_file_that_cannot_be_decoded_on_the_device_is_named(tmp_path):
    """decode: device decodes a batch in one call; a file whose header reads (in the worker) but whose data
    does not decode is named, as the workers' decoding path names it."""
    from torch.utils.data import DataLoader

    root = make_imagenet(tmp_path / "imagenet", per_class=2)
    samples = [(str(p), 0) for p in sorted((root / "train").rglob("*.JPEG"))]
    bad = Path(samples[2][0])
    bad.write_bytes(Path(samples[0][0]).read_bytes()[:700] + bytes(range(256)) * 40)
    data = vision_data.ImageFolderData(samples, Data(image_size=48, decode="device"), True, False)
    batches = DataLoader(data, batch_size=4, collate_fn=vision_data.collate_encoded)
    with pytest.raises(DataError, match=f"{bad.name}: cannot decode image"):
        [vision_data.to_model_input(images, "cpu") for images, _ in batches]


def test_device_decoding_of_images_held_in_memory_is_refused_naming_the_key(tmp_path):
    from conftest import tiny_vision_config

    from dsd.errors import ConfigError

    raw = tiny_vision_config(tmp_path)
    raw["experiments"]["resnet18"]["data"]["decode"] = "device"  # the tiny config holds its images in memory
    with pytest.raises(ConfigError, match=r"experiments.resnet18.data.decode: device decodes files"):
        parse(raw)


def test_batched_crop_of_the_whole_image_is_the_image():
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    out = vision_data.batch_random_resized_crop(images, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(out, images.float() / 255)


def test_in_memory_batches_are_transformed_per_image(tmp_path):
    """A batch of identical images comes out with different crops and flips (one draw per image)."""
    root = tmp_path / "train"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))).save(
                root / cls / f"{i}.png"
            )
    samples = [
        (str(root / cls / f"{i}.png"), label) for label, cls in enumerate(("a", "b")) for i in range(8)
    ]
    data = vision_data.ImageFolderData(samples, Data(image_size=24, crop_scale_min=0.3), True, True)
    torch.manual_seed(0)
    batch = data.__getitems__(list(range(16)))
    images = torch.stack([image for image, _ in batch])
    assert images.shape == (16, 3, 24, 24) and [label for _, label in batch] == [0] * 8 + [1] * 8
    assert len({tuple(image[0, 0, :3].tolist()) for image in images}) > 8  # not one crop for all
    evaluation = vision_data.ImageFolderData(samples, Data(image_size=24, resize=24), False, True)
    a, b = evaluation.__getitems__([0, 1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], evaluation[0][0])  # deterministic, same as per image


def test_the_sample_list_holds_no_object_per_image_for_loader_workers_to_copy():
    """A forked loader worker writes the reference count of every sample object it reads, so a list of
    ImageNet's 1.28M (path, label) tuples became a copy of ~250 MB in each worker: the dataset keeps its
    samples in arrays, the same (path, label) pairs whatever their number."""
    counts = []
    for n in (10, 1000):
        samples = [(f"/data/train/n{i % 7:08d}/img_{i}_é.JPEG", i % 7) for i in range(n)]
        data = vision_data.ImageFolderData(samples, Data(), train=True, in_memory=False)
        assert list(data.samples) == samples and data.samples[-1] == samples[-1] and len(data) == n
        counts.append(reachable_objects(data.samples))
    assert counts[0] == counts[1]


def test_generated_images_do_not_depend_on_the_order_splits_are_listed(tmp_path):
    from dsd.tracks.vision import synthetic

    synthetic.generate(tmp_path / "a", per_class={"train": 1, "val": 1, "test": 1})
    synthetic.generate(tmp_path / "b", per_class={"test": 1, "val": 1, "train": 1})  # as sorted JSON has it
    for path in sorted((tmp_path / "a").rglob("*.jpg")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_regenerated_images_replace_the_previous_generation(tmp_path):
    """Fewer images per class than last time: the extra files of the last generation must not stay and be read
    as this data set's (its fingerprint names the settings, not the files)."""
    from dsd.tracks.vision import synthetic

    synthetic.generate(tmp_path, per_class={"train": 3, "val": 1, "test": 1})
    synthetic.generate(tmp_path, per_class={"train": 2, "val": 1, "test": 1})
    assert len(list((tmp_path / "train").rglob("*.jpg"))) == 2 * len(synthetic.CLASSES)


def test_any_torchvision_model_on_any_image_folder_by_config_only(tmp_path):
    """A row defined only in a user config, through the whole pipeline (Snakemake, tables, plots): dataset
    imagefolder (class folders of any names), a torchvision model by name with its own constructor arguments,
    and `first_conv` keeping the first layer dense."""
    folder = make_imagenet(tmp_path / "flowers", per_class=2)
    for split in ("train", "val"):  # class folders need not be WordNet ids
        for c, wnid in enumerate(WNIDS):
            (folder / split / wnid).rename(folder / split / ("daisy", "rose")[c])
    raw = {
        "data": {"imagefolder": str(folder)}, "seeds": [0], "threads": 1, "wandb": {"mode": "disabled"},
        "experiments": {"flowers": {
            "track": "vision", "dataset": "imagefolder",
            "model": {"arch": "squeezenet1_1", "num_classes": 2, "args": {"dropout": 0.2}},
            "data": {"image_size": 64, "resize": 72}, "eval": {"batch_size": 4},
            "train": {"batch_size": 4}, "prune": {"exclude": ["first_conv"]},
            "phases": [{"kind": "dense", "epochs": 1, "lr": 0.01},
                       {"kind": "sparse", "epochs": 1, "lr": 0.01, "sparsity": 0.5},
                       {"kind": "redense", "epochs": 1}]}},
    }  # fmt: skip
    configfile = write_config(tmp_path, raw)
    result = snakemake(tmp_path, configfile, env=os.environ | {"DSD_PREFORK": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = tmp_path / "results" / "runs" / "flowers" / "seed0"
    layers = json.loads((runs / "sparse1" / "metrics.json").read_text())["sparsity_per_layer"]
    assert "features.0.weight" not in layers and len(layers) == 25  # squeezenet's 26 convs, the first dense
    assert all(s == pytest.approx(0.5, abs=1e-3) for s in layers.values())
    table = (tmp_path / "results" / "tables" / "paper_comparison.csv").read_text()
    assert table.splitlines()[1].startswith("flowers,")
    assert (tmp_path / "results" / "plots" / "curves.png").is_file()


def small_imagenet_config(tmp_path, folder, lr: float) -> dict:
    """One mini ResNet-18 row, one dense epoch, on an ImageNet-layout folder of 2 classes."""
    return {
        "data": {"imagenet": str(folder)}, "output_dir": str(tmp_path / "out"), "data_root": str(tmp_path / "d"),
        "seeds": [0], "threads": 1, "wandb": {"mode": "disabled"},
        "experiments": {"resnet18": {
            "track": "vision", "dataset": "imagenet",
            "model": {"arch": "resnet18", "size": "mini", "width": 4, "num_classes": 2},
            "data": {"image_size": 32, "resize": 32}, "phases": [{"kind": "dense", "epochs": 1, "lr": lr}]}},
    }  # fmt: skip


def test_dsd_run_retrains_a_phase_whose_image_folder_changed(tmp_path):
    """A real data set's content is part of a result's identity: a new training image, same config."""
    folder = make_imagenet(tmp_path / "imagenet", per_class=2)
    raw = small_imagenet_config(tmp_path, folder, lr=0.01)
    raw["experiments"]["resnet18"] |= {
        "eval": {"batch_size": 4},
        "train": {"batch_size": 4},
        "prune": {"exclude": ["conv1.weight"]},
    }
    command = ["run", "--config", str(write_config(tmp_path, raw)), "--row", "resnet18"]
    assert "trained;" in dsd_cli(*command).stdout
    assert "trained;" not in dsd_cli(*command).stdout  # nothing changed: kept
    (folder / "train" / WNIDS[0] / "extra.JPEG").write_bytes(
        next((folder / "val").rglob("*.JPEG")).read_bytes()
    )
    again = dsd_cli(*command)
    assert again.returncode == 0 and "trained;" in again.stdout, again.stderr[-2000:]


def _epoch(exp, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches as the model gets them (encoded ones decoded)."""
    return [
        (vision_data.to_model_input(images, "cpu").clone(), labels.clone())
        for images, labels in vision_data.train_loader(exp, 7, epoch, skip)
    ]


@pytest.mark.parametrize(
    ("source", "crop"),
    [("files", "random_resized"), ("memory", "random_resized"), ("device", "random_resized")]
    + [("files", "random"), ("memory", "random"), ("device", "random")],
)
def test_a_persistent_loader_gives_the_same_batches_for_any_worker_count_and_on_resume(
    tmp_path, source, crop
):
    """With worker processes the training loader lives for the phase (workers start once) and each sample's
    augmentation is seeded by (seed, epoch, position): 1 or 2 workers, and a resumed epoch, give the same
    batches bitwise; a new epoch a new order and new crops. Also where the workers only read the files and
    draw the crops (decode: device), and with either training crop (random: 24 of 28, a box to place)."""
    from conftest import prepare_data, tiny_vision_config

    batches = {}
    for workers in (1, 2):
        raw = tiny_vision_config(tmp_path, workers=workers)
        raw["experiments"]["resnet18"]["data"]["in_memory"] = source == "memory"
        raw["experiments"]["resnet18"]["data"]["decode"] = "device" if source == "device" else "cpu"
        if crop == "random":
            raw["experiments"]["resnet18"]["data"].update(train_crop="random", image_size=24, resize=28)
        raw["experiments"]["resnet18"]["train"]["batch_size"] = 4
        config = parse(raw)
        prepare_data(config, "resnet18")
        exp = config.experiment("resnet18")
        loader = vision_data.train_loader(exp, 7, 0)
        batches[workers] = _epoch(exp, 0), _epoch(exp, 1)
        assert vision_data.train_loader(exp, 7, 1) is loader  # one loader, set to each epoch's order
        resumed = _epoch(exp, 0, skip=2)
    (first, second), (first_2, second_2) = batches[1], batches[2]
    assert len(first) == math.ceil(60 / 4)  # tiny config: 6 train images x 10 classes
    for a, b in zip(first + second, first_2 + second_2, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(first[2:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(torch.cat([b[1] for b in first]), torch.cat([b[1] for b in second]))
    assert first[0][0].shape[-2:] == ((24, 24) if crop == "random" else (32, 32))


def test_a_batch_reaches_the_model_in_the_model_memory_layout():
    """Channels-last where the trainer made the model channels-last, as it is otherwise: a batch in the other
    layout is reordered inside the first convolution, forward and backward, every step."""
    from dsd.tracks.vision.metric import in_layout_of

    images = torch.rand(2, 3, 16, 16)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert in_layout_of(net, images).is_contiguous()
    net = net.to(memory_format=torch.channels_last)
    assert in_layout_of(net, images).is_contiguous(memory_format=torch.channels_last)
    assert in_layout_of(torch.nn.Linear(3, 2), images) is images


def test_bad_pretrained_weights_are_one_line_naming_the_file_and_key(tmp_path, monkeypatch):
    from dsd.errors import CheckpointError
    from dsd.tracks.vision import model as vision_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch cache

    def build(weights):
        config = tiny_vision_config(tmp_path)
        config["experiments"]["resnet18"]["model"] = {
            "arch": "squeezenet1_1",
            "num_classes": 1000,
            "weights": weights,
        }
        config["experiments"]["resnet18"]["prune"] = {"exclude": ["first_conv"]}
        return vision_model.build(parse(config).experiment("resnet18"))

    with pytest.raises(DataError, match="not in the local torch cache .*set download: true"):
        build("IMAGENET1K_V1")
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(
        CheckpointError, match=r"notes.pth: is a text file, not a weights file \(config.experiments.resnet18"
    ):
        build(str(tmp_path / "notes.pth"))
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(CheckpointError, match="linear.pth: weights of another model .*missing"):
        build(str(tmp_path / "linear.pth"))


def test_googlenet_without_auxiliary_heads_loads_weights_that_carry_them(tmp_path):
    """torchvision's GoogLeNet weights hold untrained auxiliary classifiers: with aux_loss_weight 0 the network
    has none and their entries are not loaded; with a weight, the heads are built and loaded."""
    from torchvision import models

    from dsd.tracks.vision import model as vision_model

    torch.manual_seed(0)
    saved = models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=10)
    torch.save(saved.state_dict(), tmp_path / "googlenet.pth")

    def build(aux_loss_weight):
        config = tiny_vision_config(tmp_path)
        config["experiments"]["resnet18"]["model"] = {
            "arch": "googlenet", "size": "full", "num_classes": 10, "aux_loss_weight": aux_loss_weight,
            "weights": str(tmp_path / "googlenet.pth"),
        }  # fmt: skip
        config["experiments"]["resnet18"]["prune"] = {"exclude": ["conv1.conv.weight"]}
        return vision_model.build(parse(config).experiment("resnet18"))

    plain, with_heads = build(0), build(0.3)
    assert plain.aux1 is None and not any(name.startswith("aux") for name, _ in plain.named_parameters())
    assert torch.equal(plain.fc.weight, saved.fc.weight)
    assert torch.equal(with_heads.aux1.fc2.weight, saved.aux1.fc2.weight)
    plain.train()
    assert plain(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # logits alone: no auxiliary losses


@pytest.mark.parametrize("compiled", [False, True], ids=["ddp", "compiled-ddp"])
def test_googlenet_auxiliary_weight_is_the_configs_under_ddp(tmp_path, compiled):
    """DDP does not pass plain attributes on, and `compile: true` with several GPUs per job wraps DDP in
    torch.compile's module, which passes them on to DDP: the loss read GoogLeNet's auxiliary weight off a wrapper
    and fell back to 0.3 whatever the config said (the eager backend: the same wrapper, without compile time)."""
    from torchvision import models

    from dsd.tracks.vision import metric as vision_metric

    torch.manual_seed(0)
    net = models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=4)
    net.aux_loss_weight = 1.0
    batch = (torch.rand(2, 3, 64, 64), torch.tensor([0, 3]))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(1)  # the same dropout draws in both
        plain = vision_metric.loss(net, batch, torch.device("cpu"))
        wrapper = torch.nn.parallel.DistributedDataParallel(net)
        if compiled:
            wrapper = torch.compile(wrapper, backend="eager")
        torch.manual_seed(1)
        wrapped = vision_metric.loss(wrapper, batch, torch.device("cpu"))
    finally:
        torch.distributed.destroy_process_group()
    assert wrapped.item() == pytest.approx(plain.item(), rel=1e-6)


def test_training_without_loader_workers_gives_the_weights_of_training_with_them(tmp_path):
    """`workers` is a run option, outside every fingerprint: 0 workers (crops drawn in the main process) must
    train the same weights as 1 worker does."""
    from conftest import prepare_data, tiny_vision_config, train

    from dsd import paths

    weights = {}
    for workers in (0, 1):
        config = parse(tiny_vision_config(tmp_path, seeds=[0], workers=workers))
        prepare_data(config, "resnet18")
        train(config, "resnet18", 0, "dense", out=tmp_path / f"workers{workers}")
        saved = torch.load(paths.checkpoint(tmp_path / f"workers{workers}"), weights_only=True)
        weights[workers] = saved["model"]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_evaluation_reads_no_pretrained_weights_the_checkpoint_replaces(tmp_path):
    """Evaluation built the model with its pretrained `model.weights`, then loaded the checkpoint over every
    weight: a wasted read of a possibly large file, and a failure where it is not on the evaluation node. A
    replaced or removed weights file leaves the evaluation as it was."""
    from conftest import evaluate, prepare_data, train

    from dsd.tracks.vision import model as vision_model

    config = tiny_vision_config(tmp_path, seeds=[0])
    config["experiments"]["resnet18"]["phases"] = [{"kind": "dense", "epochs": 1, "lr": 0.05}]
    torch.manual_seed(0)
    weights = tmp_path / "pretrained.pth"
    torch.save(vision_model.build(parse(config).experiment("resnet18")).state_dict(), weights)
    config["experiments"]["resnet18"]["model"]["weights"] = str(weights)
    parsed = parse(config)
    prepare_data(parsed, "resnet18")
    train(parsed, "resnet18", 0, "dense")
    before = evaluate(parsed, "resnet18", 0, "dense")
    weights.write_text("replaced since")
    assert evaluate(parsed, "resnet18", 0, "dense") == before
    weights.unlink()
    assert evaluate(parsed, "resnet18", 0, "dense") == before


def test_dsd_prepare_says_how_many_images_it_found(tmp_path, capsys):
    """Preparing a real data set lists it (ImageNet: 1.28M files, minutes on a network file system): the line
    that ends it gives the counts, where an extraction that lost files or classes shows."""
    from dsd.cli import main

    folder = make_imagenet(tmp_path / "imagenet", per_class=2)
    raw = small_imagenet_config(tmp_path, folder, lr=0.1)
    assert main(["prepare", "--config", str(write_config(tmp_path, raw)), "--row", "resnet18"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"prepared imagenet at {folder} (content ") and '"classes": 2' in said
    assert '"train": {"classes": 2, "images": 4}, "val": {"classes": 2, "images": 4}' in said, said


def test_anneal_epochs_divides_the_lr_by_lr_anneal_after_every_epoch(tmp_path, capfd):
    from conftest import prepare_data, train

    raw = tiny_vision_config(tmp_path, seeds=[0])
    row = raw["experiments"]["resnet18"]
    row["train"] |= {"lr_schedule": "anneal_epochs", "lr_anneal": 2.0}
    row["phases"][0]["epochs"] = 3
    config = parse(raw)
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    lrs = re.findall(r"resnet18 seed 0 dense epoch \d/3: .*?, lr (\S+),", capfd.readouterr().err)
    assert [float(lr) for lr in lrs] == pytest.approx([0.05, 0.025, 0.0125])
