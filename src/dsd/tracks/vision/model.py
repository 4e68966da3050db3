"""Vision models: torchvision's GoogLeNet, VGG-16, ResNet-18 and ResNet-50 (`size: full`), and members of the
same families scaled down for the embedded default (`size: mini`).

The mini models are built from torchvision's own blocks (BasicBlock, Bottleneck, Inception, VGG conv stacks)
with fewer channels and blocks and a stride-1 stem for small inputs. The first conv has the same parameter
name at both scales, so one `exclude` pattern keeps it dense.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.googlenet import BasicConv2d, Inception
from torchvision.models.resnet import BasicBlock, Bottleneck

from dsd.engine import checkpoint
from dsd.errors import ConfigError, DataError
from dsd.spec import Experiment
from dsd.tracks.vision.config import Model, weights_file

FIRST_CONV = {
    "resnet18": "conv1.weight",
    "resnet50": "conv1.weight",
    "vgg16": "features.0.weight",
    "googlenet": "conv1.conv.weight",
}


class MiniResNet(nn.Module):
    """ResNet with torchvision's blocks, one block per stage, widths w, 2w, 4w, 8w; the stem keeps full
    resolution and the first stage halves it (small inputs, CPU budget)."""

    def __init__(self, block: type[nn.Module], width: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, inplanes = [], width
        for i in range(4):
            planes, stride = width * 2**i, 2
            out = planes * block.expansion
            downsample = None
            if stride != 1 or inplanes != out:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
                )
            stages.append(block(inplanes, planes, stride, downsample))
            inplanes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MiniVGG(nn.Module):
    """VGG: 3x3 conv stacks and max pools, no batch norm (like the paper's Caffe model), 3 FC layers."""

    def __init__(self, width: int, num_classes: int, dropout: float):
        super().__init__()
        plan = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width, "M"]
        layers, channels = [], 3
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = 16 * width
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

        for m in self.features:  # He initialisation: without batch norm the default init stalls training
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MiniGoogLeNet(nn.Module):
    """GoogLeNet: BasicConv2d stem and torchvision's Inception modules (no auxiliary heads at this size)."""

    def __init__(self, width: int, num_classes: int, dropout: float):
        super().__init__()
        w = width
        self.conv1 = BasicConv2d(3, w, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(2)
        self.conv2 = BasicConv2d(w, 2 * w, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(2)
        self.inception3a = Inception(2 * w, w, w, 2 * w, w // 4, w // 2, w // 2)  # -> 4w channels
        self.inception3b = Inception(4 * w, 2 * w, 2 * w, 3 * w, w // 2, w, w)  # -> 7w
        self.maxpool3 = nn.MaxPool2d(2)
        self.inception4a = Inception(7 * w, 3 * w, 2 * w, 4 * w, w // 2, w, w)  # -> 9w
        self.inception5a = Inception(9 * w, 4 * w, 3 * w, 5 * w, w // 2, 2 * w, 2 * w)  # -> 13w
        self.dropout = nn.Dropout(dropout * 0.4)
        self.fc = nn.Linear(13 * w, num_classes)

    def forward(self, x):
        x = self.maxpool2(self.conv2(self.maxpool1(self.conv1(x))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception5a(self.inception4a(x))
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def build(exp: Experiment, pretrained: bool = True) -> nn.Module:
    """The row's network; with `model.weights`, the pretrained model it starts from. `pretrained=False`: the
    bare architecture, for a checkpoint that replaces every weight and buffer (no read of the weights file)."""
    model = _network(exp.model)  # as pretrained (GoogLeNet's input transform): not in the checkpoint
    if not pretrained:
        return model
    unused = _unused_heads(model)
    if weights_file(exp.model):
        key = f"config.experiments.{exp.row}.model.weights"
        checkpoint.load_weights(model, exp.model.weights, key, unused=unused)
    elif exp.model.weights:
        state = pretrained_state(exp)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(unused)})
    return model


def _unused_heads(model: nn.Module) -> tuple[str, ...]:
    """GoogLeNet built without its auxiliary classifiers (`aux_loss_weight: 0`): their weights in a pretrained
    state dict (torchvision's carries untrained ones) are not loaded."""
    if isinstance(model, models.GoogLeNet) and not model.aux_logits:
        return ("aux1.", "aux2.")
    return ()


def pretrained_state(exp: Experiment) -> dict:
    """torchvision's weights by name, from the local torch cache. Nothing is downloaded unless the config says
    `download: true` (a run option)."""
    cfg = exp.model
    where = f"config.experiments.{exp.row}.model.weights"
    try:
        weights = models.get_model_weights(cfg.arch)[cfg.weights]
    except KeyError:
        raise DataError(
            f"{where}: {cfg.weights!r} is neither a file nor torchvision {cfg.arch} weights"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not cached.is_file() and not exp.options.download:
        raise DataError(
            f"{cached}: {cfg.arch} {cfg.weights} is not in the local torch cache (copy it there, or set download: true)"
        )
    return weights.get_state_dict(progress=False, check_hash=True)


def _network(cfg: Model) -> nn.Module:
    if cfg.size == "mini":
        if cfg.arch == "resnet18":
            return MiniResNet(BasicBlock, cfg.width, cfg.num_classes)
        if cfg.arch == "resnet50":
            return MiniResNet(Bottleneck, cfg.width, cfg.num_classes)
        if cfg.arch == "vgg16":
            return MiniVGG(cfg.width, cfg.num_classes, cfg.dropout)
        return MiniGoogLeNet(cfg.width, cfg.num_classes, cfg.dropout)
    # torchvision's pretrained GoogLeNet expects its inputs re-normalised the Caffe way (transform_input)
    extra = (
        {"aux_logits": cfg.aux_loss_weight > 0, "init_weights": True, "transform_input": bool(cfg.weights)}
        if cfg.arch == "googlenet"
        else {}
    )
    if cfg.arch == "vgg16":
        extra = {"dropout": cfg.dropout}
    if cfg.arch.startswith("timm:"):
        return _timm_network(cfg)
    known = models.list_models(module=models)  # classification models only
    if cfg.arch not in known:
        close = difflib.get_close_matches(cfg.arch, known, n=1) or known[:1]
        raise ConfigError(
            f"arch {cfg.arch!r} is not a torchvision classification model (closest: {close[0]!r})"
        )
    try:
        model = models.get_model(cfg.arch, num_classes=cfg.num_classes, **(extra | cfg.args))
    except TypeError as err:
        raise ConfigError(f"args: {cfg.arch} does not take {cfg.args} ({err})") from None
    ignored = _ignored_args(model, cfg.args)
    if ignored:
        raise ConfigError(f"args: {cfg.arch} does not take {ignored[0]!r} (it would be ignored)")
    if cfg.arch == "googlenet":
        model.aux_loss_weight = cfg.aux_loss_weight
    return model


def _ignored_args(model: nn.Module, args: dict) -> list[str]:
    """Keys of `args` that nothing on the way to `model` names. Some torchvision constructors (MobileNetV3,
    ConvNeXt) take **kwargs and drop what they do not know, so a misspelt argument would build the default
    model without an error; a key is taken as read when a function or method of the model's module, or its
    class's constructor, has a parameter of that name (the builders pass their arguments on through these)."""
    if not args or not any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(type(model).__init__).parameters.values()
    ):
        return []  # the constructor refuses an unknown keyword itself (the TypeError above)
    functions = [c.__init__ for c in type(model).__mro__ if "__init__" in vars(c)]
    for value in vars(sys.modules[type(model).__module__]).values():
        members = vars(value).values() if isinstance(value, type) else (value,)
        functions += [inspect.unwrap(getattr(m, "__func__", m)) for m in members]
    named = set()
    for fn in functions:
        if inspect.isfunction(fn):
            kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            named |= {n for n, p in inspect.signature(fn).parameters.items() if p.kind in kinds}
    return [key for key in args if key not in named]


def _timm_network(cfg: Model) -> nn.Module:
    """`arch: timm:<name>`: a timm model, where timm is installed (random init: weights come from model.weights)."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"arch {cfg.arch!r} needs timm (pip install timm)") from None
    name = cfg.arch.removeprefix("timm:")
    if not timm.is_model(name):
        raise ConfigError(f"arch {cfg.arch!r}: timm has no model {name!r}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=cfg.num_classes, **cfg.args)
    except TypeError as err:
        raise ConfigError(f"args: {name} does not take {cfg.args} ({err})") from None


def meta_model(cfg: Model) -> nn.Module:
    """The model built on the meta device (no memory, no weights): its parameter names, for config checks."""
    with torch.device("meta"):
        return _network(cfg)


def first_conv(arch: str) -> str:
    return FIRST_CONV[arch]
