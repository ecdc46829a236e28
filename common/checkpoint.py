"""Crash-safe checkpoints for long jobs (distillation loops, the federated run).

One place for the file format and the same-job check, so the methods and the federation
cannot drift apart; what identifies a *distillation* job lives with the method registry.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import torch

from common.errors import ArtifactError
from common.fileio import atomic_write_bytes


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
