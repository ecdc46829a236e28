"""The conditional GAN of the generator method, and its artifact (DESIGN s.6, s.9).

* :class:`ConditionalGenerator` maps noise ``z`` (dim 100) and a label to an image in [-1, 1]
  of any registry dataset's size and channels (the label is a one-hot concatenated to ``z``).
* :class:`ACDiscriminator` has a real/fake critic head (WGAN-GP) and a class head (AC-GAN).
* Two sizes (``GeneratorShape.arch``): ``small`` (width 64, 3 convolutions each; 0.9 M / 0.8 M
  parameters at 28 px) for CPU budgets, and ``dim``, DiM's size (width 196, 7 and 8 convolutions;
  2.4 M / 2.4 M). Ours, not DiM's code: the generator normalises per sample (GroupNorm) where
  DiM uses BatchNorm, so a sample never depends on what else is in its batch, and the label is
  concatenated to ``z`` where DiM overwrites z's first C entries.
* ``to_unit`` / ``from_unit`` convert between the dataset's normalised space (what models and
  artifacts hold) and the GAN's [-1, 1] space; conversion happens only at this boundary.
* A generator artifact is a directory with ``generator.safetensors`` + ``generator.json``;
  :func:`sample` draws any per-class counts from it, deterministically for a seed, and the
  k-th sample of a class does not depend on the other classes' counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.datasets import DatasetInfo
from common.errors import ArtifactError, ConfigError
from common.fileio import atomic_write_dir, atomic_write_json
from common.runtime import derive_seed, make_generator, tensor_sha256

GENERATOR_FORMAT = "edgedistill.generator"
GENERATOR_VERSION = 1
WEIGHTS_FILE = "generator.safetensors"
META_FILE = "generator.json"


@dataclass(frozen=True)
class GeneratorShape:
    """What rebuilds a generator: the dataset geometry and the network's size."""

    channels: int
    image_size: int
    num_classes: int
    noise_dim: int = 100
    width: int = 64
    arch: str = "small"  # small | dim (DiM's size)

    def __post_init__(self) -> None:
        if min(self.channels, self.image_size, self.num_classes, self.noise_dim, self.width) < 1:
            raise ConfigError("generator needs channels, image_size, num_classes, noise_dim and width >= 1")
        if self.arch not in ARCH_WIDTHS:
            raise ConfigError(f"generator arch {self.arch!r} is unknown; use {' or '.join(ARCH_WIDTHS)}")

    @classmethod
    def for_dataset(
        cls, info: DatasetInfo, noise_dim: int = 100, width: int = 0, arch: str = "small"
    ) -> GeneratorShape:
        """The shape for a dataset; ``width`` 0 takes the arch's default (small 64, dim 196)."""
        width = width or ARCH_WIDTHS.get(arch, 1)  # an unknown arch is refused by __post_init__
        return cls(info.channels, info.image_size, info.num_classes, noise_dim, width, arch)


ARCH_WIDTHS = {"small": 64, "dim": 196}


def _norm(channels: int) -> nn.Module:
    # Per-sample normalisation: a sample never depends on what else is in its batch.
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _conv_block(c_in: int, c_out: int, upsample: bool = False) -> list[nn.Module]:
    up = [nn.Upsample(scale_factor=2, mode="nearest")] if upsample else []
    return [*up, nn.Conv2d(c_in, c_out, 3, padding=1), _norm(c_out), nn.ReLU(inplace=True)]


