"""Captioning track: NeuralTalk / show-and-tell on Flickr8k (paper) or generated scenes (embedded).

A frozen CNN turns each image into one feature vector, computed once and cached in the data set's folder
(`extract_features`); the DSD phases train only the language model: a linear image projection that is the
LSTM's first input, a word embedding, the LSTM and an output layer over the vocabulary. The paper prunes every
LSTM-side weight to 80% except the word embedding, so the embedding is the attribute `embed` and the row's
prune config excludes `embed.weight`. BLEU-1..4 are the coco-caption scorer's, in percent.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dsd import data as dsd_data
from dsd.config import Experiment, parse_dataclass
from dsd.tracks import DataError

METRIC = "bleu4"
HIGHER_IS_BETTER = True
PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # PAD is index 0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images")


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.5
    feature_dim: int | None = None  # None: read from the cached features file


@dataclass(frozen=True)
class DataConfig:
    json: str | None = None  # Karpathy file; None: dataset_<dataset>.json
    images: str | None = None  # image folder; None: the first of IMAGE_DIRS that exists
    features: str = "features.pt"  # cached CNN features, inside the data folder
    encoder_weights: str | None = None  # local torchvision VGG-16 state dict (paper scale); never downloaded
    encoder_row: str | None = None  # embedded scale: the vision row whose trained dense CNN is the encoder
    encoder_seed: int = 0
    image_size: int = 224  # encoder input (resize shorter side + centre crop)
    min_count: int = 5  # vocabulary: words seen this often in train captions
    max_words: int = 16  # captions truncated to this many words for training
    scenes_seed: int = 0  # embedded data only
    scenes_splits: tuple[int, int, int] = (1500, 250, 250)
    scenes_image_size: int = 64


@dataclass(frozen=True)
class EvalConfig:
    beam_size: int = 3
    max_len: int = 16


def model_config(exp: Experiment) -> ModelConfig:
    return parse_dataclass(ModelConfig, exp.model, f"config.experiments.{exp.row}.model")


def data_config(exp: Experiment) -> DataConfig:
    cfg = parse_dataclass(DataConfig, exp.data, f"config.experiments.{exp.row}.data")
    return dataclasses.replace(cfg, scenes_splits=tuple(cfg.scenes_splits))  # YAML gives a list


def eval_config(exp: Experiment) -> EvalConfig:
    return parse_dataclass(EvalConfig, exp.eval, f"config.experiments.{exp.row}.eval")


# ----------------------------------------------------------------------------------------------- model


class ShowAndTell(nn.Module):
    """Image projection -> LSTM step 0; then one word per step (teacher forcing in training)."""

    def __init__(self, feature_dim: int, vocab_size: int, embed_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.image_proj = nn.Linear(feature_dim, embed_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim)  # W_s: left dense by the paper's pruning
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for the word after each of `tokens` [B, T] (which start with <start>)."""
        inputs = torch.cat([self.image_proj(features).unsqueeze(1), self.embed(tokens)], dim=1)
        hidden, _ = self.lstm(self.dropout(inputs))
        return self.out(self.dropout(hidden[:, 1:]))  # the image step predicts nothing

    def start(self, features: torch.Tensor):
        """LSTM state after reading the image."""
        _, state = self.lstm(self.image_proj(features).unsqueeze(1))
        return state

    def step(self, tokens: torch.Tensor, state):
        """Log-probabilities of the next word given the previous ones [B]; <pad> and <start> never emitted."""
        hidden, state = self.lstm(self.embed(tokens).unsqueeze(1), state)
        logits = self.out(hidden[:, 0])
        logits[:, :2] = float("-inf")  # PAD=0, START=1
        return logits.log_softmax(-1), state


def build_model(exp: Experiment) -> ShowAndTell:
    cfg = model_config(exp)
    feature_dim = cfg.feature_dim or _load_features(exp)[1].shape[1]
    return ShowAndTell(feature_dim, len(vocabulary(exp)), cfg.embed_dim, cfg.hidden_dim, cfg.dropout)


# ------------------------------------------------------------------------------------------------ data

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
    images = []
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
        if not isinstance(entry["sentences"], list) or not entry["sentences"]:
            raise DataError(f"{where}: field 'sentences' is empty")
        captions = []
        for j, sentence in enumerate(entry["sentences"]):
            if isinstance(sentence, dict) and "tokens" in sentence:
                words = tokenize(" ".join(sentence["tokens"]))
            elif isinstance(sentence, dict) and "raw" in sentence:
                words = tokenize(sentence["raw"])
            else:
                raise DataError(f"{where}: sentences[{j}] is missing field 'tokens' (and 'raw')")
            captions.append(tuple(words))
        split = "train" if entry["split"] == "restval" else entry["split"]
        path = image_dir / entry.get("filepath", "") / entry["filename"]
        images.append(CaptionedImage(path, str(entry["filename"]), split, tuple(captions)))
    return images


