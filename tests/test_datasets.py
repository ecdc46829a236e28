import subprocess
import sys

import numpy as np
import pytest
import torch

from common.datasets import dataset_availability, load_dataset
from common.errors import DatasetNotFoundError, EdgeDistillError


def test_digits_is_a_fixed_stratified_split(digits):
    again = load_dataset("digits")
    assert digits.info.channels == 1 and digits.info.image_size == 8 and digits.info.num_classes == 10
    assert len(digits.train) == 1437 and len(digits.test) == 360
    assert torch.equal(digits.train.images, again.train.images)
    counts = torch.bincount(digits.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 36 per class, +-1
    assert abs(float(digits.train.images.mean())) < 1e-4  # normalised by its own train statistics


def test_mnist_from_read_only_root_goes_through_the_cache(mnist, shared_data, data_cache):
    assert mnist.info.image_size == 28 and mnist.info.channels == 1
    assert len(mnist.train) == 60000 and len(mnist.test) == 10000
    assert torch.bincount(mnist.test.labels).tolist()[:3] == [980, 1135, 1032]
    assert abs(float(mnist.train.images.mean())) < 0.01
    assert (data_cache / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
    assert not (shared_data / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_fashion_mnist_from_shared(shared_data, data_cache):
    data = load_dataset("fashion-mnist", data_root=shared_data, cache_dir=data_cache)
    assert len(data.train) == 60000 and data.info.class_names[0].lower().startswith("t-shirt")


def test_cifar10_resolves_to_the_npz_copy(shared_data, data_cache):
    data = load_dataset("cifar10", data_root=shared_data, cache_dir=data_cache)
    assert data.info.channels == 3 and data.info.image_size == 32 and data.info.num_classes == 10
    assert data.train.images.shape == (50000, 3, 32, 32) and len(data.test) == 10000
    assert data.info.class_names[0] == "airplane"
    assert data.train.images.mean(dim=(0, 2, 3)).abs().max() < 0.01
    assert "cifar10.npz" in data.source


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8),
        y_train=np.arange(40) % 4,
        x_test=rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
        y_test=np.arange(8) % 4,
        class_names=np.array(["a", "b", "c", "d"]),
    )
    data = load_dataset(f"npz:{path}")
    assert data.info.num_classes == 4 and data.info.image_size == 16 and data.info.class_names == ("a", "b", "c", "d")
    assert data.train.images.shape == (40, 3, 16, 16)
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2))
    with pytest.raises(EdgeDistillError, match="x_test"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_imagefolder_loader(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 1)):
        for cls, colour in (("cat", 200), ("dog", 30)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (colour, i * 10, 0)).save(folder / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}", image_size=16)
    assert data.info.class_names == ("cat", "dog") and data.info.image_size == 16
    assert len(data.train) == 6 and len(data.test) == 2
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_missing_dataset_says_where_it_looked(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="--data-root") as info:
        load_dataset("mnist", data_root=tmp_path / "empty", cache_dir=tmp_path / "cache")
    assert str(tmp_path / "empty") in str(info.value)
    assert dict((n, w) for n, w, _ in dataset_availability(tmp_path))["mnist"] is None


def test_cli_reports_a_missing_dataset_in_one_line(tmp_path):
    env_root = tmp_path / "empty"
    env_root.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "common.cli",
            "distill",
            "--method",
            "random",
            "--dataset",
            "svhn",
            "--data-root",
            str(env_root),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={"XDG_CACHE_HOME": str(tmp_path / "xdg"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: svhn not found") and "Traceback" not in proc.stderr


def test_a_missing_data_root_is_an_error_not_a_silent_fallback_to_the_cache(tmp_path, monkeypatch):
    from common.datasets import resolve_data_roots
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--data-root .*nowhere: no such directory"):
        load_dataset("mnist", data_root=tmp_path / "nowhere")
    monkeypatch.setenv("EDGEDISTILL_DATA", str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match=r"\$EDGEDISTILL_DATA .*gone: no such directory"):
        resolve_data_roots()
    assert resolve_data_roots(tmp_path).root == tmp_path  # an existing root is used as given


def test_a_public_subset_larger_than_a_class_is_refused_with_the_largest_possible_value(digits):
    from common.errors import ConfigError
    from common.subsets import public_subset_indices

    smallest = int(torch.bincount(digits.train.labels).min())
    assert len(public_subset_indices(digits.train.labels, 10, smallest, seed=0)) == 10 * smallest
    with pytest.raises(ConfigError, match=rf"--pipc {smallest + 1} is more than .*use at most {smallest}, or 'all'"):
        public_subset_indices(digits.train.labels, 10, smallest + 1, seed=0)
