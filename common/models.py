"""Model registry: the networks used on edge devices, in distillation and in evaluation.

``build_model(name, channels, num_classes, image_size, **options)`` is the one way in;
``list_models()`` names what exists. Every model is a :class:`DistillNet`, which splits the
trunk (named stages) from the classifier head, like timm's ``forward_features``/``forward_head``:

* ``model.embed(x)``            penultimate features ``(N, embed_dim)`` — DM, K-means, herding
* ``model.features(x, layer)``  output of a named stage (``model.stage_names``) — local matching
* ``model(x)``                  logits

So distillers never reach into a model's internals. Inputs of any square size are adapted to
what the architecture needs: 28x28 is zero-padded to 32x32 (as in the DM/DC papers), smaller
inputs are resized up only for architectures that need a minimum size (AlexNet, VGG).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.registry import Registry

MODELS: Registry[Callable[..., DistillNet]] = Registry("model")


def register_model(name: str):
    return MODELS.register(name)


def list_models() -> list[str]:
    return MODELS.names()


def build_model(name: str, channels: int, num_classes: int, image_size: int, **options) -> DistillNet:
    """Build a freshly initialised model (initialisation follows torch's global RNG)."""
    builder = MODELS.get(name)
    try:
        model = builder(channels=channels, num_classes=num_classes, image_size=image_size, **options)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: bad option ({exc})") from None
    model.arch = name
    return model


# --------------------------------------------------------------------------------------------
# Building blocks


def make_norm(kind: str, channels: int) -> nn.Module:
    """``instancenorm`` is GroupNorm(C, C) (affine), as in the dataset-distillation literature."""
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(min(32, channels), channels, affine=True)
    if kind in ("none", ""):
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}; use instancenorm, batchnorm, groupnorm or none")