def _paths(exp: Experiment) -> tuple[Path, Path]:
    cfg = data_config(exp)
    root = Path(exp.data_dir)
    json_path = root / (cfg.json or f"dataset_{exp.dataset}.json")
    if cfg.images is not None:
        return json_path, root / cfg.images
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return json_path, root / name
    return json_path, root


@functools.lru_cache(maxsize=8)
def _read_cached(json_path: Path, image_dir: Path, mtime: float) -> tuple[CaptionedImage, ...]:
    return tuple(read_karpathy(json_path, image_dir))


def images(exp: Experiment) -> tuple[CaptionedImage, ...]:
    json_path, image_dir = _paths(exp)
    mtime = json_path.stat().st_mtime if json_path.exists() else 0.0
    return _read_cached(json_path, image_dir, mtime)


def build_vocabulary(captions, min_count: int) -> dict[str, int]:
    """Special tokens first (<pad> = 0), then words seen >= min_count times, most frequent first."""
    counts = Counter(word for caption in captions for word in caption)
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return {w: i for i, w in enumerate((*SPECIALS, *words))}


def encode(caption, vocab: dict[str, int], max_words: int) -> list[int]:
    """<start> w1 .. wn <end>, at most max_words words, unknown words -> <unk>."""
    unk = vocab[UNK]
    return [vocab[START], *(vocab.get(w, unk) for w in caption[:max_words]), vocab[END]]


def vocabulary(exp: Experiment) -> dict[str, int]:
    train = [c for im in images(exp) if im.split == "train" for c in im.captions]
    return build_vocabulary(train, data_config(exp).min_count)


def _load_features(exp: Experiment) -> tuple[list[str], torch.Tensor]:
    path = Path(exp.data_dir) / data_config(exp).features
    if not path.is_file():
        raise DataError(f"{path}: image features missing (run dsd.tracks.captioning.extract_features first)")
    return _features_cached(path, path.stat().st_mtime)


@functools.lru_cache(maxsize=2)
def _features_cached(path: Path, mtime: float) -> tuple[list[str], torch.Tensor]:
    saved = torch.load(path, weights_only=True)
    return list(saved["filenames"]), saved["features"].float()


def _split_features(exp: Experiment, split: str) -> tuple[list[CaptionedImage], torch.Tensor]:
    every = images(exp)
    names, features = _load_features(exp)
    if names != [str(im.path.relative_to(_paths(exp)[1])) for im in every]:
        path = Path(exp.data_dir) / data_config(exp).features
        raise DataError(f"{path}: features do not match the images of the caption file (stale: delete it)")
    # standardised with train statistics: a frozen CNN's features have an arbitrary scale (a random or small
    # one gives per-image variation of ~1e-2), which the image projection would otherwise have to undo
    train = features[[i for i, im in enumerate(every) if im.split == "train"]]
    features = (features - train.mean(0)) / (train.std(0) + 1e-5)
    chosen = [i for i, im in enumerate(every) if im.split == split]
    return [every[i] for i in chosen], features[chosen]


class CaptionPairs(Dataset):
    """One item per (image, caption) pair of the training split: (features, token ids)."""

    def __init__(self, exp: Experiment):
        cfg, vocab = data_config(exp), vocabulary(exp)
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


def train_loader(exp: Experiment, seed: int, epoch: int, skip_batches: int = 0):
    return dsd_data.loader(
        CaptionPairs(exp),
        exp.train.batch_size,
        train=True,
        seed=seed,
        epoch=epoch,
        collate_fn=collate_pairs,
        workers=exp.train.workers,
        skip_batches=skip_batches,
    )


def eval_loader(exp: Experiment, split: str):
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return dsd_data.loader(SplitImages(exp, split), exp.train.eval_batch_size, train=False)


# ----------------------------------------------------------------------------------- data sets and features


def prepare_scenes(exp: Experiment) -> dict:
    """Generate the embedded scenes (idempotent: an existing complete JSON is kept)."""
    from dsd import scenes

    cfg = data_config(exp)
    json_path, _ = _paths(exp)
    if not json_path.is_file():
        scenes.generate(
            exp.data_dir,
            cfg.scenes_seed,
            cfg.scenes_splits,
            cfg.scenes_image_size,
            json_name=json_path.name,
            image_dir=cfg.images or "images",
        )
    return _summary(exp)


