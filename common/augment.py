"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) on batched tensors.

A strategy such as ``color_crop_cutout_flip_scale_rotate`` names families; each call draws one
family. :meth:`DSA.sample` draws parameters and :meth:`DSA.apply` applies them, so the *same*
transform can hit two batches: sample with ``n=1`` (Siamese, broadcast to any batch size) and
apply to the real and the synthetic batch of a class. ``n=len(x)`` gives per-sample transforms
(used when training evaluation networks). Everything is differentiable w.r.t. the images.
Random numbers come from a CPU ``torch.Generator`` so runs match across devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from common.errors import ConfigError

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
# Mirror-symmetric classes are not a property of digits: a flipped 2 is not a 2.
NO_FLIP_DATASETS = ("digits", "mnist", "svhn")


@dataclass(frozen=True)
class DSAConfig:
    """Ranges of each family (defaults from the DSA/DM papers)."""

    brightness: float = 1.0  # x + (r - 0.5) * brightness
    saturation: float = 2.0  # (x - mean_c) * r * saturation + mean_c
    contrast: float = 0.5  # (x - mean) * (r + contrast) + mean
    crop: float = 0.125  # translate by up to this fraction of the side, zero fill
    cutout: float = 0.5  # side of the zeroed square, as a fraction of the image side
    flip: float = 0.5  # probability
    scale: float = 1.2  # each axis scaled by U[1/scale, scale]
    rotate: float = 15.0  # degrees, U[-rotate, rotate]


@dataclass
class AugParams:
    """One family and its random values; leading dim 1 (Siamese) or batch size (per sample)."""

    family: str
    values: dict[str, torch.Tensor] = field(default_factory=dict)


def flips_keep_labels(dataset_name: str) -> bool:
    """False for digit datasets: a mirrored 2 is not a 2."""
    return dataset_name.split(":")[0] not in NO_FLIP_DATASETS


def strategy_for_dataset(dataset_name: str, strategy: str = DEFAULT_STRATEGY) -> str:
    """Drop ``flip`` for digit datasets."""
    if not flips_keep_labels(dataset_name):
        return "_".join(f for f in strategy.split("_") if f != "flip")
    return strategy