class ConditionalGenerator(nn.Module):
    """[z, onehot(y)] -> linear -> (c, s/k, s/k) -> upsampling conv blocks -> conv -> tanh.

    small: c = 2w at s/4, two blocks (2w, w). dim: c = w at s/8 (4 x 4 at 28-32 px), three
    upsampling stages with 2 + 2 + 2 blocks of width w, as DiM's 7 inner convolutions + output.
    """

    def __init__(self, shape: GeneratorShape) -> None:
        super().__init__()
        self.shape = shape
        w = shape.width
        if shape.arch == "dim":
            self.start, self.base = w, math.ceil(shape.image_size / 8)
            blocks = [
                *_conv_block(w, w, upsample=True),
                *_conv_block(w, w),
                *_conv_block(w, w),
                *_conv_block(w, w, upsample=True),
                *_conv_block(w, w),
                *_conv_block(w, w, upsample=True),
            ]
            last = w
        else:
            self.start, self.base = 2 * w, math.ceil(shape.image_size / 4)
            blocks = [*_conv_block(2 * w, 2 * w, upsample=True), *_conv_block(2 * w, w, upsample=True)]
            last = w
        self.project = nn.Sequential(
            nn.Linear(shape.noise_dim + shape.num_classes, self.start * self.base * self.base), nn.ReLU(inplace=True)
        )
        self.body = nn.Sequential(*blocks, nn.Conv2d(last, shape.channels, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.shape.num_classes).to(z.dtype)
        h = self.project(torch.cat([z, onehot], 1)).view(-1, self.start, self.base, self.base)
        x = self.body(h)
        size, extra = self.shape.image_size, x.shape[-1] - self.shape.image_size
        lo = extra // 2
        return x[..., lo : lo + size, lo : lo + size]


class ACDiscriminator(nn.Module):
    """conv stack -> critic score and class logits. No batch statistics (WGAN-GP's penalty is per sample).

    small: 3 convolutions, no normalisation. dim: DiM's 8 convolutions of width w (strides 1, 2, 1,
    2, 1, 1, 1, 2), each followed by a per-sample layer norm (GroupNorm with one group) and LeakyReLU,
    then a global max pool.
    """

    def __init__(self, shape: GeneratorShape) -> None:
        super().__init__()
        w = shape.width
        if shape.arch == "dim":
            layers: list[nn.Module] = []
            for i, stride in enumerate((1, 2, 1, 2, 1, 1, 1, 2)):
                layers += [
                    nn.Conv2d(shape.channels if i == 0 else w, w, 3, stride=stride, padding=1),
                    nn.GroupNorm(1, w),
                    nn.LeakyReLU(0.01, inplace=True),
                ]
            self.trunk = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        else:
            self.trunk = nn.Sequential(
                nn.Conv2d(shape.channels, w, 3, padding=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Flatten(),
            )
        with torch.no_grad():
            dim = self.trunk(torch.zeros(1, shape.channels, shape.image_size, shape.image_size)).shape[1]
        self.critic = nn.Linear(dim, 1)
        self.classes = nn.Linear(dim, shape.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.critic(h).squeeze(1), self.classes(h)


def gradient_penalty(
    disc: ACDiscriminator, real: torch.Tensor, fake: torch.Tensor, rng: torch.Generator
) -> torch.Tensor:
    """WGAN-GP: E[(||grad_x D(x_hat)|| - 1)^2] at random interpolates of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=rng).to(real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    critic, _ = disc(mixed)
    (grad,) = torch.autograd.grad(critic.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


# ------------------------------------------------------------------ normalised <-> [-1, 1]
def _stats(info: DatasetInfo, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(info.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return mean, std


def to_unit(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Dataset-normalised images -> [-1, 1] (clamped: the GAN's range)."""
    mean, std = _stats(info, images)
    return ((images * std + mean) * 2 - 1).clamp(-1, 1)


def from_unit(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """[-1, 1] -> the dataset's normalised space (differentiable)."""
    mean, std = _stats(info, images)
    return ((images + 1) / 2 - mean) / std


# ------------------------------------------------------------------ sampling
NOISE_BLOCK = 64


def class_noise(n: int, noise_dim: int, seed: int, label: int) -> torch.Tensor:
    """Noise of ``n`` samples of one class, drawn in fixed blocks so any prefix is stable."""
    blocks = [
        torch.randn(NOISE_BLOCK, noise_dim, generator=make_generator(derive_seed(seed, "generate", label, b)))
        for b in range(math.ceil(n / NOISE_BLOCK))
    ]
    return torch.cat(blocks)[:n] if blocks else torch.zeros(0, noise_dim)


@torch.no_grad()
def sample(
    generator: ConditionalGenerator,
    counts: dict[int, int],
    seed: int,
    info: DatasetInfo,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``counts[c]`` images of each class in the normalised space, CPU tensors, classes in order.

    Class c's noise comes from its own seed, so its k-th image is the same for any count >= k.
    """
    generator = generator.to(device).eval()
    images, labels = [], []
    for c, n in sorted(counts.items()):
        z = class_noise(n, generator.shape.noise_dim, seed, c)
        for start in range(0, n, batch_size):
            zb = z[start : start + batch_size].to(device)
            yb = torch.full((zb.shape[0],), c, dtype=torch.long, device=device)
            images.append(from_unit(generator(zb, yb), info).cpu())
        labels.append(torch.full((n,), c, dtype=torch.long))
    return torch.cat(images).float(), torch.cat(labels)


@torch.no_grad()
def sample_random_labels(
    generator: ConditionalGenerator, n: int, seed: int, info: DatasetInfo, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images with uniformly random labels (DiM's evaluation batches), normalised, on CPU."""
    g = make_generator(seed)
    labels = torch.randint(generator.shape.num_classes, (n,), generator=g)
    z = torch.randn(n, generator.shape.noise_dim, generator=g)
    generator = generator.to(device).eval()
    return from_unit(generator(z.to(device), labels.to(device)), info).cpu().float(), labels


@dataclass
class GeneratorSampler:
    """A picklable ``key -> (images, labels)``: a fresh set per key (DiM's protocol draws one per epoch).

    ``random_labels`` 0: ``counts`` per class; n > 0: n images with uniformly random labels, as DiM.
    """

    shape: GeneratorShape
    state: dict
    info: DatasetInfo
    counts: dict[int, int]
    seed: int
    random_labels: int = 0

    @classmethod
    def for_dim_protocol(
        cls, generator: ConditionalGenerator, info: DatasetInfo, counts: dict[int, int], seed: int
    ) -> GeneratorSampler:
        """DiM's epoch: ``sum(counts) // 64 + 1`` batches of 64 random-label samples per key."""
        from common.evaluation import DIM_PROTOCOL, dim_images_per_epoch

        per_epoch = dim_images_per_epoch(sum(counts.values()), DIM_PROTOCOL.batch_size)
        return cls(generator.shape, generator.cpu().state_dict(), info, counts, seed, per_epoch)

    def __call__(self, key: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "_net"):
            self._net = ConditionalGenerator(self.shape)
            self._net.load_state_dict(self.state)
        seed = derive_seed(self.seed, "resample", key)
        if self.random_labels:
            return sample_random_labels(self._net, self.random_labels, seed, self.info, device)
        return sample(self._net, self.counts, seed, self.info, device)


# ------------------------------------------------------------------ artifact
def save_generator(
    path: str | Path,
    generator: ConditionalGenerator,
    info: DatasetInfo,
    meta: dict,
    pictures: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    overwrite: bool = False,
    figures: dict[str, Callable[[Path], None]] | None = None,
) -> str:
    """Write the generator directory atomically (weights, manifest, sample grids, ``figures[name](path)``)."""
    from safetensors.torch import save_file

    from common.visualize import save_grid

    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    digest = tensor_sha256(state)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE))
        for name, (images, labels) in (pictures or {}).items():
            save_grid(images, labels, info, tmp / name)
        for name, draw in (figures or {}).items():
            draw(tmp / name)
        manifest = {
            "format": GENERATOR_FORMAT,
            "format_version": GENERATOR_VERSION,
            "shape": asdict(generator.shape),
            "dataset": info.to_dict(),
            "sha256": digest,
            **meta,
        }
        atomic_write_json(tmp / META_FILE, manifest)

    atomic_write_dir(Path(path), fill, overwrite=overwrite)
    return digest


def find_generator_dir(path: str | Path) -> Path:
    """A generator directory, or a distilled-set artifact of the generator method holding one."""
    path = Path(path)
    for candidate in (path, path / "generator"):
        if (candidate / META_FILE).is_file():
            return candidate
    raise ArtifactError(
        f"{path} holds no generator ({META_FILE}); pass the --out directory of "
        "'edgedistill distill --method generator' or its generator/ folder"
    )


def load_generator(path: str | Path) -> tuple[ConditionalGenerator, DatasetInfo, dict]:
    """Rebuild and verify a saved generator; returns ``(generator, info, manifest)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = find_generator_dir(path)
    try:
        meta = json.loads((where / META_FILE).read_text())
        if meta.get("format") != GENERATOR_FORMAT:
            raise ArtifactError(f"{where / META_FILE} is not an edgedistill generator manifest")
        if int(meta.get("format_version", -1)) > GENERATOR_VERSION:
            raise ArtifactError(f"{where} was written by a newer edgedistill; upgrade")
        shape = GeneratorShape(**meta["shape"])
        info = DatasetInfo.from_dict(meta["dataset"])
        state = load_file(str(where / WEIGHTS_FILE))
    except FileNotFoundError:
        raise ArtifactError(f"{where} has no {WEIGHTS_FILE}; the generator artifact is incomplete") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise ArtifactError(f"generator at {where} is corrupt ({exc}); re-run the distillation") from None
    if tensor_sha256(state) != meta.get("sha256"):
        raise ArtifactError(f"weights in {where} do not match their recorded hash (corrupt or edited)")
    generator = ConditionalGenerator(shape)
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"weights in {where} do not fit the recorded shape ({str(exc).splitlines()[0]})") from None
    return generator.eval(), info, meta