def check_flickr8k(exp: Experiment) -> dict:
    """Check a real Karpathy data set (Flickr8k, also Flickr30k/COCO files): caption file and every image.

    Then, once, the VGG-16 fc7 features (from the local `data.encoder_weights`) if they are not cached yet.
    """
    summary = _summary(exp)
    for im in images(exp):
        if not im.path.is_file():
            raise DataError(f"{im.path}: image listed in {_paths(exp)[0].name} is missing")
    features = Path(exp.data_dir) / data_config(exp).features
    if not features.is_file():
        device = "cuda" if torch.cuda.is_available() and exp.device != "cpu" else "cpu"
        extract_features(exp, vgg16_encoder(exp).to(device), data_config(exp).image_size, features)
    summary["features"] = str(features)
    return summary


def _summary(exp: Experiment) -> dict:
    every = images(exp)
    counts = Counter(im.split for im in every)
    return {
        "json": str(_paths(exp)[0]),
        "images": {s: counts.get(s, 0) for s in ("train", "val", "test")},
        "captions": sum(len(im.captions) for im in every),
        "vocabulary": len(vocabulary(exp)),
    }


DATASETS = {"scenes": prepare_scenes, "flickr8k": check_flickr8k}
CONFIGS = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig}


def features_path(exp: Experiment) -> Path:
    return Path(exp.data_dir) / data_config(exp).features


def encoder_source(exp: Experiment) -> tuple[str, int] | None:
    """(vision row, seed) whose dense checkpoint encodes the images, when the pipeline trains the encoder."""
    cfg = data_config(exp)
    return (cfg.encoder_row, cfg.encoder_seed) if cfg.encoder_row else None


def encoder_from_module(model: nn.Module) -> nn.Module:
    """A copy of a classifier without its classifier: `.fc` -> Identity; torchvision VGG -> fc7 after ReLU."""
    import torchvision

    encoder = copy.deepcopy(model)
    if isinstance(encoder, torchvision.models.VGG):
        encoder.classifier = nn.Sequential(*list(encoder.classifier)[:5])  # fc6, relu, drop, fc7, relu
    elif isinstance(getattr(encoder, "fc", None), nn.Module):
        encoder.fc = nn.Identity()
    else:
        raise TypeError(f"don't know how to strip the classifier of {type(model).__name__} (no .fc, not VGG)")
    return encoder.eval().requires_grad_(False)


def vgg16_encoder(exp: Experiment) -> nn.Module:
    """Paper scale: VGG-16 fc7 from a local weights file (`data.encoder_weights`); never downloads."""
    import torchvision

    weights = data_config(exp).encoder_weights
    if not weights or not Path(weights).is_file():
        raise DataError(f"{weights or '(data.encoder_weights not set)'}: VGG-16 weights file not found")
    model = torchvision.models.vgg16()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return encoder_from_module(model)


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


@torch.no_grad()
def extract_features(
    exp: Experiment,
    encoder: nn.Module,
    image_size: int,
    out_path: str | Path | None = None,
    batch_size: int = 64,
) -> Path:
    """Run the frozen encoder once over every image of the caption file; save {filenames, features} [N, D]."""
    from tqdm import tqdm

    every = images(exp)
    image_dir = _paths(exp)[1]
    out_path = Path(out_path) if out_path is not None else Path(exp.data_dir) / data_config(exp).features
    encoder.eval()
    device = next(encoder.parameters()).device
    batches = dsd_data.loader(_ImageFiles([im.path for im in every], image_size), batch_size, train=False)
    chunks = [encoder(x.to(device)).flatten(1).float().cpu() for x in tqdm(batches, desc="features")]
    names = [str(im.path.relative_to(image_dir)) for im in every]
    tmp = out_path.with_suffix(".tmp")
    torch.save({"filenames": names, "features": torch.cat(chunks)}, tmp)
    tmp.replace(out_path)
    return out_path


# ------------------------------------------------------------------------------------------------ loss


def loss(model: ShowAndTell, batch, device) -> torch.Tensor:
    """Mean cross-entropy over the non-pad target words (teacher forcing: input <start> w1.., target w1.. <end>)."""
    features, tokens = (t.to(device, non_blocking=True) for t in batch)
    logits = model(features, tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)