class InputAdapter(nn.Module):
    """Zero-pads small gaps (28 -> 32) and resizes larger gaps up to the size a trunk needs."""

    def __init__(self, image_size: int, target_size: int) -> None:
        super().__init__()
        self.image_size, self.target_size = image_size, target_size
        gap = target_size - image_size
        self.mode = "identity" if gap == 0 else ("pad" if 0 < gap <= image_size // 4 else "resize")
        if gap < 0:
            raise ConfigError(f"input {image_size}px is larger than the {target_size}px this adapter targets")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "identity":
            return x
        if self.mode == "pad":
            lo = (self.target_size - self.image_size) // 2
            hi = self.target_size - self.image_size - lo
            return F.pad(x, (lo, hi, lo, hi))
        return F.interpolate(x, size=(self.target_size, self.target_size), mode="bilinear", align_corners=False)


def _round_up(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


class DistillNet(nn.Module):
    """adapter -> named stages -> pool + flatten (embedding) -> linear classifier."""

    arch: str = ""

    def __init__(
        self,
        adapter: InputAdapter,
        stages: OrderedDict[str, nn.Module],
        pool: nn.Module,
        num_classes: int,
        channels: int,
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.stages = nn.ModuleDict(stages)
        self.pool = pool
        with torch.no_grad():
            probe = torch.zeros(1, channels, adapter.image_size, adapter.image_size)
            was_training = self.training
            self.eval()
            self.embed_dim = int(self._trunk(probe).flatten(1).shape[1])
            self.train(was_training)
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.num_classes = num_classes

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self.stages.keys())

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapter(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.pool(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last stage after pooling, unflattened."""
        return self._trunk(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding ``(N, embed_dim)``."""
        return self._trunk(x).flatten(1)

    def forward_head(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.embed(x))

    def features(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """Output of the named stage (see ``stage_names``); stops there."""
        if layer not in self.stages:
            raise ConfigError(
                f"{self.arch or type(self).__name__} has no layer {layer!r}; "
                f"choose one of {', '.join(self.stage_names)}"
            )
        x = self.adapter(x)
        for name, stage in self.stages.items():
            x = stage(x)
            if name == layer:
                return x
        raise AssertionError("unreachable")

    def features_and_logits(self, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A named mid-layer's output and the logits, in one pass."""
        x = self.adapter(x)
        mid = None
        for name, stage in self.stages.items():
            x = stage(x)
            if name == layer:
                mid = x
        if mid is None:
            raise ConfigError(f"no layer {layer!r}; choose one of {', '.join(self.stage_names)}")
        return mid, self.classifier(self.pool(x).flatten(1))


# --------------------------------------------------------------------------------------------
# ConvNet-D (ConvNet-3 by default): the standard dataset-distillation network


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2)`` (same values, same floor on odd sides) with a faster no-grad CPU path.

    aten's NCHW CPU kernel is slow on ConvNet's activations (1.2 ms for 16 x 128 x 28 x 28, 14x its
    channels_last kernel); without autograd four strided adds do it in a third of the time. With
    autograd their backward is slower than aten's, so aten keeps that path (and GPUs, and NHWC).
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        total = x[..., 0:h:2, 0:w:2] + x[..., 1:h:2, 0:w:2]
        total += x[..., 0:h:2, 1:w:2]
        total += x[..., 1:h:2, 1:w:2]
        return total.mul_(0.25)


def _conv_block(cin: int, cout: int, norm: str, pooling: str) -> nn.Sequential:
    pool = {"avg": AvgPool2x2(), "max": nn.MaxPool2d(2), "none": nn.Identity()}.get(pooling)
    if pool is None:
        raise ConfigError(f"unknown pooling {pooling!r}; use avg, max or none")
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), make_norm(norm, cout), nn.ReLU(inplace=True), pool)


@register_model("convnet3")
def convnet3(
    channels: int,
    num_classes: int,
    image_size: int,
    width: int = 128,
    depth: int = 3,
    norm: str = "instancenorm",
    pooling: str = "avg",
    fit: str = "pad",
) -> DistillNet:
    """depth x [conv3x3(width) -> norm -> ReLU -> pool2], then linear (2048-d embedding at 32x32).

    ``fit``: ``pad`` zero-pads the input to a multiple of 2^depth (28 -> 32: every pooling halves
    exactly); ``floor`` takes it as it is and lets pooling floor (28 -> 14 -> 7 -> 3, a 1152-d
    embedding, as the DM/DSA reference code does), 23 % fewer operations on MNIST.
    """
    if depth < 1 or image_size < 2**depth:
        raise ConfigError(f"convnet with depth {depth} needs images of at least {2**depth}px, got {image_size}")
    if fit not in ("pad", "floor"):
        raise ConfigError(f"convnet fit {fit!r}: use pad or floor")
    target = _round_up(image_size, 2**depth) if pooling != "none" and fit == "pad" else image_size
    stages = OrderedDict(
        (f"block{i + 1}", _conv_block(channels if i == 0 else width, width, norm, pooling)) for i in range(depth)
    )
    return DistillNet(InputAdapter(image_size, target), stages, nn.Identity(), num_classes, channels)


# --------------------------------------------------------------------------------------------
# ResNets, CIFAR-style stem (3x3 conv, no max-pool), torchvision's BasicBlock


def _resnet(blocks: list[int], channels: int, num_classes: int, image_size: int, norm: str) -> DistillNet:
    from torchvision.models.resnet import BasicBlock

    def norm_layer(c: int) -> nn.Module:
        return make_norm(norm, c)

    stages: OrderedDict[str, nn.Module] = OrderedDict()
    stages["stem"] = nn.Sequential(
        nn.Conv2d(channels, 64, 3, padding=1, bias=False), norm_layer(64), nn.ReLU(inplace=True)
    )
    cin = 64
    for i, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
        stride = 1 if i == 0 else 2
        layers = []
        for j in range(count):
            s = stride if j == 0 else 1
            down = None
            if s != 1 or cin != width:
                down = nn.Sequential(nn.Conv2d(cin, width, 1, stride=s, bias=False), norm_layer(width))
            layers.append(BasicBlock(cin, width, stride=s, downsample=down, norm_layer=norm_layer))
            cin = width
        stages[f"layer{i + 1}"] = nn.Sequential(*layers)
    target = _round_up(max(image_size, 16), 8)  # instance norm needs >1 pixel at layer4
    return DistillNet(InputAdapter(image_size, target), stages, nn.AdaptiveAvgPool2d(1), num_classes, channels)


@register_model("resnet10")
def resnet10(channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> DistillNet:
    return _resnet([1, 1, 1, 1], channels, num_classes, image_size, norm)


@register_model("resnet18")
def resnet18(channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> DistillNet:
    return _resnet([2, 2, 2, 2], channels, num_classes, image_size, norm)


# --------------------------------------------------------------------------------------------
# AlexNet and VGG11, small-image variants from the dataset-distillation benchmarks


@register_model("alexnet")
def alexnet(channels: int, num_classes: int, image_size: int) -> DistillNet:
    stages = OrderedDict(
        block1=nn.Sequential(nn.Conv2d(channels, 128, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        block2=nn.Sequential(nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        block3=nn.Sequential(
            nn.Conv2d(192, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ),
    )
    target = _round_up(max(image_size, 32), 8)
    return DistillNet(InputAdapter(image_size, target), stages, nn.Identity(), num_classes, channels)


@register_model("vgg11")
def vgg11(channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> DistillNet:
    plan = [[64], [128], [256, 256], [512, 512], [512, 512]]
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    cin = channels
    for i, widths in enumerate(plan):
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), make_norm(norm, w), nn.ReLU(inplace=True)]
            cin = w
        layers.append(nn.MaxPool2d(2))
        stages[f"block{i + 1}"] = nn.Sequential(*layers)
    target = _round_up(max(image_size, 32), 32)
    return DistillNet(InputAdapter(image_size, target), stages, nn.Identity(), num_classes, channels)
