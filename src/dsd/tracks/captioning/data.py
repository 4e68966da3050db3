"""Captioning data: Karpathy split files (Flickr8k / Flickr30k / COCO, and the generated `scenes`), the
vocabulary, and the frozen CNN's image features, computed once and cached.

The features cache is named by what it was computed from (the caption file's data set, the encoder, the
image size) and carries the data set's content fingerprint in its header: a cache built from other inputs
is never read as this one.
"""

from __future__ import annotations

import functools
import json
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from dsd import paths
from dsd.engine import loaders
from dsd.engine import prepare as prepared
from dsd.errors import DataError
from dsd.spec import Experiment
from dsd.tracks.captioning import synthetic
from dsd.tracks.captioning.config import features_path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # PAD is index 0; <unk> keeps its index but is no training target (encode)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images")
FEATURES_FORMAT = "dsd-caption-features"


_PUNCT = str.maketrans("", "", string.punctuation)


def tokenize(text: str) -> list[str]:
    """Lower-case, punctuation stripped, split on whitespace (what coco-caption's PTB tokenizer amounts to)."""
    return text.lower().translate(_PUNCT).split()


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    filename: str
    split: str
    captions: tuple[tuple[str, ...], ...]


def read_karpathy(json_path: str | Path, image_dir: str | Path | None = None) -> list[CaptionedImage]:
    """Images of a Karpathy split file (Flickr8k/30k, COCO), in file order; COCO 'restval' counts as train.

    Tokens come from a sentence's `tokens` (else its `raw`), re-normalised with `tokenize`.
    """
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir is not None else json_path.parent
    try:
        raw = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{json_path}: Karpathy caption file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{json_path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise DataError(f"{json_path}: missing field 'images' (expected a Karpathy split file)")
    images, seen = [], {}
    for i, entry in enumerate(raw["images"]):
        name = entry.get("filename") if isinstance(entry, dict) else None
        where = f"{json_path}: images[{i}]" + (f" ({name})" if name else "")
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object")
        for key in ("filename", "split", "sentences"):
            if key not in entry:
                raise DataError(f"{where}: missing field {key!r}")
        if entry["split"] not in ("train", "val", "test", "restval"):
            raise DataError(
                f"{where}: field 'split' is {entry['split']!r} (expected train, val, test, restval)"
            )
        if not isinstance(entry["sentences"], list):
            raise DataError(
                f"{where}: field 'sentences' is {type(entry['sentences']).__name__}, expected a list"
            )
        if not entry["sentences"]:
            raise DataError(f"{where}: field 'sentences' is empty")
        for key in ("filename", "filepath"):
            if key in entry and not isinstance(entry[key], str):
                raise DataError(f"{where}: field {key!r} is {type(entry[key]).__name__}, expected text")
        captions = []
        for j, sentence in enumerate(entry["sentences"]):
            if isinstance(sentence, dict) and "tokens" in sentence:
                tokens = sentence["tokens"]
                if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                    raise DataError(
                        f"{where}: sentences[{j}].tokens is {type(tokens).__name__}, expected a list of words"
                    )
                words = tokenize(" ".join(tokens))
            elif isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
                words = tokenize(sentence["raw"])
            elif isinstance(sentence, dict) and "raw" in sentence:
                raise DataError(
                    f"{where}: sentences[{j}].raw is {type(sentence['raw']).__name__}, expected text"
                )
            else:
                raise DataError(f"{where}: sentences[{j}] is missing field 'tokens' (and 'raw')")
            captions.append(tuple(words))
        split = "train" if entry["split"] == "restval" else entry["split"]
        path = image_dir / entry.get("filepath", "") / entry["filename"]
        if path in seen:  # in two splits, a test image was scored on captions it was trained on
            first = images[seen[path]]
            raise DataError(
                f"{where}: image listed again (first as images[{seen[path]}], split {first.split!r})"
            )
        seen[path] = i
        images.append(CaptionedImage(path, str(entry["filename"]), split, tuple(captions)))
    return images


def _paths(exp: Experiment) -> tuple[Path, Path]:
    cfg = exp.data
    root = Path(exp.data_dir)
    json_path = root / (cfg.json or f"dataset_{exp.dataset}.json")
    if cfg.images is not None:
        return json_path, root / cfg.images
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return json_path, root / name
    return json_path, root


@functools.lru_cache(maxsize=8)
def _read_cached(json_path: Path, image_dir: Path, mtime_ns: int) -> tuple[CaptionedImage, ...]:
    return tuple(read_karpathy(json_path, image_dir))


def images(exp: Experiment) -> tuple[CaptionedImage, ...]:
    json_path, image_dir = _paths(exp)
    mtime = json_path.stat().st_mtime_ns if json_path.exists() else 0
    return _read_cached(json_path, image_dir, mtime)


def build_vocabulary(captions, min_count: int) -> dict[str, int]:
    """Special tokens first (<pad> = 0), then words seen >= min_count times, most frequent first."""
    counts = Counter(word for caption in captions for word in caption)
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return {w: i for i, w in enumerate((*SPECIALS, *words))}


def encode(caption, vocab: dict[str, int], max_words: int) -> list[int]:
    """<start> w1 .. wn <end>: the caption's words in the vocabulary, at most max_words of them. A rare word is
    dropped, as NeuralTalk drops it: a <unk> target would teach the model to emit a word no reference holds."""
    known = [vocab[w] for w in caption if w in vocab and w not in SPECIALS]
    return [vocab[START], *known[:max_words], vocab[END]]


def vocabulary(exp: Experiment) -> dict[str, int]:
    train = [c for im in images(exp) if im.split == "train" for c in im.captions]
    return build_vocabulary(train, exp.data.min_count)


# --------------------------------------------------------------------------------------- image features


def load_features(exp: Experiment) -> tuple[list[str], torch.Tensor]:
    path = features_path(exp)
    if not path.is_file():
        raise DataError(f"{path}: image features missing (run: dsd features --config ... --row {exp.row})")
    saved = _features_cached(path, path.stat().st_mtime_ns)
    current = prepared.data_fingerprint(exp)
    if saved["data_fingerprint"] != current:
        raise DataError(
            f"{path}: stale, computed from other images (data {saved['data_fingerprint']}, now {current})"
        )
    return saved["filenames"], saved["features"]


@functools.lru_cache(maxsize=2)
def _features_cached(path: Path, mtime_ns: int) -> dict:
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as err:  # torch's errors for a cut-short or empty file (zip, EOF, pickle) name no file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"{path}: not a readable features cache ({first}); delete it and rerun dsd features"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != FEATURES_FORMAT:
        raise DataError(f"{path}: not a features cache of this version (delete it and rerun dsd features)")
    return {**saved, "filenames": list(saved["filenames"]), "features": saved["features"].float()}


def _split_features(exp: Experiment, split: str) -> tuple[list[CaptionedImage], torch.Tensor]:
    every = images(exp)
    names, features = load_features(exp)
    if names != [str(im.path.relative_to(_paths(exp)[1])) for im in every]:
        raise DataError(f"{features_path(exp)}: features do not match the images of the caption file")
    # standardised with train statistics: a frozen CNN's features have an arbitrary scale (a random or small
    # one gives per-image variation of ~1e-2), which the image projection would otherwise have to undo
    train = features[[i for i, im in enumerate(every) if im.split == "train"]]
    spread = train.std(0)
    # a feature constant over the training images (a ReLU unit never on there) is centred, not scaled: a
    # divisor of 1e-5 would blow it up 1e5 times on a val or test image where it is on
    spread = torch.where(spread == 0, torch.ones_like(spread), spread + 1e-5)
    features = (features - train.mean(0)) / spread
    chosen = [i for i, im in enumerate(every) if im.split == split]
    return [every[i] for i in chosen], features[chosen]


def feature_dim(exp: Experiment) -> int:
    return int(load_features(exp)[1].shape[1])


class CaptionPairs(Dataset):
    """One item per (image, caption) pair of the training split: (features, token ids)."""

    def __init__(self, exp: Experiment):
        cfg, vocab = exp.data, vocabulary(exp)
        items, self.features = _split_features(exp, "train")
        self.pairs = [
            (i, torch.tensor(encode(c, vocab, cfg.max_words)))
            for i, im in enumerate(items)
            for c in im.captions
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image, tokens = self.pairs[index]
        return self.features[image], tokens


def collate_pairs(batch):
    features = torch.stack([f for f, _ in batch])
    tokens = nn.utils.rnn.pad_sequence([t for _, t in batch], batch_first=True, padding_value=0)
    return features, tokens


class SplitImages(Dataset):
    """Images of one split: (features, index into the split) for decoding."""

    def __init__(self, exp: Experiment, split: str):
        self.items, self.features = _split_features(exp, split)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.features[index], index


_BUILT: dict = {}


def built_once(kind, exp: Experiment, *args):
    """`kind(exp, *args)`, built once per process for these captions and features, not every epoch: the
    standardisation of every image's features and a tensor per caption (~0.75 s an epoch at Flickr8k's size, the
    GPU idle meanwhile). A changed captions or features file builds it again."""
    files = (_paths(exp)[0], features_path(exp))
    key = (kind, args, exp.data, *((str(f), f.stat().st_mtime_ns if f.exists() else 0) for f in files))
    if key not in _BUILT:
        _BUILT[key] = kind(exp, *args)
    return _BUILT[key]


def train_loader(exp: Experiment, seed: int, epoch: int, skip_batches: int = 0, first: bool = False):
    return loaders.loader(
        built_once(CaptionPairs, exp),
        exp.train.batch_size,
        train=True,
        seed=seed,
        epoch=epoch,
        collate_fn=collate_pairs,
        workers=exp.options.workers,
        skip_batches=skip_batches,
    )


def eval_loader(exp: Experiment, split: str, batch_size: int, shard: bool = False):
    """The split's images in order; with `shard`, under torch.distributed, this rank's share of its batches."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    ds = built_once(SplitImages, exp, split)
    order = loaders.rank_batches(range(len(ds)), batch_size) if shard and loaders.distributed() else None
    return loaders.loader(ds, batch_size, train=False, order=order)


# ------------------------------------------------------------------------------------- prepare, encode


def sources(exp: Experiment) -> list[Path]:
    json_path, image_dir = _paths(exp)
    return [json_path, image_dir]


def prepare(exp: Experiment, data_fingerprint: str) -> dict:
    """Generate the embedded scenes (kept when complete), or check a real Karpathy data set's every image."""
    json_path, _ = _paths(exp)
    if exp.generated:
        cfg = exp.data
        made_with = {
            "seed": cfg.scenes_seed,
            "splits": list(cfg.scenes_splits),
            "image_size": cfg.scenes_image_size,
        }
        if _generator_of(json_path) != made_with:  # kept when complete and made with these settings
            synthetic.generate(
                exp.data_dir, cfg.scenes_seed, tuple(cfg.scenes_splits), cfg.scenes_image_size,
                json_name=json_path.name, image_dir=cfg.images or "images",
            )  # fmt: skip
    else:
        check_images_present(exp)
        if exp.options.verify_data:  # the same parallel decode as the vision rows' (one error listing all)
            from dsd.tracks.vision.data import verify_images

            verify_images([im.path for im in images(exp)], exp)
    every = images(exp)
    counts = Counter(im.split for im in every)
    empty = [split for split in ("train", "val", "test") if not counts.get(split)]
    if empty:  # an empty validation split would score every model 0 and pick among them by it
        raise DataError(
            f"{json_path}: no {empty[0]!r} images (a Karpathy split file has train, val and test)"
        )
    return {
        "json": str(json_path),
        "images": {s: counts.get(s, 0) for s in ("train", "val", "test")},
        "captions": sum(len(im.captions) for im in every),
    }


def check_images_present(exp: Experiment) -> None:
    """Every image of the caption file on disk. A misnamed image folder (data.images: Flicker8k_Dataset, as
    distributed, where a copy calls it Images) is named as such, not as the first of every image missing."""
    json_path, image_dir = _paths(exp)
    if not image_dir.is_dir():
        present = [name for name in IMAGE_DIRS if (image_dir.parent / name).is_dir()]
        hint = f"; {present[0]}/ is there" if present else ""
        raise DataError(f"{image_dir}: image folder not found (data.images{hint})")
    every = images(exp)
    missing = [im.path for im in every if not im.path.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]}: image listed in {json_path.name} is missing ({len(missing)} of {len(every)} are)"
        )


