"""NeuralTalk / show-and-tell: a linear projection of the image feature is the LSTM's first input, then one
word per step; the frozen CNN that makes the features (a trained vision row, or VGG-16 fc7 from a local file).

The paper prunes every LSTM-side weight to 80% except the word embedding, so the embedding is the attribute
`embed` and the row's prune config excludes `embed.weight`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from dsd.engine import checkpoint
from dsd.errors import DataError
from dsd.spec import Experiment
from dsd.tracks.captioning.config import Model, encoder_weights
from dsd.tracks.captioning.data import END, SPECIALS, START, feature_dim, vocabulary


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


def build(exp: Experiment, pretrained: bool = True) -> ShowAndTell:
    """Nothing pretrained: the frozen encoder is not part of it (its features are read from their cache)."""
    cfg = exp.model
    return ShowAndTell(feature_dim(exp), len(vocabulary(exp)), cfg.embed_dim, cfg.hidden_dim, cfg.dropout)


def meta_model(cfg: Model) -> nn.Module:
    """The model built on the meta device (no memory, no weights): its parameter names, for config checks."""
    with torch.device("meta"):
        return ShowAndTell(8, 8, cfg.embed_dim, cfg.hidden_dim, cfg.dropout)


# ------------------------------------------------------------------------------------------ encoders


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

    weights = encoder_weights(exp)
    if not weights or not Path(weights).is_file():
        raise DataError(f"{weights or '(data.encoder_weights not set)'}: VGG-16 weights file not found")
    model = torchvision.models.vgg16()
    checkpoint.load_weights(model, weights, f"config.experiments.{exp.row}.data.encoder_weights")
    return encoder_from_module(model)


# ------------------------------------------------------------------------------------------ decoding


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
