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