def _generator_of(json_path: Path) -> dict | None:
    try:
        return json.loads(json_path.read_text()).get("generator")
    except (OSError, ValueError):
        return None


class _ImageFiles(Dataset):
    def __init__(self, paths, image_size: int):
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.Resize(image_size),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as image:
                return self.transform(image.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"{self.paths[index]}: image missing") from None
        except Exception as err:  # truncated, not an image: PIL's errors do not all name the file
            raise DataError(
                f"{self.paths[index]}: cannot decode image ({type(err).__name__}: {err})"
            ) from None


@torch.no_grad()
def extract_features(exp: Experiment, encoder: nn.Module, batch_size: int = 64) -> Path:
    """Run the frozen encoder once over every image of the caption file; cache {filenames, features [N, D]}."""
    from tqdm import tqdm

    every = images(exp)
    image_dir = _paths(exp)[1]
    out_path = features_path(exp)
    encoder.eval()
    device = next(encoder.parameters()).device
    files = _ImageFiles([im.path for im in every], exp.data.image_size)
    # decoded and resized by the run's loader workers: in this process alone (~6 ms a Flickr8k JPEG) the GPU
    # waited ~10x its VGG-16 time for them
    batches = loaders.loader(files, batch_size, train=False, workers=exp.options.workers)
    chunks = [encoder(x.to(device)).flatten(1).float().cpu() for x in tqdm(batches, desc="features")]
    payload = {
        "format": FEATURES_FORMAT,
        "data_fingerprint": prepared.data_fingerprint(exp),
        "encoder": exp.upstream.get("encoder"),
        "filenames": [str(im.path.relative_to(image_dir)) for im in every],
        "features": torch.cat(chunks),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # a job killed while saving (kill -9, SIGTERM) left its temporary file, as large as the cache: GBs of fc7
    # features for COCO. Named as paths.write_atomically names them, so that the sweep finds a dead one
    paths.remove_stale_temporaries(out_path.parent)
    tmp = paths.temporary_for(out_path)
    try:
        torch.save(payload, tmp)
    except (OSError, RuntimeError) as err:  # a full disk surfaces as torch's RuntimeError, naming no file
        tmp.unlink(missing_ok=True)
        raise DataError(f"{out_path}: cannot write the features cache ({str(err).splitlines()[0]})") from None
    tmp.replace(out_path)
    return out_path


def check(exp: Experiment) -> None:
    """Before training: the caption file and the image features (missing or stale ones fail now)."""
    load_features(exp)


def same_folder(exp: Experiment, a: str, b: str) -> bool:
    return a == b
