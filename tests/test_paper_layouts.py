"""configs/paper.yaml runs: all seven paper rows through Snakemake, on tiny fake data in the real layouts
(ImageNet with a flat val/ and Kaggle's labels file; Flickr8k with its Karpathy JSON; WSJ's LDC layout and
LibriSpeech folders), full-size models (the vision rows started from locally saved state dicts), one step per
phase. And ImageNet's devkit layout, and bad layouts."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, snakemake
from PIL import Image
from torchvision import models

from dsd import hparams
from dsd.config import parse_config
from dsd.errors import DataError
from dsd.tracks.captioning import data as captioning_data
from dsd.tracks.vision import data as vision_data
from dsd.tracks.vision.model import FIRST_CONV

WNIDS = ("n01440764", "n01443537")
VISION = ("googlenet", "vgg16", "resnet18", "resnet50")


def _jpeg(path, rng, hint: int):
    pixels = rng.integers(
        0, 255, size=(int(rng.integers(70, 90)), int(rng.integers(70, 90)), 3), dtype=np.uint8
    )
    pixels[..., hint] = 255
    Image.fromarray(pixels).save(path, quality=85)


def fake_imagenet(root, labels="kaggle"):
    """train/<wnid>/*.JPEG; val/ flat as distributed, labelled by Kaggle's CSV or the devkit's files."""
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(4):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", rng, c)
    (root / "val").mkdir()
    truth = [0, 1, 1, 0]
    for i, c in enumerate(truth, start=1):
        _jpeg(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", rng, c)
    if labels == "kaggle":
        lines = [
            f"ILSVRC2012_val_{i:08d},{WNIDS[c]} 1 2 30 40 {WNIDS[c]} 3 4 50 60"
            for i, c in enumerate(truth, 1)
        ]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(lines) + "\n")
    else:
        from scipy.io import savemat

        devkit = root / "ILSVRC2012_devkit_t12" / "data"
        devkit.mkdir(parents=True)
        synsets = np.array([(ilsvrc_id, wnid) for ilsvrc_id, wnid in ((449, WNIDS[0]), (450, WNIDS[1]))],
                           dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])  # fmt: skip
        savemat(devkit / "meta.mat", {"synsets": synsets})
        (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{449 + c}\n" for c in truth))
    return root


def fake_flickr8k(root, vgg_state):
    """dataset_flickr8k.json (Karpathy) + Flicker8k_Dataset/ as distributed, VGG-16 weights inside the folder."""
    rng = np.random.default_rng(1)
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    words = ["a dog runs on grass", "a man rides a bike", "two cats sit on a mat", "a bird flies over water"]
    images = []
    for i, split in enumerate(["train"] * 8 + ["val"] * 2 + ["test"] * 2):
        _jpeg(root / "Flicker8k_Dataset" / f"{1000 + i}_abc.jpg", rng, i % 3)
        raws = [words[(i + k) % 4] for k in range(5)]
        sentences = [
            {"tokens": r.split(), "raw": r, "imgid": i, "sentid": 5 * i + k} for k, r in enumerate(raws)
        ]
        images.append({"filename": f"{1000 + i}_abc.jpg", "imgid": i, "split": split, "sentences": sentences,
                       "sentids": [5 * i + k for k in range(5)]})  # fmt: skip
    (root / "dataset_flickr8k.json").write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    (root / "weights").mkdir()
    try:  # a hard link: 553 MB less on the disk this test fills with full-size checkpoints
        os.link(vgg_state, root / "weights" / "vgg16-397923af.pth")
    except OSError:
        shutil.copy(vgg_state, root / "weights" / "vgg16-397923af.pth")
    return root


ROWS = (*VISION, "neuraltalk", "deepspeech", "deepspeech2")


def small_paper_config(tmp_path, folders: dict, weights) -> dict:
    """configs/paper.yaml itself, scaled to seconds: one seed, one step per phase of 1 epoch, 64-pixel crops;
    Deep Speech 1 on WSJ as configured, Deep Speech 2 on LibriSpeech (both layouts run). One step, not two: the
    full-size models' steps were most of the time (Deep Speech 2's ~2 s each on a CPU), and one step trains,
    prunes, checkpoints and evaluates every phase as two did."""
    raw = hparams.load_yaml(REPO / "configs" / "paper.yaml")
    raw |= {"output_dir": str(tmp_path / "results"), "data_root": str(tmp_path / "results" / "data")}
    raw |= {"data": {k: str(v) for k, v in folders.items()}, "seeds": [0], "device": "cpu"}
    raw |= {"threads": 1, "workers": 0, "wandb": {"mode": "disabled"}, "rows": list(ROWS)}
    ds2 = raw["experiments"]["deepspeech2"]
    ds2["dataset"] = "librispeech"
    ds2["data"] = {"feature": "logspec", "train": "train-clean-100", "val": "dev-clean", "test": "test-clean"}
    for name in ROWS:
        row = raw["experiments"][name]
        row["train"] = row["train"] | {"batch_size": 2, "max_steps_per_epoch": 1}
        row["phases"] = [p | ({"epochs": 1} if p["epochs"] else {}) for p in row["phases"]]
        row["eval"] = row["eval"] | {"batch_size": 4}
        if name in (
            "vgg16",
            "deepspeech2",
        ):  # the two largest: no momentum buffer to checkpoint (a smoke test)
            row["train"]["momentum"] = 0.0
            row["train"]["nesterov"] = False
        if name.startswith("deepspeech"):
            continue
        if name in VISION:
            row["model"] = row["model"] | {"weights": str(weights[name])}
            row["data"] = row["data"] | {"image_size": 64, "resize": 72}
        else:
            row["data"] = row["data"] | {"image_size": 64, "min_count": 1}
    return raw


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Locally saved state dicts of the full-size torchvision models (random weights: what matters is the path)."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for arch in VISION:
        torch.manual_seed(0)
        extra = {"aux_logits": True, "init_weights": True} if arch == "googlenet" else {}
        out[arch] = folder / f"{arch}.pth"
        torch.save(models.get_model(arch, num_classes=1000, **extra).state_dict(), out[arch])
    return out


def test_the_paper_config_runs_on_the_real_layouts(tmp_path, weights):
    """All seven rows at once: ImageNet with a flat val/ and Kaggle's labels, Flickr8k as distributed, WSJ from
    the LDC layout (SPHERE audio), LibriSpeech folders; full-size models (Tables 6 and 8 for speech)."""
    folders = {
        "imagenet": fake_imagenet(tmp_path / "imagenet"),
        "flickr8k": fake_flickr8k(tmp_path / "flickr8k", weights["vgg16"]),
        "wsj": fake_wsj(tmp_path / "wsj"),
        "librispeech": fake_librispeech(tmp_path / "LibriSpeech"),
    }
    raw = small_paper_config(tmp_path, folders, weights)
    configfile = tmp_path / "paper_small.yaml"
    configfile.write_text(json.dumps(raw))
    # Deep Speech 2's five full-size phases, one after another, are the longest chain: started first, the other
    # rows' jobs fill the second core beside it (started last, it ran alone for its last ~35 s)
    longest = tmp_path / "results" / "runs" / "deepspeech2" / "seed0" / "redense2" / "model.pt"
    env = os.environ | {"DSD_PREFORK": "1"}
    result = snakemake(tmp_path, configfile, "--prioritize", str(longest), timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    tables = tmp_path / "results" / "tables"
    comparison = pd.read_csv(tables / "paper_comparison.csv")
    assert list(comparison["row"]) == list(ROWS)
    assert comparison["baseline_mean"].notna().all() and comparison["dsd_mean"].notna().all()
    runs = tmp_path / "results" / "runs"
    for row in VISION:  # the dense phase is the pretrained model itself: no training step
        metrics = json.loads((runs / row / "seed0" / "dense" / "metrics.json").read_text())
        assert metrics["epochs"] == 0 and metrics["history"] == []
        sparse = json.loads((runs / row / "seed0" / "sparse1" / "metrics.json").read_text())
        first = FIRST_CONV[row]  # dense; every other conv and FC weight at exactly 30%
        layers = sparse["sparsity_per_layer"]
        assert first not in layers and all(abs(s - 0.3) < 1e-3 for s in layers.values())
    assert comparison.set_index("row").loc["neuraltalk", "chosen_sparsity"] in (0.5, 0.8, 0.9)
    fidelity = pd.read_csv(tables / "fidelity.csv").set_index(["row", "aspect"])
    assert fidelity.loc[("resnet18", "start"), "verdict"] == "same"
    assert str(weights["resnet18"]) in fidelity.loc[("resnet18", "start"), "ours"]
    assert fidelity.loc[("vgg16", "batch_size"), "ours"] == "2"  # says what this config does: a deviation
    assert fidelity.loc[("vgg16", "batch_size"), "verdict"].startswith("deviation")
    assert fidelity.loc[("neuraltalk", "sparsity"), "verdict"] == "same"
    for row, total in (("deepspeech", 8_139_805), ("deepspeech2", 67_696_733)):  # the tables' models, trained
        state = torch.load(runs / row / "seed0" / "redense2" / "model.pt", weights_only=True)["model"]
        assert (
            sum(t.numel() for k, t in state.items() if "running" not in k and "num_batches" not in k) == total
        )
    assert fidelity.loc[("deepspeech", "parameters"), "verdict"] == "same"
    assert fidelity.loc[("deepspeech", "pruned"), "verdict"] == "same"


def test_dsd_run_encodes_the_images_again_after_the_weights_file_is_replaced(tmp_path, weights):
    """`dsd run` rebuilt the captioning features when the encoder's dense run was retrained, not when the
    `data.encoder_weights` file was replaced (Caffe's VGG-16 converted over torchvision's, say): the captioning
    phases went on with the old weights' features. Snakemake reruns them (the file is an input); so does it."""
    from dsd import cli
    from dsd.engine import prepare

    raw = small_paper_config(
        tmp_path, {"flickr8k": fake_flickr8k(tmp_path / "flickr8k", weights["vgg16"])}, weights
    )
    configfile = tmp_path / "paper_small.json"
    configfile.write_text(json.dumps(raw | {"rows": ["neuraltalk"]}))
    args = cli.build_parser().parse_args(["run", "--config", str(configfile), "--row", "neuraltalk"])
    config = cli._config(args)
    prepare.prepare(config.row("neuraltalk").data_spec().experiment(config.options))
    path = cli._current_features(args, config, config.row("neuraltalk"))
    first, written = torch.load(path)["features"], path.stat().st_mtime_ns
    assert cli._current_features(args, config, config.row("neuraltalk")) == path
    assert path.stat().st_mtime_ns == written  # current: not encoded again
    replaced = tmp_path / "flickr8k" / "weights" / "vgg16-397923af.pth"
    replaced.unlink()  # a hard link to the module's weights: another file in its place
    torch.manual_seed(1)
    torch.save(models.vgg16().state_dict(), replaced)
    cli._current_features(args, config, config.row("neuraltalk"))
    assert not torch.equal(torch.load(path)["features"], first)


def test_the_devkit_layout_reads_the_same_labels_as_kaggle(tmp_path):
    config = {"experiments": {"r": {"track": "vision", "dataset": "imagenet", "model": {"num_classes": 1000},
                                    "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}}}  # fmt: skip
    read = {}
    for layout in ("kaggle", "devkit"):
        root = fake_imagenet(tmp_path / layout, labels=layout)
        exp = parse_config(config | {"data": {"imagenet": str(root)}}, check_models=False).experiment("r")
        read[layout] = [(os.path.basename(p), label) for p, label in vision_data.samples(exp, "val")]
    assert read["kaggle"] == read["devkit"] == [
        ("ILSVRC2012_val_00000001.JPEG", 0), ("ILSVRC2012_val_00000002.JPEG", 1),
        ("ILSVRC2012_val_00000003.JPEG", 1), ("ILSVRC2012_val_00000004.JPEG", 0),
    ]  # fmt: skip


def test_kaggle_labels_saved_again_by_a_spreadsheet_read_the_same(tmp_path):
    """LOC_val_solution.csv with a byte-order mark and CRLF line ends (Excel's UTF-8 CSV) was refused as not
    Kaggle's format: the mark became part of the `ImageId` column's name."""
    config = {"experiments": {"r": {"track": "vision", "dataset": "imagenet", "model": {"num_classes": 1000},
                                    "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}}}  # fmt: skip
    root = fake_imagenet(tmp_path / "imagenet")
    exp = parse_config(config | {"data": {"imagenet": str(root)}}, check_models=False).experiment("r")
    plain = vision_data.samples(exp, "val")
    csv = root / "LOC_val_solution.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes().replace(b"\n", b"\r\n"))
    assert vision_data.samples(exp, "val") == plain


def test_hidden_files_and_folders_are_neither_classes_nor_images(tmp_path):
    """A Jupyter `.ipynb_checkpoints/` in train/ became class 0, every synset's index shifted by one (a
    pretrained model then scored as wrong on every image); macOS's `._x.JPEG` files (a copy on an exFAT disk)
    were listed as images and failed to decode in the middle of training."""
    config = {"experiments": {"r": {"track": "vision", "dataset": "imagenet", "model": {"num_classes": 1000},
                                    "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}}}  # fmt: skip
    root = fake_imagenet(tmp_path / "imagenet")
    exp = parse_config(config | {"data": {"imagenet": str(root)}}, check_models=False).experiment("r")
    plain = {split: vision_data.samples(exp, split) for split in ("train", "val")}
    jpeg = (root / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").read_bytes()
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "x-checkpoint.JPEG").write_bytes(jpeg)
    (root / "val" / ".ipynb_checkpoints").mkdir()  # a flat val/ stays flat
    for image in [*root.glob("train/*/*.JPEG"), *root.glob("val/*.JPEG")]:
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert vision_data.classes(exp) == list(WNIDS)
    assert {split: vision_data.samples(exp, split) for split in ("train", "val")} == plain
    assert vision_data.check_imagefolder(exp)["classes"] == 2


@pytest.mark.parametrize("layout", ["kaggle", "devkit"])
def test_corrected_validation_labels_change_the_data_sets_fingerprint(tmp_path, layout):
    """The fingerprint (the data set's identity in every run) listed the split folders only: ImageNet's
    validation labels, a file beside them, could be corrected and every evaluation kept as current."""
    from dsd.engine.prepare import content_fingerprint

    config = {"experiments": {"r": {"track": "vision", "dataset": "imagenet", "model": {"num_classes": 1000},
                                    "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}}}  # fmt: skip
    root = fake_imagenet(tmp_path / "imagenet", labels=layout)
    exp = parse_config(config | {"data": {"imagenet": str(root)}}, check_models=False).experiment("r")
    before = content_fingerprint(exp)
    labels = vision_data.labels_file(exp)
    labels.write_text(labels.read_text().replace("450", "449").replace(WNIDS[1], WNIDS[0]))
    assert vision_data.samples(exp, "val") != [] and content_fingerprint(exp) != before


@pytest.mark.parametrize(
    "problem",
    [
        "no labels", "unknown synset", "count mismatch", "devkit without meta", "devkit not UTF-8",
        "two images of one name", "an image labelled twice",
    ],
)  # fmt: skip
def test_a_bad_imagenet_layout_is_one_line_naming_the_file(tmp_path, problem):
    layout = "devkit" if problem.startswith("devkit") else "kaggle"
    root = fake_imagenet(tmp_path / "imagenet", labels=layout)
    csv = root / "LOC_val_solution.csv"
    if problem == "no labels":
        csv.unlink()
        expected = "no labels file was found"
    elif problem == "unknown synset":
        csv.write_text(csv.read_text().replace(WNIDS[1], "n99999999", 1))
        expected = f"{csv}:3: synset 'n99999999' is not a class of train/"
    elif problem == "count mismatch":
        (root / "val" / "ILSVRC2012_val_00000005.JPEG").write_bytes(
            (root / "val" / "ILSVRC2012_val_00000001.JPEG").read_bytes()
        )
        expected = f"{csv}: labels for 4 images, {root / 'val'} has 5"
    elif problem == "two images of one name":  # an IndexError's traceback
        second = root / "val" / "ILSVRC2012_val_00000002.png"
        Image.open(root / "val" / "ILSVRC2012_val_00000002.JPEG").save(second)
        expected = f"{second}: a second image named 'ILSVRC2012_val_00000002' in {root / 'val'} (ILSVRC2012_val_00000002.JPEG)"
    elif problem == "an image labelled twice":  # the later line's label was read, silently
        csv.write_text(csv.read_text() + f"ILSVRC2012_val_00000002,{WNIDS[0]} 1 2 30 40\n")
        expected = f"{csv}:6: 'ILSVRC2012_val_00000002' again (first on line 3)"
    elif problem == "devkit without meta":
        (root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
        expected = "meta.mat: the devkit's meta.mat is needed"
    else:
        truth = root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
        truth.write_bytes(truth.read_bytes() + "450 \xe9\n".encode("latin-1"))
        expected = f"{truth}: not UTF-8 text"
    config = {"data": {"imagenet": str(root)}, "experiments": {"r": {
        "track": "vision", "dataset": "imagenet", "model": {"num_classes": 1000},
        "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}}}  # fmt: skip
    exp = parse_config(config, check_models=False).experiment("r")
    with pytest.raises(DataError) as caught:
        vision_data.check_imagefolder(exp)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


SPEECH_LINES = [("A CAT", 0), ("THE DOG [breath]", 1), ("\\PERIOD", 2), ("A DOG", 3)]


def fake_wsj(root, seconds=0.3):
    """The LDC discs' layout for si284 (both discs' index files), dev93 and Nov'93: SPHERE audio (soundfile),
    .dot transcripts, .ndx indices."""
    import soundfile as sf

    sr = 16000
    t = np.arange(int(sr * seconds)) / sr
    indices = {
        "wsj0/doc/indices/train/tr_s_wv1.ndx": ("wsj0", "si_tr_s", "011"),
        "wsj1/doc/indices/si_tr_s.ndx": ("wsj1", "si_tr_s", "46a"),
        "wsj1/doc/indices/h1_p0.ndx": ("wsj1", "si_dt_20", "4k0"),
        "wsj1/doc/indices/wsj1/eval/h1_p0.ndx": ("wsj1", "si_et_h1/wsj64k", "440"),  # Nov'93
    }
    for index, (disc, part, speaker) in indices.items():
        lines = []
        for i, (text, tone) in enumerate(SPEECH_LINES):
            uid = f"{speaker}c02{i:02d}"
            folder = root / disc / part / speaker
            folder.mkdir(parents=True, exist_ok=True)
            audio = 0.3 * np.sin(2 * np.pi * (200 + 60 * tone) * t)
            sf.write(folder / f"{uid}.wv1", audio, sr, format="NIST", subtype="PCM_16")
            dots = root / disc / "transcrp" / "dots" / part / speaker
            dots.mkdir(parents=True, exist_ok=True)
            with open(dots / f"{speaker}c0200.dot", "a") as f:
                f.write(f"{text} ({uid})\n")
            suffix = "" if "/eval/" in index else ".wv1"  # the evaluation indices leave it out
            lines.append(f"11_1_1:{disc}/{part}/{speaker}/{uid}{suffix}")
        (root / index).parent.mkdir(parents=True, exist_ok=True)
        (root / index).write_text("\n".join(lines) + "\n")
    return root


def fake_librispeech(root, seconds=0.3):
    import soundfile as sf

    sr = 16000
    t = np.arange(int(sr * seconds)) / sr
    for split, speaker in (("train-clean-100", "19"), ("dev-clean", "84"), ("test-clean", "61")):
        folder = root / split / speaker / "198"
        folder.mkdir(parents=True)
        lines = []
        for i, (text, tone) in enumerate([("A CAT", 0), ("THE DOG", 1), ("A DOG", 3), ("THE CAT", 0)]):
            uid = f"{speaker}-198-{i:04d}"
            sf.write(folder / f"{uid}.flac", 0.3 * np.sin(2 * np.pi * (200 + 60 * tone) * t), sr)
            lines.append(f"{uid} {text}")
        (folder / f"{speaker}-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_the_paper_fidelity_table_covers_every_aspect_and_explains_every_deviation():
    """Issue 16's aspects for every row (speech included), each deviation with the config's reason."""
    from dsd.config import load_config
    from dsd.report import fidelity

    config = load_config([REPO / "configs" / "paper.yaml"])
    frame = fidelity.table([config.row(name) for name in config.rows]).set_index(["row", "aspect"])
    for row in config.rows:
        aspects = set(frame.loc[row].index)
        assert {"architecture", "parameters", "pruned", "start", "data", "batch_size", "optimizer", "phases",
                "schedule", "metric"} <= aspects, (row, aspects)  # fmt: skip
    assert not frame["verdict"].str.contains("no reason given").any()
    assert frame.loc[("googlenet", "parameters"), "ours"] == "6,624,904"  # no auxiliary heads (untrained)
    assert "auxiliary" in frame.loc[("googlenet", "parameters"), "verdict"]
    assert frame.loc[("deepspeech", "metric"), "verdict"] == "same"  # WSJ'93: the paper's headline figure


def test_deep_speech_2_fidelity_compares_with_the_recipe_its_dense_start_was_trained_by():
    """The DSD paper is silent on how Deep Speech 2 trains; its dense start (20 epochs at 3e-4) is Amodei et al.'s
    recipe: batch 512, Nesterov 0.99, gradient norm 400, LR / 1.2 after every epoch. The table said "not stated"
    and called batch 64 and a constant LR readings."""
    from dsd.config import load_config
    from dsd.report import fidelity

    config = load_config([REPO / "configs" / "paper.yaml"])
    frame = fidelity.table([config.row("deepspeech2")]).set_index("aspect")
    assert frame.loc["batch_size", "paper"].startswith("512 ")
    assert frame.loc["batch_size", "verdict"].startswith("deviation: sized for one GPU")
    assert frame.loc["optimizer", "verdict"] == "same"  # SGD, Nesterov 0.99, clipped at 400
    assert "1.2 after every epoch" in frame.loc["schedule", "paper"]
    assert frame.loc["schedule", "ours"] == "anneal_epochs: /1.2 after every epoch"
    assert frame.loc["schedule", "verdict"] == "same"


def test_deep_speech_2_anneals_its_lr_by_1_2_after_every_epoch_as_amodei_et_al():
    """paper.yaml trained Deep Speech 2 at a constant LR within each phase (a stated deviation: no schedule
    divided the LR by a constant after every epoch); `anneal_epochs` does, and another factor is a deviation."""
    from dataclasses import replace

    from dsd.config import load_config
    from dsd.core.schedule import lr_at

    row = load_config([REPO / "configs" / "paper.yaml"]).row("deepspeech2")
    hp = row.train
    lrs = [lr_at(3e-4, step, 60, hp.lr_schedule, 20, anneal=hp.lr_anneal) for step in (0, 19, 20, 39, 40, 59)]
    assert lrs == pytest.approx([3e-4, 3e-4, 2.5e-4, 2.5e-4, 3e-4 / 1.44, 3e-4 / 1.44], rel=1e-12)
    other = replace(row, train=replace(hp, lr_anneal=1.5))
    assert _paper_fidelity_line(other, "schedule")["verdict"].startswith("deviation")


def _paper_fidelity_line(row, aspect: str) -> dict:
    from dsd.report import fidelity

    return next(line for line in fidelity.table([row]).to_dict("records") if line["aspect"] == aspect)


def test_the_resnet_rows_step_with_the_nesterov_momentum_of_fb_resnet_torch():
    """fb.resnet.torch's train.lua steps SGD with `nesterov = true`, and the paper changes no training
    hyper-parameter but the LR (Section 4): paper.yaml's ResNet rows had plain momentum, and the fidelity table
    called that the same as the paper."""
    from dataclasses import replace

    from dsd.config import load_config
    from dsd.engine.trainer import make_optimizer

    config = load_config([REPO / "configs" / "paper.yaml"])
    for name in ("resnet18", "resnet50"):
        row = config.row(name)
        line = _paper_fidelity_line(row, "optimizer")
        assert "Nesterov" in line["paper"] and "Nesterov" in line["ours"], line
        assert line["verdict"] == "same"
        plain = replace(row, train=replace(row.train, nesterov=False))
        assert _paper_fidelity_line(plain, "optimizer")["verdict"].startswith("deviation")
        optimizer = make_optimizer(torch.nn.Linear(2, 2), row.experiment(), 0.01)
        assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9


def test_the_vision_rows_keep_the_dropout_of_the_models_the_paper_started_from():
    """ "Hyper parameters like dropout ratios and weight decay remained unchanged" (Section 2): BVLC's GoogLeNet,
    and DSD's own GoogleNet/train_val.prototxt, drop 40% before the classifier, torchvision's GoogLeNet 20%;
    paper.yaml built torchvision's default, and the fidelity table had no dropout line to say so."""
    from dsd.config import load_config
    from dsd.tracks.vision.model import _network

    config = load_config([REPO / "configs" / "paper.yaml"])
    expected = {"googlenet": "0.4", "vgg16": "0.5, 0.5", "resnet18": "none", "resnet50": "none"}
    for name, ours in expected.items():
        line = _paper_fidelity_line(config.row(name), "dropout")
        assert (line["ours"], line["verdict"]) == (ours, "same"), line
    with torch.device("meta"):
        googlenet = _network(config.row("googlenet").model)
    assert [m.p for m in googlenet.modules() if isinstance(m, torch.nn.Dropout)] == [0.4]


def test_googlenet_and_vgg16_train_on_the_prototxts_crop_at_one_scale_and_the_resnets_on_scale_augmentation():
    """DSD's GoogleNet and VGG16 train_val.prototxt crop a random 224 square at one scale and mirror
    (`crop_size: 224, mirror: true` over BVLC's LMDB of 256x256 images); paper.yaml trained them, as the
    ResNets, on RandomResizedCrop's 8-100% of the area, and the fidelity table compared that with the
    prototxts' crop. The ResNets keep fb.resnet.torch's scale augmentation; the embedded default its crop."""
    from dsd.config import load_config

    config = load_config([REPO / "configs" / "paper.yaml"])
    for name in ("googlenet", "vgg16"):
        row = config.row(name)
        assert (row.data.train_crop, row.data.image_size, row.data.resize) == ("random", 224, 256)
        line = _paper_fidelity_line(row, "augmentation")
        assert "crop_size 224" in line["paper"] and "warped to 256x256" in line["paper"], line
        assert line["ours"].startswith("random 224x224 crops of images resized to 256 on the shorter side")
        assert line["verdict"].startswith("deviation: the prototxt's crop_size 224 and mirror, at one scale")
        assert "warped every image to 256x256" in line["verdict"]
    for name in ("resnet18", "resnet50"):
        line = _paper_fidelity_line(config.row(name), "augmentation")
        assert config.row(name).data.train_crop == "random_resized"
        assert (
            line["ours"].startswith("RandomResizedCrop 224 (0.08-1")
            and "scale augmentation" in line["verdict"]
        )
    default = load_config(REPO / "configs" / "default.yaml")
    assert {
        default.row(name).data.train_crop for name in default.rows if default.row(name).track == "vision"
    } == {"random_resized"}


def test_the_neuraltalk_fidelity_lines_say_the_weight_decay_the_paper_states():
    """Section 4.4 keeps "the same weight decay and batch size as the original paper" (neuraltalk's L2 of 1e-8):
    the optimizer line printed no weight decay, so the table was silent on a value the paper states."""
    from dsd.config import load_config

    row = load_config([REPO / "configs" / "paper.yaml"]).row("neuraltalk")
    line = _paper_fidelity_line(row, "optimizer")
    assert "weight decay 0," in line["ours"] and "the same weight decay" in line["paper"], line
    assert "1e-8" in line["paper"] and "1e-10 per caption" in line["verdict"]


def test_the_neuraltalk_metric_line_says_the_paper_names_no_bleu_scorer():
    """The paper names no BLEU scorer, and neuraltalk's own (eval/multi-bleu.perl) has its brevity penalty
    commented out; the table credited the paper with coco-caption's and called our metric the same. The
    reason's figures are the scorer's: captions at 0.8 of their references' length, with and without it."""
    import math

    from dsd.config import load_config
    from dsd.tracks.captioning.metric import bleu_statistics, corpus_bleu

    line = _paper_fidelity_line(load_config([REPO / "configs" / "paper.yaml"]).row("neuraltalk"), "metric")
    assert "coco-caption" not in line["paper"] and "brevity penalty" in line["paper"], line
    assert line["verdict"].startswith("reading: coco-caption's corpus BLEU"), line
    references = [
        [
            "a dog runs through the tall green grass".split(),
            "a brown dog is running in a field of grass".split(),
        ],
        [
            "two children play on the sandy beach".split(),
            "two kids are playing in the sand near the water".split(),
        ],
    ]
    captions = ["a dog runs through the grass".split(), "two children play in the sand".split()]
    counts = bleu_statistics(references, captions)
    correct, guess = (np.sum(counts[k], axis=0) for k in ("correct", "guess"))
    assert sum(counts["testlen"]) / sum(counts["reflen"]) == 0.8
    assert f"{corpus_bleu(references, captions)['bleu4']:.1f}" == "49.8"
    assert f"{100 * math.exp(np.mean(np.log(correct / guess))):.1f}" == "63.9"  # no brevity penalty
    assert "BLEU-4 49.8 with the penalty, 63.9 without" in line["verdict"]


def test_the_neuraltalk_architecture_line_says_torchs_lstm_cell_is_not_neuraltalks():
    """neuraltalk's LSTM (lstm_generator.py, tanhC_version 0 by default) outputs o * c with one bias per gate;
    torch's outputs o * tanh(c) with two: the table called the architecture the same for matching sizes."""
    from dsd.config import load_config

    for config in ("paper.yaml", "default.yaml"):
        line = _paper_fidelity_line(
            load_config([REPO / "configs" / config]).row("neuraltalk"), "architecture"
        )
        assert "o * c" in line["paper"] and "o * tanh(c)" in line["ours"], line
        assert line["verdict"].startswith("deviation:") and "o * tanh(c)" in line["verdict"], line


def test_the_neuraltalk_rows_have_a_dropout_line():
    """neuraltalk trains with dropout 0.5 before and after its LSTM; the captioning rows had no dropout line, so
    the embedded row's dropout 0 departed from it unseen."""
    from dsd.config import load_config

    paper = _paper_fidelity_line(load_config([REPO / "configs" / "paper.yaml"]).row("neuraltalk"), "dropout")
    assert "0.5" in paper["paper"] and paper["ours"].startswith("0.5 ") and paper["verdict"] == "same", paper
    embedded = _paper_fidelity_line(
        load_config([REPO / "configs" / "default.yaml"]).row("neuraltalk"), "dropout"
    )
    assert embedded["ours"].startswith("0 ") and embedded["verdict"].startswith("deviation: none in the"), (
        embedded
    )


def test_the_paper_neuraltalk_row_cuts_no_caption_and_decodes_up_to_neuraltalks_20_words():
    """neuraltalk trains on whole captions and its predict() stops after 20 words; the paper row cut training
    captions at 16 words (a long Flickr8k caption lost its end, <end> included where it is learnt) and decoded at
    most 16, with no reason in the table."""
    from dsd.config import load_config
    from dsd.tracks.captioning.data import END, START, build_vocabulary, encode

    row = load_config([REPO / "configs" / "paper.yaml"]).row("neuraltalk")
    caption = ("a man in a red shirt and a woman in a blue dress walk their two brown dogs along the wet sand of a "
               "quiet beach while the sun sets behind the tall grey rocks").split()  # fmt: skip
    vocab = build_vocabulary([caption], min_count=1)
    assert len(caption) == 35 and len(encode(caption, vocab, row.data.max_words)) == 35 + 2  # <start>, <end>
    assert encode(caption, vocab, row.data.max_words)[-1] == vocab[END] != vocab[START]
    line = _paper_fidelity_line(row, "decoding")
    assert (
        row.eval.max_len == 20 and "at most 20 words" in line["paper"] and "at most 20 words" in line["ours"]
    )
    assert line["verdict"].startswith("reading: beam search of width 3, our choice"), line


def test_googlenets_optimizer_line_says_caffes_bias_multipliers_are_not_kept():
    """DSD's GoogleNet/train_val.prototxt trains every bias at twice the LR and without weight decay; we have one
    LR and one decay for all parameters, and the fidelity table called GoogLeNet's optimizer the same."""
    from dsd.config import load_config

    config = load_config([REPO / "configs" / "paper.yaml"])
    line = _paper_fidelity_line(config.row("googlenet"), "optimizer")
    assert "twice the LR" in line["paper"] and line["verdict"].startswith("deviation: BVLC's solver"), line
    assert (
        _paper_fidelity_line(config.row("vgg16"), "optimizer")["verdict"] == "same"
    )  # its prototxt has none


def test_librispeech_converted_to_wav_or_edited_on_windows_reads_the_same(tmp_path):
    """A chapter converted to `.wav` (its `.flac` gone), its transcript saved again with a byte-order mark and
    tabs after the ids: every utterance was "missing" (`.flac` looked for; the mark or the tab in its id)."""
    import soundfile as sf

    from dsd.tracks.speech import data as speech_data

    root = fake_librispeech(tmp_path / "LibriSpeech")
    plain = speech_data.read_librispeech(root / "dev-clean")
    chapter = root / "dev-clean" / "84" / "198"
    for flac in chapter.glob("*.flac"):
        audio, rate = sf.read(flac)
        sf.write(flac.with_suffix(".wav"), audio, rate)
        flac.unlink()
    trans = chapter / "84-198.trans.txt"
    edited = "\ufeff" + trans.read_text().replace(" ", "\t", 1).replace("\n84-198-0001 ", "\n84-198-0001\t")
    trans.write_bytes(edited.replace("\n", "\r\n").encode())
    read = speech_data.read_librispeech(root / "dev-clean")
    assert [(u["id"], u["transcript"]) for u in read] == [(u["id"], u["transcript"]) for u in plain]
    assert [u["audio"] for u in read] == [u["audio"].replace(".flac", ".wav") for u in plain]
    assert all(len(speech_data.load_audio(u["audio"])) == 4800 for u in read)


def test_a_misnamed_flickr8k_image_folder_is_named_as_the_folder(tmp_path):
    """paper.yaml's `data.images: Flicker8k_Dataset` (as distributed) on a copy that calls it `Images/` (Kaggle's):
    the error named the first image as missing, as if one file were lost rather than the folder misnamed."""
    (tmp_path / "vgg.pth").write_bytes(b"")
    root = fake_flickr8k(tmp_path / "flickr8k", tmp_path / "vgg.pth")
    paper = hparams.load_yaml(REPO / "configs" / "paper.yaml")["experiments"]["neuraltalk"]
    config = {"data": {"flickr8k": str(root)}, "data_root": str(tmp_path / "data"), "experiments": {"nt": {
        "track": "captioning", "dataset": "flickr8k", "data": paper["data"],
        "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}}}  # fmt: skip
    exp = parse_config(config, check_models=False).experiment("nt")
    (root / "Flicker8k_Dataset").rename(root / "Images")
    with pytest.raises(DataError) as caught:
        captioning_data.prepare(exp, "")
    assert (
        str(caught.value)
        == f"{root / 'Flicker8k_Dataset'}: image folder not found (data.images; Images/ is there)"
    )
    (root / "Images").rename(root / "Flicker8k_Dataset")
    (root / "Flicker8k_Dataset" / "1003_abc.jpg").unlink()
    with pytest.raises(
        DataError, match=r"1003_abc.jpg: image listed in dataset_flickr8k.json is missing \(1 of 12"
    ):
        captioning_data.prepare(exp, "")


def test_hidden_files_beside_the_data_leave_its_fingerprint_as_it_was(tmp_path):
    """A `.DS_Store` that Finder rewrites, or a Jupyter `.ipynb_checkpoints/`, changed the data set's content
    fingerprint: `dsd run` prepared it again and trained every phase again, as if on other images."""
    from dsd.engine import prepare

    config = {"experiments": {"r": {"track": "vision", "dataset": "imagenet", "model": {"num_classes": 1000},
                                    "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}}}  # fmt: skip
    root = fake_imagenet(tmp_path / "imagenet")
    config |= {"data": {"imagenet": str(root)}, "data_root": str(tmp_path / "data")}
    exp = parse_config(config, check_models=False).experiment("r")
    prepare.prepare(exp)
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "val" / ".ipynb_checkpoints").mkdir()
    (root / "val" / ".ipynb_checkpoints" / "notes-checkpoint.txt").write_text("x")
    assert prepare.is_current(exp)
    (root / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").unlink()  # a real change still counts
    assert not prepare.is_current(exp)


def test_googlenet_and_vgg16_evaluation_says_their_prototxts_test_crop_was_of_a_warped_image():
    """The prototxts' TEST layer cut the centre 224 square from BVLC's 256x256 warp; the metric line called
    our aspect-kept resize-and-crop the same as the paper's. The ResNets' (fb.resnet.torch) is the same."""
    from dsd.config import load_config

    config = load_config([REPO / "configs" / "paper.yaml"])
    for name in ("googlenet", "vgg16"):
        line = _paper_fidelity_line(config.row(name), "metric")
        assert "warped to 256x256" in line["paper"], line
        assert line["verdict"].startswith("deviation: the centre 224 crop of each validation image"), line
    for name in ("resnet18", "resnet50"):
        assert _paper_fidelity_line(config.row(name), "metric")["verdict"] == "same"


def test_wsj_discs_linked_into_the_data_folder_read_as_copied_ones(tmp_path):
    """Each LDC disc mounted elsewhere and linked in (`wsj0 -> /mnt/wsj0`, as Kaldi's wsj_data_prep links them):
    `rglob` did not follow the link to its .dot files, so all of si84's utterances were left out of training
    as untranscribed (one line on stderr) and every dev93 and Nov'93 utterance of a linked disc failed."""
    from dsd.tracks.speech import data as speech_data

    copied, linked = fake_wsj(tmp_path / "copied"), fake_wsj(tmp_path / "linked")
    for disc in ("wsj0", "wsj1"):
        (linked / disc).rename(tmp_path / f"mounted-{disc}")
        (linked / disc).symlink_to(tmp_path / f"mounted-{disc}")
    (tmp_path / "mounted-wsj1" / "loop").symlink_to(linked)  # a link back up is read once, not forever
    for index in ("wsj0/doc/indices/train/tr_s_wv1.ndx", "wsj1/doc/indices/h1_p0.ndx"):
        read = {root: speech_data.read_wsj_index(root / index, root, "skip") for root in (copied, linked)}
        assert len(read[linked]) == 4
        assert [(u["id"], u["transcript"]) for u in read[linked]] == [
            (u["id"], u["transcript"]) for u in read[copied]
        ]


@pytest.mark.parametrize("fault", ["empty", "not readable"])
def test_an_empty_or_unreadable_image_fails_prepare_not_training(tmp_path, fault):
    """A zero-byte JPEG (a copy cut short) passed `dsd prepare` and stopped training when an epoch reached it."""
    if fault == "not readable" and os.geteuid() == 0:
        pytest.skip("root reads every file")
    config = {"experiments": {"r": {"track": "vision", "dataset": "imagenet", "model": {"num_classes": 1000},
                                    "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}}}  # fmt: skip
    root = fake_imagenet(tmp_path / "imagenet")
    exp = parse_config(config | {"data": {"imagenet": str(root)}}, check_models=False).experiment("r")
    bad = root / "train" / WNIDS[1] / f"{WNIDS[1]}_2.JPEG"
    if fault == "empty":
        bad.write_bytes(b"")
    else:
        bad.chmod(0)
    with pytest.raises(DataError) as caught:
        vision_data.check_imagefolder(exp)
    assert str(caught.value) == f"1 of 12 images are empty or not readable: {bad} ({fault})"


def test_an_image_listed_twice_in_the_karpathy_file_is_refused(tmp_path):
    """A split file listing one image twice (a test copy of a training entry, from a hand-merged file) put a
    training image in the test split, scored on the captions it was trained on, without a word."""
    (tmp_path / "vgg.pth").write_bytes(b"")
    root = fake_flickr8k(tmp_path / "flickr8k", tmp_path / "vgg.pth")
    split_file = root / "dataset_flickr8k.json"
    raw = json.loads(split_file.read_text())
    raw["images"].append(raw["images"][3] | {"split": "test"})
    split_file.write_text(json.dumps(raw))
    with pytest.raises(DataError) as caught:
        captioning_data.read_karpathy(split_file, root / "Flicker8k_Dataset")
    assert str(caught.value) == (
        f"{split_file}: images[12] (1003_abc.jpg): image listed again (first as images[3], split 'train')"
    )


@pytest.mark.parametrize("layout", ["wsj index line", "wsj index named twice", "librispeech transcript line"])
def test_an_utterance_listed_twice_in_a_split_is_refused(tmp_path, layout):
    """A line repeated in an .ndx index or a trans.txt, or one index named twice in data.train: the utterance
    trained twice per epoch (in a test split, its errors counted twice in the WER), without a word."""
    from dsd.tracks.speech import data as speech_data

    paper = hparams.load_yaml(REPO / "configs" / "paper.yaml")["experiments"]["deepspeech"]
    row = {"track": "speech", "dataset": "wsj", "model": paper["model"], "data": dict(paper["data"]),
           "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}  # fmt: skip
    if layout.startswith("wsj"):
        root = fake_wsj(tmp_path / "wsj")
        index = root / row["data"]["train"][0]
        if layout == "wsj index line":
            index.write_text(index.read_text() + index.read_text().splitlines()[2] + "\n")
            expected = f"{index}:5: 011c0202 is listed again in split 'train' (first at {index}:3)"
        else:
            row["data"]["train"] = [*row["data"]["train"], row["data"]["train"][0]]
            expected = f"{index}:1: 011c0200 is listed again in split 'train' (first at {index}:1)"
    else:
        root = fake_librispeech(tmp_path / "LibriSpeech")
        row |= {
            "dataset": "librispeech",
            "data": {"train": "train-clean-100", "val": "dev-clean", "test": "dev-clean"},
        }
        trans = root / "train-clean-100" / "19" / "198" / "19-198.trans.txt"
        trans.write_text(trans.read_text() + "19-198-0003 THE CAT\n")
        expected = f"{trans}:5: 19-198-0003 is listed again in split 'train' (first at {trans}:4)"
    config = {"data": {row["dataset"]: str(root)}, "experiments": {"r": row}}
    exp = parse_config(config, check_models=False).experiment("r")
    with pytest.raises(DataError) as caught:
        speech_data._sources(exp, "train")
    assert str(caught.value) == expected
    assert len(speech_data._sources(exp, "val")) == 4  # the other splits read as before


@pytest.mark.parametrize("layout", ["imagenet image", "wsj disc"])
def test_a_broken_symbolic_link_in_the_data_is_named_as_one(tmp_path, layout):
    """A link whose target is gone (a disc not mounted, a link farm's source moved) failed with "No such file or
    directory" naming a file that `ls` shows."""
    from dsd.engine.prepare import content_fingerprint

    if layout == "imagenet image":
        row = {"track": "vision", "dataset": "imagenet", "model": {"num_classes": 1000}}
        root = fake_imagenet(tmp_path / "imagenet")
        link = root / "train" / WNIDS[0] / f"{WNIDS[0]}_9.JPEG"
    else:
        paper = hparams.load_yaml(REPO / "configs" / "paper.yaml")["experiments"]["deepspeech"]
        row = {"track": "speech", "dataset": "wsj", "model": paper["model"], "data": paper["data"]}
        root = fake_wsj(tmp_path / "wsj")
        link = root / "wsj0"
        shutil.rmtree(link)
    link.symlink_to(tmp_path / "unmounted")
    config = {"data": {row["dataset"]: str(root)}, "experiments": {"r": row | {
        "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}}}  # fmt: skip
    exp = parse_config(config, check_models=False).experiment("r")
    with pytest.raises(DataError) as caught:
        content_fingerprint(exp)
    assert (
        str(caught.value)
        == f"{link}: broken symbolic link (its target {tmp_path / 'unmounted'} does not exist)"
    )


def test_librispeech_audio_without_a_transcript_line_is_counted(tmp_path, capsys):
    """A chapter whose trans.txt was lost or cut short in a copy: its audio was left out without a word."""
    from dsd.tracks.speech import data as speech_data

    root = fake_librispeech(tmp_path / "LibriSpeech")
    (root / "dev-clean" / "84" / "198" / "._84-198-0000.flac").write_bytes(b"AppleDouble")  # no audio
    assert len(speech_data.read_librispeech(root / "dev-clean")) == 4 and capsys.readouterr().err == ""
    (root / "dev-clean" / "84" / "198" / "84-198.trans.txt").write_text("84-198-0000 A CAT\n")
    assert len(speech_data.read_librispeech(root / "dev-clean")) == 1
    assert capsys.readouterr().err == (
        f"{root / 'dev-clean'}: 3 audio files without a line in their chapter's trans.txt left out "
        "(e.g. 84/198/84-198-0001.flac)\n"
    )


def test_si84s_speaker_401_listed_on_two_discs_trains_once_as_kaldis_recipe(tmp_path, capsys):
    """tr_s_wv1.ndx lists speaker 401's utterances on disc 11_2_1 (which does not hold them) and again on 11_3_1;
    with the discs merged into wsj0/ both lines name one file, so the paper rows' training split was refused
    as listing every one of them twice. Kaldi's wsj_data_prep.sh drops the 11_2_1 lines (si84: 7138)."""
    import soundfile as sf

    from dsd.tracks.speech import data as speech_data

    root = fake_wsj(tmp_path / "wsj")
    speaker = root / "wsj0" / "si_tr_s" / "401"
    speaker.mkdir(parents=True)
    dots = root / "wsj0" / "transcrp" / "dots" / "si_tr_s" / "401"
    dots.mkdir(parents=True)
    for i in range(2):
        sf.write(speaker / f"401c020{i}.wv1", np.zeros(4800), 16000, format="NIST", subtype="PCM_16")
    (dots / "401c0200.dot").write_text("A CAT (401c0200)\nA DOG (401c0201)\n")
    index = root / "wsj0" / "doc" / "indices" / "train" / "tr_s_wv1.ndx"
    listed = [f"{disc}:wsj0/si_tr_s/401/401c020{i}.wv1" for disc in ("11_2_1", "11_3_1") for i in range(2)]
    index.write_text(index.read_text() + "\n".join(listed) + "\n")
    paper = hparams.load_yaml(REPO / "configs" / "paper.yaml")["experiments"]["deepspeech"]
    row = {"track": "speech", "dataset": "wsj", "model": paper["model"], "data": paper["data"],
           "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}  # fmt: skip
    exp = parse_config(
        {"data": {"wsj": str(root)}, "experiments": {"r": row}}, check_models=False
    ).experiment("r")
    train = speech_data._sources(exp, "train")
    assert [u["id"] for u in train if u["id"].startswith("401")] == ["401c0200", "401c0201"]
    assert {u["where"] for u in train if u["id"].startswith("401")} == {f"{index}:7", f"{index}:8"}
    assert len(train) == 10  # si84's 4 + speaker 401's 2, si_tr_s's 4
    assert f"{index}: 2 lines of 11_2_1:wsj0/si_tr_s/401 left out" in capsys.readouterr().err
