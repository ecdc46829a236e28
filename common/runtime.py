"""Device selection, seeding and small runtime helpers."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from common.errors import ConfigError


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda``/``cuda:N``/``cpu`` are taken as given."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from exc


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU ``torch.Generator`` seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator; random numbers drawn on CPU then moved keep runs identical across devices."""
    return torch.Generator().manual_seed(int(seed))


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (e.g. base seed, run index, class), independent of hash()."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, max RSS on CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_cache_dir() -> Path:
    """User cache dir for datasets and Flower state: ``$XDG_CACHE_HOME/edgedistill`` or ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgedistill"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, shapes, dtypes and values), for manifests."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def die_with_parent() -> None:
    """Linux (a ``preexec_fn`` or a child's first call): SIGTERM this process when the process that
    started it dies, even by SIGKILL, so no orphan keeps running a job or holding a port."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
