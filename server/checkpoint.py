"""Crash-safe checkpoints for long server jobs (distillation loops)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.errors import ArtifactError
from common.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from server.registry import DistillTask


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` with torch.save to a temp file, then rename (never half-written)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint and check that it belongs to the same job (``expect`` keys must match)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ArtifactError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start over"
        ) from None
    for key, value in expect.items():
        if state.get(key) != value:
            raise ArtifactError(
                f"checkpoint {path} was written by a different job ({key} differs); "
                "use the same settings as the interrupted run, or delete the checkpoint"
            )
    return state


def identity_options(config: Any, ignore: tuple[str, ...]) -> dict[str, Any]:
    """A method config's options that change its result (``ignore``: budgets, resume, logging)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ignore}


def job_identity(
    method: str, task: DistillTask, config: Any, ignore: tuple[str, ...], with_counts: bool = True
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the method, its options, the data, the seed
    (and the per-class counts for methods whose state depends on them)."""
    identity = {
        "method": method,
        "options": identity_options(config, ignore),
        "seed": task.seed,
        "dataset": task.dataset_spec,
        "real_indices_sum": int(task.real_indices.sum()),
        "real_count": int(len(task.real_indices)),
    }
    if with_counts:
        identity["counts"] = {int(c): int(n) for c, n in task.counts.items()}
    return identity
