import json

import pytest
import torch

from common.artifacts import (
    MANIFEST_FILE,
    TENSORS_FILE,
    DistilledSet,
    load_distilled_set,
    save_distilled_set,
    update_manifest,
)
from common.datasets import DatasetInfo
from common.errors import ArtifactError

INFO = DatasetInfo("toy", 1, 8, 3, ("a", "b", "c"), (0.5,), (0.25,))


def make_set(n_per_class=(2, 1, 3)) -> DistilledSet:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(n_per_class)])
    images = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return DistilledSet(images, labels, INFO, "random", {"seed": 7, "pipc": 5})


def test_round_trip_keeps_tensors_manifest_and_ragged_counts(tmp_path):
    original = make_set()
    save_distilled_set(tmp_path / "a", original)
    loaded = load_distilled_set(tmp_path / "a", expect=INFO)
    assert torch.equal(loaded.images, original.images) and torch.equal(loaded.labels, original.labels)
    assert loaded.counts() == {0: 2, 1: 1, 2: 3}
    assert loaded.manifest["seed"] == 7 and loaded.manifest["pipc"] == 5 and loaded.method == "random"
    assert loaded.info == INFO
    update_manifest(tmp_path / "a", evaluation={"convnet3": {"mean": 0.5}})
    assert load_distilled_set(tmp_path / "a").manifest["evaluation"]["convnet3"]["mean"] == 0.5


def test_corrupt_tensors_are_refused(tmp_path):
    save_distilled_set(tmp_path / "a", make_set())
    blob = bytearray((tmp_path / "a" / TENSORS_FILE).read_bytes())
    blob[-5] ^= 0xFF
    (tmp_path / "a" / TENSORS_FILE).write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="checksum"):
        load_distilled_set(tmp_path / "a")


def test_corrupt_or_missing_manifest_is_refused(tmp_path):
    save_distilled_set(tmp_path / "a", make_set())
    (tmp_path / "a" / MANIFEST_FILE).write_text('{"format": "edgedistill.distilled-set", ')
    with pytest.raises(ArtifactError, match="corrupt"):
        load_distilled_set(tmp_path / "a")
    (tmp_path / "a" / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_distilled_set(tmp_path / "a")
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load_distilled_set(tmp_path / "missing")


def test_edited_counts_and_mismatched_dataset_are_refused(tmp_path):
    save_distilled_set(tmp_path / "a", make_set())
    manifest = json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())
    manifest["counts"]["0"] = 5
    (tmp_path / "a" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="counts"):
        load_distilled_set(tmp_path / "a")
    save_distilled_set(tmp_path / "b", make_set())
    other = DatasetInfo("rgb", 3, 32, 10, tuple("abcdefghij"), (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ArtifactError, match="needs"):
        load_distilled_set(tmp_path / "b", expect=other)


def test_invalid_sets_are_never_written():
    bad = make_set()
    bad.labels[0] = 7
    with pytest.raises(ArtifactError, match="labels"):
        save_distilled_set("/nonexistent/never", bad)
    nan = make_set()
    nan.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ArtifactError, match="NaN"):
        save_distilled_set("/nonexistent/never", nan)


def test_existing_artifact_survives_refused_or_failed_overwrite(tmp_path, monkeypatch):
    first = make_set()
    save_distilled_set(tmp_path / "a", first)
    with pytest.raises(ArtifactError, match="--overwrite"):
        save_distilled_set(tmp_path / "a", make_set((1, 1, 1)))
    import common.artifacts as artifacts

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "atomic_write_json", crash)  # crash half-way through the new write
    with pytest.raises(OSError):
        save_distilled_set(tmp_path / "a", make_set((1, 1, 1)), overwrite=True)
    assert torch.equal(load_distilled_set(tmp_path / "a").labels, first.labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left behind
