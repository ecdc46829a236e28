"""Atomic writes: a crash never leaves a half-written file or artifact directory behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.errors import ArtifactError
from common.faults import fault_point


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        fault_point("atomic-write", path.name)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temp file / directory of the atomic writes here (``.NAME.XXXX.tmp|.old``)."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def remove_temporaries(directory: Path) -> list[str]:
    """Delete what atomic writes killed half-way left in ``directory``; returns the names removed."""
    directory = Path(directory)
    removed = sorted(p.name for p in directory.iterdir() if is_temporary(p.name)) if directory.exists() else []
    for name in removed:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def atomic_write_json(path: Path, payload: object) -> None:
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_dir(path: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Build a directory in a sibling temp dir with ``fill(tmp)``, then move it into place.

    An existing ``path`` is kept unless ``overwrite``; then it is replaced only after the new one
    is complete, so the old copy survives any failure in ``fill``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} already exists; pass --overwrite or choose another output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
            fault_point("dir-swap", path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
