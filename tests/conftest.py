"""Shared fixtures: the offline datasets in ../shared/data (read-only) and a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EDGEDISTILL_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA} (set EDGEDISTILL_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edgedistill-cache")


@pytest.fixture(scope="session")
def digits():
    from common.datasets import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def mnist(shared_data, data_cache):
    from common.datasets import load_dataset

    return load_dataset("mnist", data_root=shared_data, cache_dir=data_cache)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """A ConvNet-3 trained on digits by the ``train`` command (records its weight decay)."""
    from common.cli import main

    out = tmp_path_factory.mktemp("models") / "digits-convnet3"
    assert main(["train", "--dataset", "digits", "--epochs", "3", "--device", "cpu", "--out", str(out)]) == 0
    return out


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never read or fill the user's real cache, and ignore a user's $EDGEDISTILL_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    monkeypatch.delenv("EDGEDISTILL_DATA", raising=False)


@pytest.fixture
def server_task_identity():
    """Flower stamps new messages with the identity of the running task; tests play the server."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
