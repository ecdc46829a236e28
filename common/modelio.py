"""Trained-model files: ``model.safetensors`` + ``model.json`` (architecture, dataset, training).

The federated server saves its global model this way; distillers (DKKT) load it back. The JSON
records what DKKT needs: the architecture, the dataset metadata and the coupled weight decay.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.datasets import DatasetInfo
from common.errors import ArtifactError
from common.fileio import atomic_write_dir, atomic_write_json
from common.models import build_model
from common.runtime import tensor_sha256

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def save_model(path: str | Path, model: torch.nn.Module, info: DatasetInfo, meta: dict, overwrite: bool = True) -> str:
    """Write a model directory atomically; returns the weights' content hash."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = tensor_sha256(state)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE))
        atomic_write_json(
            tmp / META_FILE, {"arch": getattr(model, "arch", ""), "dataset": info.to_dict(), "sha256": digest, **meta}
        )

    atomic_write_dir(Path(path), fill, overwrite=overwrite)
    return digest


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, DatasetInfo, dict]:
    """Rebuild the architecture, load and verify the weights; returns ``(model, info, meta)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        info = DatasetInfo.from_dict(meta["dataset"])
        state = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not a model directory (needs {WEIGHTS_FILE} and {META_FILE})") from None
    except (json.JSONDecodeError, KeyError, SafetensorError) as exc:
        raise ArtifactError(f"model at {path} is corrupt ({exc}); re-export it") from None
    if meta.get("sha256") and tensor_sha256(state) != meta["sha256"]:
        raise ArtifactError(f"weights in {path} do not match their recorded hash (corrupt or edited)")
    model = build_model(meta["arch"], info.channels, info.num_classes, info.image_size, **meta.get("model_options", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"weights in {path} do not fit a {meta['arch']} ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), info, meta