# ------------------------------------------------------------------------------------------- decoding


@torch.no_grad()
def greedy(model: ShowAndTell, features: torch.Tensor, max_len: int) -> list[list[int]]:
    """Batched arg-max decoding; word ids without <start>/<end>."""
    state = model.start(features)
    token = torch.full((features.shape[0],), SPECIALS.index(START), dtype=torch.long, device=features.device)
    done = torch.zeros_like(token, dtype=torch.bool)
    words: list[list[int]] = [[] for _ in range(features.shape[0])]
    for _ in range(max_len):
        logp, state = model.step(token, state)
        token = logp.argmax(-1)
        done_now = done | (token == SPECIALS.index(END))
        for i in (~done_now).nonzero().flatten().tolist():
            words[i].append(int(token[i]))
        done = done_now
        if bool(done.all()):
            break
    return words


@torch.no_grad()
def beam_search(model: ShowAndTell, features: torch.Tensor, beam_size: int, max_len: int) -> list[list[int]]:
    """Batched beam search over images [B, D]; best total log-probability (no length normalisation).

    A finished hypothesis keeps its slot and score (its only continuation is <end> at log-prob 0), so the
    beam has a fixed width and beam size 1 is exactly greedy decoding.
    """
    end, (batch, k) = SPECIALS.index(END), (features.shape[0], beam_size)
    device = features.device
    state = tuple(s.repeat_interleave(k, dim=1) for s in model.start(features))
    tokens = torch.full((batch * k,), SPECIALS.index(START), dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    history = torch.zeros(batch, k, 0, dtype=torch.long, device=device)
    offsets = torch.arange(batch, device=device).unsqueeze(1) * k
    for _ in range(max_len):
        logp, state = model.step(tokens, state)
        logp = logp.view(batch, k, -1)
        stay = torch.full_like(logp, float("-inf"))
        stay[..., end] = 0.0
        logp = torch.where(finished.unsqueeze(-1), stay, logp)
        vocab_size = logp.shape[-1]
        scores, flat = (scores.unsqueeze(-1) + logp).view(batch, -1).topk(k, dim=1)
        rows, words = flat // vocab_size, flat % vocab_size
        history = torch.cat(
            [history.gather(1, rows.unsqueeze(-1).expand_as(history)), words.unsqueeze(-1)], -1
        )
        finished = finished.gather(1, rows) | (words == end)
        state = tuple(s[:, (rows + offsets).flatten()] for s in state)
        tokens = words.flatten()
        if bool(finished.all()):
            break
    best = history[torch.arange(batch, device=device), scores.argmax(1)].tolist()
    return [ids[: ids.index(end)] if end in ids else ids for ids in best]


def decode(model: ShowAndTell, features: torch.Tensor, beam_size: int, max_len: int) -> list[list[int]]:
    return beam_search(model, features, beam_size, max_len)


# ------------------------------------------------------------------------------------------------ metric


def corpus_bleu(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, float]:
    """coco-caption corpus BLEU-1..4 in percent; inputs already tokenized (lower-case, no punctuation)."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"bleu{n + 1}": 100.0 * float(s) for n, s in enumerate(scores)}


def _captions(model, exp: Experiment, split: str, device, limit: int | None = None):
    cfg = eval_config(exp)
    words = {i: w for w, i in vocabulary(exp).items()}
    was_training = model.training
    model.eval()
    loader = eval_loader(exp, split)
    items, hypotheses = loader.dataset.items, []
    try:
        for features, _ in loader:
            for ids in decode(model, features.to(device), cfg.beam_size, cfg.max_len):
                hypotheses.append([words[i] for i in ids])
            if limit is not None and len(hypotheses) >= limit:
                break
    finally:
        model.train(was_training)
    return items[: len(hypotheses)], hypotheses


def evaluate(model, exp: Experiment, split: str, device) -> dict[str, float]:
    """BLEU-1..4 (percent) of beam-search captions against all references of each image."""
    items, hypotheses = _captions(model, exp, split, device)
    return corpus_bleu([list(im.captions) for im in items], hypotheses)


def check(exp: Experiment) -> None:
    """Evaluation needs nothing beyond the data, which the data rule checks."""


def samples(model, exp: Experiment, device, n: int) -> list[dict]:
    items, hypotheses = _captions(model, exp, "test", device, limit=n)
    return [
        {"image": str(im.path), "reference": " ".join(im.captions[0]), "hypothesis": " ".join(h)}
        for im, h in zip(items[:n], hypotheses[:n], strict=True)
    ]
