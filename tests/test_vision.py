"""Vision track: the paper's full-size torchvision models through DSD on an ImageNet-layout folder."""

import math

import numpy as np
import pytest
import torch
from conftest import REPO, evaluate, parse, prepare_data, train
from PIL import Image

from dsd import hparams
from dsd.errors import DataError
from dsd.tracks.vision import data as vision_data
from dsd.tracks.vision import model as vision_model
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


def paper_config(row, imagenet, out):
    """configs/paper.yaml with the data set pointed at `imagenet`, one step per phase, on the CPU."""
    raw = hparams.load_yaml(REPO / "configs" / "paper.yaml")
    raw |= {"data": {"imagenet": str(imagenet)}, "output_dir": str(out), "data_root": str(out / "data")}
    raw |= {"device": "cpu", "threads": 2, "workers": 0, "wandb": {"mode": "disabled"}, "rows": [row]}
    entry = raw["experiments"][row]
    entry["train"] |= {"batch_size": 2, "max_steps_per_epoch": 1}
    entry["eval"] = {"batch_size": 6}
    entry["phases"] = [{**p, "epochs": 1} for p in entry["phases"]]
    return parse(raw)


@pytest.mark.parametrize("row", ["resnet18", "resnet50", "googlenet", "vgg16"])
def test_full_size_paper_models_run_dsd_on_imagenet_layout(row, tmp_path):
    imagenet = make_imagenet(tmp_path / "imagenet")
    config = paper_config(row, imagenet, tmp_path / "out")
    spec = config.row(row)
    assert spec.model.size == "full" and spec.data_path == str(imagenet)
    prepare_data(config, row)
    for phase in spec.recipe.names:  # dense -> sparse1 -> redense1
        metrics = train(config, row, 0, phase)
        result = evaluate(config, row, 0, phase)
        assert all(math.isfinite(h["train_loss"]) for h in metrics["history"])
        assert 0 <= result["test"]["top1_error_pct"] <= 100 and 0 <= result["test"]["top5_error_pct"] <= 100
        if phase == "sparse1":
            first = vision_model.first_conv(spec.model.arch)
            layers = metrics["sparsity_per_layer"]
            assert first not in layers and layers, "first conv must stay dense"
            assert all(abs(s - 0.3) < 1e-3 for s in layers.values())
            state = torch.load(result["checkpoint"], weights_only=True)
            assert (state["model"][first] == 0).float().mean() < 0.01
            convs = [n for n, t in state["model"].items() if t.dim() == 4 and n != first]
            assert convs and all(n in layers for n in convs)
    assert metrics["measured_sparsity"] == 0.0  # re-dense


def test_corrupt_jpeg_and_empty_class_named(tmp_path):
    imagenet = make_imagenet(tmp_path / "imagenet", per_class=2)
    bad = imagenet / "val" / WNIDS[0] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = paper_config("resnet18", imagenet, tmp_path / "out")
    exp = config.experiment("resnet18")
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
    data = vision_data.ImageFolderData(root, Data(image_size=24, crop_scale_min=0.3), True, True)
    torch.manual_seed(0)
    batch = data.__getitems__(list(range(16)))
    images = torch.stack([image for image, _ in batch])
    assert images.shape == (16, 3, 24, 24) and [label for _, label in batch] == [0] * 8 + [1] * 8
    assert len({tuple(image[0, 0, :3].tolist()) for image in images}) > 8  # not one crop for all
    evaluation = vision_data.ImageFolderData(root, Data(image_size=24, resize=24), False, True)
    a, b = evaluation.__getitems__([0, 1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], evaluation[0][0])  # deterministic, same as per image


def test_generated_images_do_not_depend_on_the_order_splits_are_listed(tmp_path):
    from dsd.tracks.vision import synthetic

    synthetic.generate(tmp_path / "a", per_class={"train": 1, "val": 1, "test": 1})
    synthetic.generate(tmp_path / "b", per_class={"test": 1, "val": 1, "train": 1})  # as sorted JSON has it
    for path in sorted((tmp_path / "a").rglob("*.jpg")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
