"""Deep Speech 1 and Deep Speech 2 style CTC models.

Parameter names are chosen so that "prune only fully connected and recurrent weights, never convolutions" is
a Pruner include/exclude pattern pair:

    include: ["fc*.weight", "rnn*.weight_ih_l*", "rnn*.weight_hh_l*", "out.weight"]
    exclude: ["conv.*"]

Convolutions live under `conv.*`, fully connected layers under `fc*` and `out`, recurrent layers under `rnn*`
(batch-norm parameters are 1-D and never pruned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dsd.spec import Experiment
from dsd.tracks.speech.config import Model, n_features
from dsd.tracks.speech.data import ALPHABET


def _rnn(kind: str, n_in: int, hidden: int) -> nn.RNNBase:
    if kind == "rnn":  # DeepSpeech 1's plain recurrence, with a ReLU as in the paper (unclipped here)
        return nn.RNN(n_in, hidden, nonlinearity="relu", batch_first=True, bidirectional=True)
    cls = {"gru": nn.GRU, "lstm": nn.LSTM}[kind]
    return cls(n_in, hidden, batch_first=True, bidirectional=True)


def _bidirectional(rnn: nn.RNNBase, packed) -> torch.nn.utils.rnn.PackedSequence:
    """Run a bidirectional layer on a packed batch and sum the directions (both DeepSpeech papers do)."""
    out, _ = rnn(packed)
    half = out.data.shape[-1] // 2
    return out._replace(data=out.data[:, :half] + out.data[:, half:])


class DeepSpeech(nn.Module):
    """DeepSpeech 1: context window -> 3 FC (clipped ReLU) -> 1 bidirectional RNN -> FC -> characters."""

    def __init__(self, n_in: int, cfg: Model, n_classes: int = len(ALPHABET)):
        super().__init__()
        self.context, self.stride, self.clip = cfg.context, cfg.stride, cfg.relu_clip
        width = n_in * (2 * cfg.context + 1)
        self.fc = nn.ModuleList([nn.Linear(width, cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden)])
        self.fc.append(nn.Linear(cfg.hidden, cfg.rnn_hidden))
        self.rnn = _rnn(cfg.rnn_type, cfg.rnn_hidden, cfg.rnn_hidden)
        self.fc4 = nn.Linear(cfg.rnn_hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, n_classes)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, F) -> log-probabilities (B, T', classes) and output lengths T'."""
        c = self.context
        x = F.pad(x, (0, 0, c, c)).unfold(1, 2 * c + 1, self.stride).flatten(2)  # (B, T', F*(2c+1))
        lengths = torch.div(lengths - 1, self.stride, rounding_mode="floor") + 1
        for layer in self.fc:
            x = self.dropout(F.hardtanh(layer(x), 0.0, self.clip))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        x, _ = pad_packed_sequence(
            _bidirectional(self.rnn, packed), batch_first=True, total_length=x.shape[1]
        )
        x = self.dropout(F.hardtanh(self.fc4(x), 0.0, self.clip))
        return self.out(x).log_softmax(-1), lengths


class DeepSpeech2(nn.Module):
    """DeepSpeech 2: 2-D convs + BN over the spectrogram -> bidirectional GRUs with sequence-wise BN -> FC."""

    def __init__(self, n_in: int, cfg: Model, n_classes: int = len(ALPHABET)):
        super().__init__()
        self.clip = cfg.relu_clip
        layers, channels, freq = [], 1, n_in
        self.time_geometry = []  # (kernel, stride) in time, for the output lengths
        for i, (kf, kt) in enumerate(cfg.conv_kernels):
            stride = (2, cfg.stride) if i == 0 else (2, 1)  # time is strided once, in the first conv
            self.time_geometry.append((kt, stride[1]))
            layers += [
                nn.Conv2d(channels, cfg.conv_channels, (kf, kt), stride, (kf // 2, kt // 2), bias=False),
                nn.BatchNorm2d(cfg.conv_channels),
                nn.Hardtanh(0.0, cfg.relu_clip),
            ]
            channels, freq = cfg.conv_channels, (freq + 2 * (kf // 2) - kf) // 2 + 1
        self.conv = nn.Sequential(*layers)
        sizes = [channels * freq] + [cfg.rnn_hidden] * cfg.rnn_layers
        self.rnn = nn.ModuleList(_rnn(cfg.rnn_type, sizes[i], cfg.rnn_hidden) for i in range(cfg.rnn_layers))
        # sequence-wise BN: statistics over every (utterance, frame) of the batch, padding excluded
        self.rnn_bn = nn.ModuleList(nn.BatchNorm1d(cfg.rnn_hidden) for _ in range(cfg.rnn_layers - 1))
        self.out = nn.Linear(cfg.rnn_hidden, n_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x.transpose(1, 2).unsqueeze(1))  # (B, C, F', T')
        x = x.flatten(1, 2).transpose(1, 2)  # (B, T', C*F')
        for kt, st in self.time_geometry:
            lengths = torch.div(lengths + 2 * (kt // 2) - kt, st, rounding_mode="floor") + 1
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        for i, rnn in enumerate(self.rnn):
            if i > 0:
                packed = packed._replace(data=self.rnn_bn[i - 1](packed.data))
            packed = _bidirectional(rnn, packed)
        x, _ = pad_packed_sequence(packed, batch_first=True, total_length=x.shape[1])
        return self.out(x).log_softmax(-1), lengths


def build(exp: Experiment) -> nn.Module:
    cls = DeepSpeech if exp.model.arch == "deepspeech" else DeepSpeech2
    return cls(n_features(exp.data), exp.model)


def parameter_names(cfg: Model) -> list[str]:
    with torch.device("meta"):
        model = (DeepSpeech if cfg.arch == "deepspeech" else DeepSpeech2)(40, cfg)
    return [name for name, _ in model.named_parameters()]