class DSA:
    def __init__(self, strategy: str = DEFAULT_STRATEGY, config: DSAConfig | None = None) -> None:
        families = [f for f in strategy.split("_") if f]
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            raise ConfigError(f"unknown DSA family {unknown or strategy!r}; use families from {'_'.join(FAMILIES)}")
        self.strategy = strategy
        self.families = tuple(families)
        self.config = config or DSAConfig()

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r})"

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int, image_size: int, generator: torch.Generator) -> AugParams:
        """Draw one family and its values for ``n`` samples (``n=1``: Siamese)."""
        family = self.families[int(torch.randint(len(self.families), (1,), generator=generator))]
        c, g = self.config, generator

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=g) * (hi - lo) + lo

        if family == "color":
            values = {
                "brightness": torch.rand(n, generator=g),
                "saturation": torch.rand(n, generator=g),
                "contrast": torch.rand(n, generator=g),
            }
        elif family == "crop":
            shift = int(image_size * c.crop + 0.5)
            values = {
                "dx": torch.randint(-shift, shift + 1, (n,), generator=g),
                "dy": torch.randint(-shift, shift + 1, (n,), generator=g),
            }
        elif family == "cutout":
            values = {
                "cx": torch.randint(0, image_size, (n,), generator=g),
                "cy": torch.randint(0, image_size, (n,), generator=g),
            }
        elif family == "flip":
            values = {"flip": torch.rand(n, generator=g) < c.flip}
        elif family == "scale":
            values = {"sx": uniform(1 / c.scale, c.scale), "sy": uniform(1 / c.scale, c.scale)}
        else:  # rotate
            values = {"angle": uniform(-c.rotate, c.rotate) * (math.pi / 180.0)}
        return AugParams(family, values)

    # ---------------------------------------------------------------- applying
    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        v = {k: t.to(x.device) for k, t in params.values.items()}
        n = x.shape[0]
        k = next(iter(v.values())).shape[0]
        if k not in (1, n):
            raise ValueError(f"params drawn for {k} samples cannot apply to a batch of {n}")
        return getattr(self, f"_{params.family}")(x, v)

    def __call__(self, x: torch.Tensor, generator: torch.Generator, siamese: bool = False) -> torch.Tensor:
        """Sample and apply in one go: per-sample by default, one shared transform if ``siamese``."""
        return self.apply(x, self.sample(1 if siamese else x.shape[0], x.shape[-1], generator))

    def _color(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        shape = (-1, 1, 1, 1)
        x = x + (v["brightness"].view(shape) - 0.5) * c.brightness
        mean_c = x.mean(dim=1, keepdim=True)
        x = (x - mean_c) * (v["saturation"].view(shape) * c.saturation) + mean_c
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (v["contrast"].view(shape) + c.contrast) + mean

    def _crop(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        n, _, h, w = x.shape
        pad = int(max(v["dx"].abs().max(), v["dy"].abs().max()))
        if pad == 0:
            return x
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (torch.arange(h, device=x.device).view(1, h) + pad + v["dy"].view(-1, 1)).expand(n, h)
        cols = (torch.arange(w, device=x.device).view(1, w) + pad + v["dx"].view(-1, 1)).expand(n, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1)
        out = xp.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]  # (N, H, W, C)
        return out.permute(0, 3, 1, 2)

    def _cutout(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        _, _, h, w = x.shape
        side = int(h * self.config.cutout + 0.5)
        top = (v["cy"] - side // 2).view(-1, 1, 1)
        left = (v["cx"] - side // 2).view(-1, 1, 1)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        inside = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
        return x * (~inside).unsqueeze(1).to(x.dtype)

    def _flip(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)

    def _warp(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def _scale(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        sx, sy = v["sx"], v["sy"]
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
        return self._warp(x, theta)

    def _rotate(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        a = v["angle"]
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
        return self._warp(x, theta)


@dataclass(frozen=True)
class ComposedAugment:
    """One per-sample augmented copy with every transform composed (the DKKT recipe, DESIGN s.5).

    Random crop (keep a square of side U[1 - crop, 1] of the image, resized back), translation by
    up to ``translate`` of the side (zero fill) and a horizontal flip with probability ``flip`` are
    one affine map per image, applied with a single bilinear ``grid_sample``; Gaussian noise of
    std ``noise`` is added after it. Differentiable w.r.t. the images.
    """

    translate: float = 0.125
    crop: float = 0.2
    flip: float = 0.5
    noise: float = 0.05

    def __post_init__(self) -> None:
        if not (0 <= self.translate < 1 and 0 <= self.crop < 1 and 0 <= self.flip <= 1 and self.noise >= 0):
            raise ConfigError("augmentation needs 0 <= translate < 1, 0 <= crop < 1, 0 <= flip <= 1 and noise >= 0")

    def for_dataset(self, dataset_name: str) -> ComposedAugment:
        """No flips where they change the label (:func:`flips_keep_labels`)."""
        return self if flips_keep_labels(dataset_name) else replace(self, flip=0.0)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        side = 1 - torch.rand(n, generator=generator) * self.crop  # kept fraction of the side
        room = 1 - side  # how far the kept square's centre may move (normalised coordinates)
        cx = (torch.rand(n, generator=generator) * 2 - 1) * room
        cy = (torch.rand(n, generator=generator) * 2 - 1) * room
        tx = (torch.rand(n, generator=generator) * 2 - 1) * (2 * self.translate)
        ty = (torch.rand(n, generator=generator) * 2 - 1) * (2 * self.translate)
        mirror = torch.where(torch.rand(n, generator=generator) < self.flip, -1.0, 1.0)
        zero = torch.zeros(n)
        theta = torch.stack(
            [torch.stack([side * mirror, zero, cx - tx], 1), torch.stack([zero, side, cy - ty], 1)], 1
        ).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.noise:
            out = out + torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * self.noise
        return out
