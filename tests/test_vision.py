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
