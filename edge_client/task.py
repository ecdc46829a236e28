"""What an edge device does, without Flower: find its private data, train, evaluate.

Private data comes from ``node_config``: ``data-dir="/path"`` on a real device (an ``.npz`` file in
the layout of ``npz:PATH``, or an image folder with ``train/`` and ``val/``), or, in simulation,
``partition-id`` / ``num-partitions`` of a registry dataset (public subset carved out first).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from common.datasets import Dataset, Split, load_dataset
from common.diversity import DEFAULT_K_MAX
from common.errors import ConfigError
from common.partition import partition_indices, split_train_holdout
from common.subsets import parse_pipc
from common.training import LocalTrainConfig


@dataclass(frozen=True)
class ClientTaskConfig:
    """Sent by the server with every round (a Flower ConfigRecord)."""

    dataset: str = "digits"
    data_root: str = ""
    model: str = "convnet3"
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    pipc: str = "50"
    seed: int = 0
    holdout: float = 0.1
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    proximal_mu: float = 0.0
    diversity_stats: bool = False  # also reply with per-class K-means statistics (common/diversity.py)
    diversity_k_max: int = DEFAULT_K_MAX

    def to_record(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_record(cls, record) -> ClientTaskConfig:
        values = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key in record:
                values[f.name] = type(f.default)(record[key])
        return cls(**values)

    def local_train(self) -> LocalTrainConfig:
        return LocalTrainConfig(
            epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            proximal_mu=self.proximal_mu,
        )


@dataclass
class NodeData:
    train: Split
    holdout: Split
    dataset: Dataset  # for metadata (channels, size, classes)


@lru_cache(maxsize=4)
def _cached_dataset(name: str, data_root: str) -> Dataset:
    return load_dataset(name, data_root=data_root or None)


def node_data(node_config: dict, task: ClientTaskConfig) -> NodeData:
    """The node's private train / held-out tensors."""
    if "data-dir" in node_config:
        path = Path(str(node_config["data-dir"])).expanduser()
        spec = f"npz:{path}" if path.suffix == ".npz" else f"imagefolder:{path}"
        data = _cached_dataset(spec, "")
        return NodeData(data.train, data.test, data)
    if "partition-id" in node_config and "num-partitions" in node_config:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
        data_root = str(node_config.get("data-root", task.data_root))
        data = _cached_dataset(task.dataset, data_root)
        parts = _cached_partitions(
            task.dataset,
            data_root,
            n,
            task.partition,
            task.alpha,
            task.shards_per_client,
            task.pipc,
            task.seed,
        )
        if not 0 <= pid < n:
            raise ConfigError(f"partition-id {pid} is outside 0..{n - 1}")
        train_idx, hold_idx = split_train_holdout(parts[pid], task.holdout, task.seed)
        return NodeData(
            data.train.subset(torch.as_tensor(train_idx)), data.train.subset(torch.as_tensor(hold_idx)), data
        )
    raise ConfigError(
        "the node has no private data: pass --node-config 'data-dir=\"/path/to/data.npz\"' "
        "(or partition-id=I num-partitions=N in simulation)"
    )


@lru_cache(maxsize=8)
def _cached_partitions(dataset, data_root, n, scheme, alpha, shards, pipc, seed):
    data = _cached_dataset(dataset, data_root)
    return partition_indices(data.train.labels, data.info.num_classes, n, scheme, alpha, shards, parse_pipc(pipc), seed)
