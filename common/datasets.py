"""Dataset registry: every dataset becomes normalised tensors plus metadata.

``load_dataset(name, data_root=...)`` is the one way in. Names are registry keys (``digits``,
``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``svhn``) or a scheme with a path
(``npz:PATH``, ``imagefolder:PATH``). Data roots resolve as: the explicit ``data_root``, else
``$EDGEDISTILL_DATA``, else the user cache dir. Files are never written into the data root:
anything torchvision must extract or download goes to the cache.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import ConfigError, DatasetNotFoundError, EdgeDistillError
from common.registry import Registry
from common.runtime import default_cache_dir

DATA_ENV = "EDGEDISTILL_DATA"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and an artifact need to know about a dataset."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "channels": self.channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict) -> DatasetInfo:
        return cls(
            name=str(data["name"]),
            channels=int(data["channels"]),
            image_size=int(data["image_size"]),
            num_classes=int(data["num_classes"]),
            class_names=tuple(str(c) for c in data["class_names"]),
            mean=tuple(float(m) for m in data["mean"]),
            std=tuple(float(s) for s in data["std"]),
        )


@dataclass
class Split:
    """Normalised images ``(N, C, H, W)`` float32 and integer labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_indices(self, num_classes: int) -> list[torch.Tensor]:
        """Indices of each class's samples, in dataset order."""
        return [torch.nonzero(self.labels == c, as_tuple=True)[0] for c in range(num_classes)]

    def subset(self, indices: torch.Tensor) -> Split:
        return Split(self.images[indices], self.labels[indices])


@dataclass
class Dataset:
    info: DatasetInfo
    train: Split
    test: Split
    source: str = ""  # where the files came from, for messages and manifests


@dataclass(frozen=True)
class DataRoots:
    """Where to look for files (``root``) and where writes may go (``cache``)."""

    root: Path
    cache: Path = field(default_factory=lambda: default_cache_dir() / "data")


def resolve_data_roots(data_root: str | Path | None = None, cache_dir: str | Path | None = None) -> DataRoots:
    """Explicit root, else ``$EDGEDISTILL_DATA``, else the cache dir itself."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "data"
    if data_root:
        root, named_by = Path(data_root).expanduser(), "--data-root"
    elif os.environ.get(DATA_ENV):
        root, named_by = Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
    else:
        return DataRoots(root=cache, cache=cache)
    if not root.is_dir():  # never fall back to another copy of the data silently
        raise ConfigError(
            f"{named_by} {root}: no such directory; point it at the folder holding MNIST/, FashionMNIST/ or "
            f"cifar10/ (e.g. ../shared/data), or leave it out to use {cache}"
        )
    return DataRoots(root=root, cache=cache)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    load: Callable[[DataRoots, bool], Dataset]
    locate: Callable[[DataRoots], str | None]  # where the files are, or None if not local


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(name: str, description: str, locate: Callable[[DataRoots], str | None]):
    """Decorator registering ``load(roots, download) -> Dataset`` under ``name``."""

    def decorator(load: Callable[[DataRoots, bool], Dataset]):
        DATASETS.register(name)(DatasetSpec(name, description, load, locate))
        return load

    return decorator


def list_datasets() -> list[str]:
    return DATASETS.names() + ["npz:PATH", "imagefolder:PATH"]


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Load a dataset by registry name or ``npz:PATH`` / ``imagefolder:PATH``."""
    roots = resolve_data_roots(data_root, cache_dir)
    scheme, _, path = name.partition(":")
    if path:
        if scheme == "npz":
            return load_npz(Path(path).expanduser())
        if scheme == "imagefolder":
            return load_imagefolder(Path(path).expanduser(), image_size=image_size or 32)
        raise EdgeDistillError(f"unknown dataset scheme {scheme!r} in {name!r}; use npz:PATH or imagefolder:PATH")
    return DATASETS.get(name).load(roots, download)


def dataset_availability(data_root: str | Path | None = None) -> list[tuple[str, str | None, str]]:
    """``(name, where-or-None, description)`` for every registered dataset."""
    roots = resolve_data_roots(data_root)
    return [(n, DATASETS.get(n).locate(roots), DATASETS.get(n).description) for n in DATASETS.names()]


# --------------------------------------------------------------------------------------------
# Shared helpers


def _normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images - m) / s


