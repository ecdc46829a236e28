"""Distilled-set artifacts: a directory with ``tensors.safetensors`` and ``manifest.json``.

``save_distilled_set`` writes atomically; ``load_distilled_set`` validates everything it reads
(checksum, shapes, dtypes, label range, per-class counts, finiteness) and refuses a corrupt or
mismatched artifact with one clear error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common
from common.datasets import DatasetInfo
from common.errors import ArtifactError
from common.fileio import atomic_write_dir, atomic_write_json
from common.runtime import file_sha256
from common.visualize import save_grid

FORMAT = "edgedistill.distilled-set"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
GRID_FILE = "grid.png"  # a picture of the set, one row per class


@dataclass
class DistilledSet:
    """Synthetic (or selected) images in the dataset's normalised space, with labels."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    method: str
    manifest: dict = field(default_factory=dict)  # method config, seeds, pipc, metrics, ...
    attachments: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # name -> writer(path)

    def counts(self) -> dict[int, int]:
        return {c: int((self.labels == c).sum()) for c in range(self.info.num_classes)}

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def validate_tensors(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    if images.dtype != torch.float32 or images.ndim != 4:
        raise ArtifactError(f"{prefix}images must be float32 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    expected = (info.channels, info.image_size, info.image_size)
    if tuple(images.shape[1:]) != expected:
        raise ArtifactError(f"{prefix}images are {tuple(images.shape[1:])} but {info.name} needs {expected}")
    if labels.dtype != torch.int64 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ArtifactError(f"{prefix}labels must be int64 (N,) matching {images.shape[0]} images")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise ArtifactError(f"{prefix}labels fall outside 0..{info.num_classes - 1}")
    if not torch.isfinite(images).all():
        raise ArtifactError(f"{prefix}images contain NaN or Inf")


def save_distilled_set(path: str | Path, dset: DistilledSet, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    validate_tensors(dset.images, dset.labels, dset.info)
    clashes = [
        n for n in dset.attachments if n in (TENSORS_FILE, MANIFEST_FILE, GRID_FILE) or "/" in n or n[:1] in ".~"
    ]
    if clashes:
        raise ValueError(f"attachment names {clashes} clash with the artifact's own files or are not plain names")
    manifest = {
        **dset.manifest,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": dset.method,
        "dataset": dset.info.to_dict(),
        "num_images": len(dset),
        "counts": {str(c): n for c, n in dset.counts().items()},
        "code_version": common.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    def fill(tmp: Path) -> None:
        tensors = {"images": dset.images.detach().cpu().contiguous(), "labels": dset.labels.detach().cpu().contiguous()}
        save_file(tensors, str(tmp / TENSORS_FILE))
        manifest["tensors_sha256"] = file_sha256(tmp / TENSORS_FILE)
        save_grid(dset.images, dset.labels, dset.info, tmp / GRID_FILE)
        for name, write in dset.attachments.items():
            write(tmp / name)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)

    atomic_write_dir(Path(path), fill, overwrite=overwrite)
    dset.manifest = manifest
    return Path(path)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST_FILE
    if not path.is_dir():
        raise ArtifactError(f"{path} is not an artifact directory; pass the --out directory of a distill run")
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} has no {MANIFEST_FILE}; it is not a complete artifact") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file} is corrupt ({exc.msg} at line {exc.lineno}); re-run the distillation") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not an edgedistill distilled-set manifest")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise ArtifactError(f"{path} was written by a newer edgedistill (format {manifest['format_version']}); upgrade")
    return manifest


def load_distilled_set(path: str | Path, expect: DatasetInfo | None = None) -> DistilledSet:
    """Load and validate; ``expect`` also checks that the artifact belongs to that dataset."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    tensors_file = path / TENSORS_FILE
    if not tensors_file.is_file():
        raise ArtifactError(f"{path} has no {TENSORS_FILE}; it is not a complete artifact")
    if manifest.get("tensors_sha256") != file_sha256(tensors_file):
        raise ArtifactError(f"{tensors_file} does not match the checksum in its manifest (corrupt or edited)")
    try:
        info = DatasetInfo.from_dict(manifest["dataset"])
        tensors = load_file(str(tensors_file))
        images, labels = tensors["images"], tensors["labels"]
    except (KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise ArtifactError(f"{path}: manifest or tensors are malformed ({exc}); re-run the distillation") from None
    validate_tensors(images, labels, info, where=str(path))
    dset = DistilledSet(images, labels, info, str(manifest.get("method", "")), manifest)
    if {str(c): n for c, n in dset.counts().items()} != manifest.get("counts"):
        raise ArtifactError(f"{path}: per-class counts differ from the manifest")
    if expect is not None:
        mine = (info.channels, info.image_size, info.num_classes)
        theirs = (expect.channels, expect.image_size, expect.num_classes)
        if mine != theirs:
            raise ArtifactError(
                f"{path} holds {info.name} images {mine} (channels, size, classes) but {expect.name} needs {theirs}"
            )
    return dset


def update_manifest(path: str | Path, **entries) -> dict:
    """Merge ``entries`` into an artifact's manifest (atomically); used to record metrics."""
    manifest = read_manifest(path)
    for key, value in entries.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    atomic_write_json(Path(path) / MANIFEST_FILE, manifest)
    return manifest
