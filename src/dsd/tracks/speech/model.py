"""Deep Speech 1 and Deep Speech 2 style CTC models.

Parameter names are chosen so that the paper's pruning is a pattern: Deep Speech 1 prunes layers 1-4 and keeps
layer 0 and the output dense (`include: ["fc*.weight", "rnn.*weight*"]`); Deep Speech 2 prunes its recurrent
and fully connected layers and keeps the convolutions and the output dense (`include: ["rnn.*weight*",
"fc.weight"]`). Batch-norm parameters are 1-D and never pruned.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, invert_permutation, pack_padded_sequence, pad_packed_sequence

from dsd.engine.distributed import to_device
from dsd.spec import Experiment
from dsd.tracks.speech.config import Model, n_features
from dsd.tracks.speech.data import ALPHABET


class BiRecurrent(nn.Module):
    """One bidirectional recurrent layer whose two directions are summed (both DeepSpeech papers do).

    rnn_type "rnn" is the papers' plain ReLU recurrence with one input matrix shared by both directions
    (Deep Speech 1's Table 6 counts 3 x 1024^2 + 1024 for it): `input` computes W x once, optionally
    followed by sequence-wise batch norm in place of its bias (Deep Speech 2: 3 x 1760^2 + 2 x 1760), and the
    recurrence runs on it with identity input weights (buffers, not parameters). gru and lstm have their own
    input weights per direction. The recurrence runs in float32 even under autocast: an unclipped ReLU
    recurrence can overflow fp16.
    """

    def __init__(self, kind: str, n_in: int, hidden: int, input_norm: bool = False):
        super().__init__()
        self.shared = kind == "rnn"
        if self.shared:
            self.input = nn.Linear(n_in, hidden, bias=not input_norm)
            self.norm = nn.BatchNorm1d(hidden) if input_norm else None
            self.rnn = nn.RNN(
                hidden, hidden, nonlinearity="relu", bias=False, batch_first=True, bidirectional=True
            )
            for name in ("weight_ih_l0", "weight_ih_l0_reverse"):
                delattr(self.rnn, name)
                self.rnn.register_buffer(name, torch.eye(hidden), persistent=False)
            self.rnn._init_flat_weights()
        else:
            cls = {"gru": nn.GRU, "lstm": nn.LSTM}[kind]
            self.rnn = cls(n_in, hidden, batch_first=True, bidirectional=True)

    def forward(self, packed: PackedSequence) -> PackedSequence:
        if self.shared:
            z = self.input(packed.data)
            packed = packed._replace(data=self.norm(z) if self.norm is not None else z)
        with _without_autocast(packed.data.device.type):
            out, _ = self.rnn(packed._replace(data=packed.data.float()))
        half = out.data.shape[-1] // 2
        return out._replace(data=out.data[:, :half] + out.data[:, half:])


def eager_under_compile(method):
    """`method` runs eagerly inside a `torch.compile`d model (`compile: true`), the layers around it compiled:
    Dynamo cannot trace packed sequences, whose batch sizes are data that `pad_packed_sequence` reads on the
    host (tracing failed: "data is not allocated yet"). Uncompiled, `method` runs as it is."""
    return torch.compiler.disable(method)


def _without_autocast(device_type: str):
    """Autocast off where the device has it (the meta device, which tests trace the step on, has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class DeepSpeech(nn.Module):
    """Deep Speech 1 as the DSD paper's Table 6: layer 0 over a context window of frames, two fully connected
    layers, one bidirectional recurrent layer, a fully connected layer, the CTC output; clipped ReLUs."""

    def __init__(self, n_in: int, cfg: Model, n_classes: int = len(ALPHABET)):
        super().__init__()
        self.context, self.stride, self.clip = cfg.context, cfg.stride, cfg.relu_clip
        self.layer0 = nn.Linear(n_in * (2 * cfg.context + 1), cfg.hidden)
        self.fc1 = nn.Linear(cfg.hidden, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.hidden)
        self.rnn = BiRecurrent(cfg.rnn_type, cfg.hidden, cfg.rnn_hidden)
        self.fc4 = nn.Linear(cfg.rnn_hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, n_classes)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, F) -> log-probabilities (B, T', classes) and output lengths T' (on the host: give the input
        lengths there, see `pack`)."""
        c = self.context
        x = F.pad(x, (0, 0, c, c)).unfold(1, 2 * c + 1, self.stride).flatten(2)  # (B, T', F*(2c+1))
        lengths = torch.div(lengths.cpu() - 1, self.stride, rounding_mode="floor") + 1
        for layer in (self.layer0, self.fc1, self.fc2):
            x = self.dropout(F.hardtanh(layer(x), 0.0, self.clip))
        x = self.recurrent(x, lengths)
        x = self.dropout(F.hardtanh(self.fc4(x.to(self.fc4.weight.dtype)), 0.0, self.clip))
        return self.out(x).log_softmax(-1), lengths

    @eager_under_compile
    def recurrent(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The bidirectional layer over the utterances' frames (padding excluded), padded again."""
        packed, restore = pack(x, lengths)
        return unpack(self.rnn(packed), restore, x.shape[1])


class DeepSpeech2(nn.Module):
    """Deep Speech 2 as the DSD paper's Table 8: two 2-D convolutions over (frequency, time), each followed by
    batch norm per channel and frequency; bidirectional recurrent layers with sequence-wise batch norm; a fully
    connected layer with batch norm; the CTC output."""

    def __init__(self, n_in: int, cfg: Model, n_classes: int = len(ALPHABET)):
        super().__init__()
        self.clip = cfg.relu_clip
        convs, norms, channels, freq = [], [], 1, n_in
        self.time_geometry = []  # (kernel, stride) in time, for the output lengths
        for i, (kf, kt) in enumerate(cfg.conv_kernels):
            stride = (2, cfg.stride) if i == 0 else (2, 1)  # time is strided once, in the first conv
            self.time_geometry.append((kt, stride[1]))
            convs.append(
                nn.Conv2d(channels, cfg.conv_channels, (kf, kt), stride, (kf // 2, kt // 2), bias=False)
            )
            channels, freq = cfg.conv_channels, (freq + 2 * (kf // 2) - kf) // 2 + 1
            norms.append(nn.BatchNorm1d(channels * freq))
        self.conv, self.conv_bn = nn.ModuleList(convs), nn.ModuleList(norms)
        sizes = [channels * freq] + [cfg.rnn_hidden] * cfg.rnn_layers
        shared = cfg.rnn_type == "rnn"
        self.rnn = nn.ModuleList(
            BiRecurrent(cfg.rnn_type, sizes[i], cfg.rnn_hidden, input_norm=shared)
            for i in range(cfg.rnn_layers)
        )
        # gru / lstm layers: sequence-wise BN between layers instead (statistics over the frames, padding excluded)
        self.rnn_bn = nn.ModuleList(
            nn.BatchNorm1d(cfg.rnn_hidden) for _ in range(0 if shared else cfg.rnn_layers - 1)
        )
        self.fc = nn.Linear(cfg.rnn_hidden, cfg.rnn_hidden, bias=False)
        self.fc_bn = nn.BatchNorm1d(cfg.rnn_hidden)
        self.out = nn.Linear(cfg.rnn_hidden, n_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `DeepSpeech.forward`."""
        x = x.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        lengths = lengths.cpu()
        for conv, norm, (kt, st) in zip(self.conv, self.conv_bn, self.time_geometry, strict=True):
            x = conv(x)
            lengths = torch.div(lengths + 2 * (kt // 2) - kt, st, rounding_mode="floor") + 1
            x = F.hardtanh(_norm_frames(norm, x, lengths), 0.0, self.clip)
        x = self.recurrent(x.flatten(1, 2).transpose(1, 2), lengths)  # (B, T', C*F')
        return self.out(x).log_softmax(-1), lengths

    @eager_under_compile
    def recurrent(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The recurrent layers and the fully connected one over the utterances' frames (padding excluded: its
        batch norm's statistics too), padded again."""
        packed, restore = pack(x, lengths)
        for i, rnn in enumerate(self.rnn):
            if i > 0 and self.rnn_bn:
                packed = packed._replace(data=self.rnn_bn[i - 1](packed.data))
            packed = rnn(packed)
        data = F.hardtanh(self.fc_bn(self.fc(packed.data.to(self.fc.weight.dtype))), 0.0, self.clip)
        return unpack(packed._replace(data=data), restore, x.shape[1])


def output_lengths(cfg: Model, lengths: torch.Tensor) -> torch.Tensor:
    """The frames a model of `cfg` outputs for `lengths` input frames (what its forward pass returns): Deep Speech
    1 strides its context windows, Deep Speech 2 its first convolution in time."""
    if cfg.arch == "deepspeech":
        return torch.div(lengths - 1, cfg.stride, rounding_mode="floor") + 1
    for i, (_, kt) in enumerate(cfg.conv_kernels):
        stride = cfg.stride if i == 0 else 1
        lengths = torch.div(lengths + 2 * (kt // 2) - kt, stride, rounding_mode="floor") + 1
    return lengths


def _norm_frames(norm: nn.BatchNorm1d, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Batch norm per (channel, frequency) of a (B, C, F, T) convolution output over its utterances' frames,
    padding excluded, and the padding frames zero: what the next convolution's own zero padding is, so that an
    utterance's output does not depend on the batch it is padded in (training statistics included).

    The frames are picked by their (utterance, frame) indices, found on the host from `lengths` (there): a
    boolean mask on the GPU makes the host wait for the count of its true elements, forward and backward. The
    same indexing operations as the mask's, which torch turns into these indices itself."""
    b, c, f, t = x.shape
    where = _frame_indices(lengths, t, x.device)
    frames = x.permute(0, 3, 1, 2)  # (B, T, C, F)
    normed = norm(frames[where].reshape(-1, c * f))
    out = torch.zeros(b, t, c, f, dtype=normed.dtype, device=x.device)
    out[where] = normed.reshape(-1, c, f)
    return out.permute(0, 2, 3, 1)


@torch.compiler.disable  # eager under compile: Dynamo has no fake kernel for pinning (compile: true on a GPU)
def _frame_indices(lengths: torch.Tensor, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (utterance, frame) indices of the frames within `lengths` (on the host) of `t`, on `device`."""
    valid = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    return tuple(to_device(i, device) for i in valid.nonzero(as_tuple=True))


def pack(x: torch.Tensor, lengths: torch.Tensor) -> tuple[PackedSequence, torch.Tensor]:
    """`pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)` with `lengths` on the host, and
    the order that `unpack` restores: the same sort and operations, but the sort's order reaches the GPU without
    a blocking copy (torch's copies it so: a wait for all the work queued before it)."""
    lengths, order = torch.sort(lengths, descending=True)
    order = to_device(order, x.device)
    return pack_padded_sequence(x.index_select(0, order), lengths, batch_first=True), invert_permutation(
        order
    )


def unpack(packed: PackedSequence, restore: torch.Tensor, total_length: int) -> torch.Tensor:
    """`pad_packed_sequence` of what `pack` packed, back in the batch's order (torch's also reorders the lengths,
    which are known here, on the host: reading its order back from the GPU waits for it)."""
    x, _ = pad_packed_sequence(packed, batch_first=True, total_length=total_length)
    return x.index_select(0, restore)


def build(exp: Experiment, pretrained: bool = True) -> nn.Module:
    """Nothing pretrained: `pretrained` is the tracks' common signature."""
    cls = DeepSpeech if exp.model.arch == "deepspeech" else DeepSpeech2
    return cls(n_features(exp.data), exp.model)


def meta_model(cfg: Model) -> nn.Module:
    """The model built on the meta device (no memory, no weights): its parameter names, for config checks."""
    with torch.device("meta"):
        return (DeepSpeech if cfg.arch == "deepspeech" else DeepSpeech2)(161, cfg)


def layer_counts(model: nn.Module) -> list[tuple[str, int]]:
    """Parameters per layer, in the order of the paper's tables (Deep Speech 1: Table 6, 2: Table 8)."""
    if isinstance(model, DeepSpeech):
        layers = [model.layer0, model.fc1, model.fc2, model.rnn, model.fc4, model.out]
        names = ["layer0", "fc1", "fc2", "rnn", "fc4", "out"]
    else:
        convs = [nn.ModuleList([c, n]) for c, n in zip(model.conv, model.conv_bn, strict=True)]
        layers = [*convs, *model.rnn, nn.ModuleList([model.fc, model.fc_bn]), model.out]
        names = (
            [f"conv{i}" for i in range(len(convs))]
            + [f"rnn{i}" for i in range(len(model.rnn))]
            + ["fc", "out"]
        )
    return [(n, sum(p.numel() for p in m.parameters())) for n, m in zip(names, layers, strict=True)]
