"""Vision track: the paper's full-size torchvision models through DSD on an ImageNet-layout folder."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dsd import paths
from dsd.config import Experiment, load_config
from dsd.errors import DataError
from dsd.tracks import vision
from dsd.train import run_phase

REPO_CONFIG = "configs/paper.yaml"
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


def paper_experiment(row, imagenet, out):
    config = load_config(
        paths.Path(__file__).resolve().parents[1] / REPO_CONFIG,
        {
            "data.imagenet": str(imagenet),
            "output_dir": str(out),
            "data_root": str(out / "data"),
            "device": "cpu",
            "threads": 2,
            "wandb.mode": "disabled",
        },
    )
    entry = config["experiments"][row]
    entry["train"] = {
        **entry["train"],
        "batch_size": 2,
        "eval_batch_size": 6,
        "max_steps_per_epoch": 1,
        "workers": 0,
    }
    entry["phases"] = [{**p, "epochs": 1} for p in entry["phases"]]
    return Experiment.from_config(config, row)


@pytest.mark.parametrize("row", ["resnet18", "resnet50", "googlenet", "vgg16"])
def test_full_size_paper_models_run_dsd_on_imagenet_layout(row, tmp_path):
    imagenet = make_imagenet(tmp_path / "imagenet")
    exp = paper_experiment(row, imagenet, tmp_path / "out")
    assert exp.model["size"] == "full" and exp.data_dir == str(imagenet)
    vision.check_imagefolder(exp)
    previous = None
    for phase in exp.recipe.names:  # dense -> sparse1 -> redense1
        run = paths.run_dir(exp.output_dir, row, 0, phase)
        metrics = run_phase(exp, 0, phase, run, init=previous, progress=False)
        previous = paths.checkpoint(run)
        assert all(math.isfinite(h["train_loss"]) for h in metrics["history"])
        assert 0 <= metrics["test"]["top1_error_pct"] <= 100 and 0 <= metrics["test"]["top5_error_pct"] <= 100
        if phase == "sparse1":
            first = vision.first_conv(exp.model["arch"])
            layers = metrics["sparsity_per_layer"]
            assert first not in layers and layers, "first conv must stay dense"
            assert all(abs(s - 0.3) < 1e-3 for s in layers.values())
            state = torch.load(previous, weights_only=True)
            assert (state["model"][first] == 0).float().mean() < 0.01
            convs = [n for n, t in state["model"].items() if t.dim() == 4 and n != first]
            assert convs and all(n in layers for n in convs)
    assert metrics["measured_sparsity"] == 0.0  # re-dense


def test_corrupt_jpeg_and_empty_class_named(tmp_path):
    imagenet = make_imagenet(tmp_path / "imagenet", per_class=2)
    bad = imagenet / "val" / WNIDS[0] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    exp = paper_experiment("resnet18", imagenet, tmp_path / "out")
    with pytest.raises(DataError, match="broken.JPEG: cannot decode image"):
        for _ in vision.eval_loader(exp, "val"):
            pass
    (imagenet / "train" / "n99999999").mkdir()
    with pytest.raises(DataError, match="n99999999: class folder is empty"):
        vision.check_imagefolder(exp)


@pytest.mark.parametrize(("height", "width", "scale"), [(32, 32, (0.6, 1.0)), (24, 40, (0.08, 1.0))])
def test_batched_crop_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    """The in-memory batch augmentation draws boxes from the same distribution as torchvision's transform."""
    from torchvision.transforms import RandomResizedCrop

    n, ratio = 4000, (3 / 4, 4 / 3)
    torch.manual_seed(0)
    top, left, h, w = vision.random_resized_boxes(n, height, width, scale, ratio)
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


def test_batched_crop_of_the_whole_image_is_the_image():
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    out = vision.batch_random_resized_crop(images, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
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
    data = vision.ImageFolderData(root, vision.DataConfig(image_size=24, crop_scale_min=0.3), True, True)
    torch.manual_seed(0)
    batch = data.__getitems__(list(range(16)))
    images = torch.stack([image for image, _ in batch])
    assert images.shape == (16, 3, 24, 24) and [label for _, label in batch] == [0] * 8 + [1] * 8
    assert len({tuple(image[0, 0, :3].tolist()) for image in images}) > 8  # not one crop for all
    evaluation = vision.ImageFolderData(root, vision.DataConfig(image_size=24, resize=24), False, True)
    a, b = evaluation.__getitems__([0, 1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], evaluation[0][0])  # deterministic, same as per image