def _uint8_nhwc_to_float(x: np.ndarray) -> torch.Tensor:
    """uint8 ``(N,H,W)`` or ``(N,H,W,C)`` to float ``(N,C,H,W)`` in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    if t.ndim != 4:
        raise EdgeDistillError(f"expected images of shape (N,H,W) or (N,H,W,C), got {tuple(x.shape)}")
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def _stats(images01: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = images01.mean(dim=(0, 2, 3))
    std = images01.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    return np.sort(train_idx), np.sort(test_idx)


def _build(
    name: str,
    train01: torch.Tensor,
    train_labels,
    test01: torch.Tensor,
    test_labels,
    class_names,
    source: str,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Dataset:
    if mean is None or std is None:
        mean, std = _stats(train01)
    ytr = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    yte = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64)
    num_classes = len(class_names)
    for split_name, y in (("train", ytr), ("test", yte)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise EdgeDistillError(f"{name}: {split_name} labels fall outside 0..{num_classes - 1}")
    if train01.shape[-1] != train01.shape[-2]:
        raise EdgeDistillError(f"{name}: images must be square, got {tuple(train01.shape[-2:])}")
    info = DatasetInfo(
        name=name,
        channels=int(train01.shape[1]),
        image_size=int(train01.shape[-1]),
        num_classes=num_classes,
        class_names=tuple(str(c) for c in class_names),
        mean=tuple(mean),
        std=tuple(std),
    )
    return Dataset(
        info,
        Split(_normalise(train01, info.mean, info.std).contiguous(), ytr),
        Split(_normalise(test01, info.mean, info.std).contiguous(), yte),
        source=source,
    )


# --------------------------------------------------------------------------------------------
# digits: the embedded default (scikit-learn ships it, so it always works)


@register_dataset("digits", "scikit-learn's bundled 8x8 digits (1,797 images, no files needed)", lambda r: "bundled")
def load_digits(roots: DataRoots, download: bool) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(labels, test_fraction=0.2, seed=0)
    return _build(
        "digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        [str(i) for i in range(10)],
        source="sklearn.datasets.load_digits",
    )


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST: torchvision, fed from a read-only root via the cache


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_locator(folder: str) -> Callable[[DataRoots], str | None]:
    def locate(roots: DataRoots) -> str | None:
        for base in (roots.root, roots.cache):
            raw = base / folder / "raw"
            if all((raw / f).exists() or (raw / f"{f}.gz").exists() for f in _IDX_FILES):
                return str(raw)
        return None

    return locate


def _stage_raw_files(roots: DataRoots, folder: str) -> None:
    """Copy ``ROOT/<folder>/raw/*`` into the cache so torchvision extracts there, not in ROOT."""
    src, dst = roots.root / folder / "raw", roots.cache / folder / "raw"
    if src.resolve() == dst.resolve() or not src.is_dir():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dst / item.name
        if item.is_file() and (not target.exists() or target.stat().st_size != item.stat().st_size):
            tmp = target.with_suffix(target.suffix + ".part")
            shutil.copyfile(item, tmp)
            os.replace(tmp, target)


def _torchvision_idx_dataset(name: str, folder: str, cls_name: str, mean, std):
    def load(roots: DataRoots, download: bool) -> Dataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        if _idx_locator(folder)(roots) is None and not download:
            raise DatasetNotFoundError(
                f"{name} not found in {roots.root / folder / 'raw'} or {roots.cache / folder / 'raw'}; "
                f"put the four idx .gz files there, pass --data-root DIR, or add --download"
            )
        _stage_raw_files(roots, folder)
        try:
            train = cls(str(roots.cache), train=True, download=True)
            test = cls(str(roots.cache), train=False, download=True)
        except (RuntimeError, OSError) as exc:
            raise DatasetNotFoundError(
                f"{name}: could not load or download into {roots.cache} ({exc}); "
                f"provide the idx .gz files under --data-root DIR/{folder}/raw"
            ) from None
        train01 = train.data.unsqueeze(1).float().div_(255.0)
        test01 = test.data.unsqueeze(1).float().div_(255.0)
        return _build(
            name,
            train01,
            train.targets,
            test01,
            test.targets,
            train.classes,
            source=str(roots.cache / folder),
            mean=mean,
            std=std,
        )

    return load


register_dataset("mnist", "MNIST 28x28 (torchvision idx files)", _idx_locator("MNIST"))(
    _torchvision_idx_dataset("mnist", "MNIST", "MNIST", (0.1307,), (0.3081,))
)
register_dataset("fashion-mnist", "Fashion-MNIST 28x28 (torchvision idx files)", _idx_locator("FashionMNIST"))(
    _torchvision_idx_dataset("fashion-mnist", "FashionMNIST", "FashionMNIST", (0.2860,), (0.3530,))
)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 / SVHN: torchvision files, or (CIFAR-10) the .npz copy


_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _first_existing(roots: DataRoots, *relative: str) -> Path | None:
    for base in (roots.root, roots.cache):
        for rel in relative:
            if (base / rel).exists():
                return base / rel
    return None


def _locate_cifar10(roots: DataRoots) -> str | None:
    found = _first_existing(roots, "cifar-10-batches-py", "cifar10/cifar10.npz")
    return str(found) if found else None


@register_dataset("cifar10", "CIFAR-10 32x32 (torchvision files, or cifar10/cifar10.npz)", _locate_cifar10)
def load_cifar10(roots: DataRoots, download: bool) -> Dataset:
    if _first_existing(roots, "cifar-10-batches-py") is None:
        npz = _first_existing(roots, "cifar10/cifar10.npz")
        if npz is not None:
            return load_npz(npz, name="cifar10", mean=_CIFAR10_MEAN, std=_CIFAR10_STD)
    return _torchvision_rgb("cifar10", "CIFAR10", "cifar-10-batches-py", roots, download, _CIFAR10_MEAN, _CIFAR10_STD)


@register_dataset(
    "cifar100",
    "CIFAR-100 32x32 (torchvision files)",
    lambda r: str(p) if (p := _first_existing(r, "cifar-100-python")) else None,
)
def load_cifar100(roots: DataRoots, download: bool) -> Dataset:
    return _torchvision_rgb(
        "cifar100", "CIFAR100", "cifar-100-python", roots, download, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)
    )


@register_dataset(
    "svhn",
    "SVHN 32x32 (torchvision .mat files)",
    lambda r: str(p) if (p := _first_existing(r, "train_32x32.mat", "svhn/train_32x32.mat")) else None,
)
def load_svhn(roots: DataRoots, download: bool) -> Dataset:
    return _torchvision_rgb(
        "svhn", "SVHN", "train_32x32.mat", roots, download, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
    )


def _torchvision_rgb(name, cls_name, marker, roots: DataRoots, download: bool, mean, std) -> Dataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    found = _first_existing(roots, marker, f"svhn/{marker}")
    if found is None and not download:
        raise DatasetNotFoundError(
            f"{name} not found under {roots.root} or {roots.cache}; put torchvision's files there "
            f"({marker}), pass --data-root DIR, or add --download"
        )
    base = str(found.parent) if found is not None else str(roots.cache)
    try:
        if cls_name == "SVHN":
            train, test = cls(base, split="train", download=download), cls(base, split="test", download=download)
            xtr, ytr = train.data.transpose(0, 2, 3, 1), train.labels
            xte, yte = test.data.transpose(0, 2, 3, 1), test.labels
            classes = [str(i) for i in range(10)]
        else:
            train, test = cls(base, train=True, download=download), cls(base, train=False, download=download)
            xtr, ytr, xte, yte, classes = train.data, train.targets, test.data, test.targets, train.classes
    except (RuntimeError, OSError) as exc:
        raise DatasetNotFoundError(f"{name}: could not load from {base} ({exc}); pass --data-root DIR") from None
    return _build(
        name, _uint8_nhwc_to_float(xtr), ytr, _uint8_nhwc_to_float(xte), yte, classes, source=base, mean=mean, std=std
    )


# --------------------------------------------------------------------------------------------
# npz:PATH — x_train, y_train, x_test, y_test (uint8 NHWC or NHW), optional class_names


def load_npz(path: Path, name: str | None = None, mean=None, std=None) -> Dataset:
    """Load the ``.npz`` layout of ``shared/data/README.md``; the test split is required."""
    if not path.is_file():
        raise DatasetNotFoundError(f"npz dataset {path} does not exist; check the path after 'npz:'")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise EdgeDistillError(
                    f"{path} lacks {', '.join(missing)}; an npz dataset needs "
                    "x_train, y_train, x_test, y_test (class_names optional)"
                )
            xtr, ytr, xte, yte = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
            names = [str(c) for c in z["class_names"]] if "class_names" in z.files else None
    except (OSError, ValueError) as exc:
        raise EdgeDistillError(f"{path} is not a readable .npz file ({exc})") from None
    if xtr.dtype != np.uint8 or xte.dtype != np.uint8:
        raise EdgeDistillError(f"{path}: x_train/x_test must be uint8 images, got {xtr.dtype}/{xte.dtype}")
    num_classes = int(max(ytr.max(), yte.max())) + 1
    names = names or [str(i) for i in range(num_classes)]
    return _build(
        name or path.stem,
        _uint8_nhwc_to_float(xtr),
        ytr.astype(np.int64),
        _uint8_nhwc_to_float(xte),
        yte.astype(np.int64),
        names,
        source=str(path),
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------
# imagefolder:PATH — PATH/{train,val|test}/<class>/*.png|jpg, e.g. Imagenette


def load_imagefolder(path: Path, image_size: int = 32) -> Dataset:
    """Class sub-folders under ``train/`` and ``val/`` (or ``test/``); without those, a fixed 80/20 split."""
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    if not path.is_dir():
        raise DatasetNotFoundError(f"image folder {path} does not exist; check the path after 'imagefolder:'")
    tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()])
    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)

    def read(folder: Path):
        try:
            ds = tvd.ImageFolder(str(folder), transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DatasetNotFoundError(f"{folder}: {exc}; expected one sub-folder of images per class") from None
        if len(ds) == 0:
            raise DatasetNotFoundError(f"{folder} holds no images; expected one sub-folder of images per class")
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        return images, np.asarray(ds.targets, dtype=np.int64), ds.classes

    if (path / "train").is_dir() and test_dir is not None:
        xtr, ytr, classes = read(path / "train")
        xte, yte, test_classes = read(test_dir)
        if test_classes != classes:
            raise EdgeDistillError(f"{path}: train/ and {test_dir.name}/ have different class folders")
    else:
        images, labels, classes = read(path)
        tr, te = _stratified_split(labels, test_fraction=0.2, seed=0)
        xtr, ytr, xte, yte = images[tr], labels[tr], images[te], labels[te]
    return _build(f"imagefolder:{path.name}", xtr, ytr, xte, yte, classes, source=str(path))


def denormalise(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Back to [0, 1] pixel space (for image grids)."""
    m = torch.tensor(info.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(info.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)
