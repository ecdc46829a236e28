"""Deterministic partitions of a training split over simulated edge clients.

The server's public subset (``pipc`` images per class, :func:`common.subsets.public_subset_indices`)
is carved out first; no client ever receives one of those images. Schemes: ``iid``,
``dirichlet`` (label skew with concentration ``alpha``) and ``shards`` (each client gets
``shards_per_client`` label-sorted shards). The same arguments give the same partition anywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from common.errors import ConfigError
from common.runtime import derive_seed
from common.subsets import public_subset_indices

SCHEMES = ("iid", "dirichlet", "shards")


def private_pool(labels: torch.Tensor, num_classes: int, pipc: int | None, seed: int) -> np.ndarray:
    """Training indices left for the edge after the server's public subset is removed."""
    everything = np.arange(len(labels))
    if pipc is None:
        return everything  # 'all': the classic setting, the server sees everything anyway
    public = public_subset_indices(labels, num_classes, pipc, seed).numpy()
    return np.setdiff1d(everything, public, assume_unique=True)


def partition_indices(
    labels: torch.Tensor,
    num_classes: int,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    pipc: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Disjoint index arrays, one per client, none of them touching the public subset."""
    if num_partitions < 1:
        raise ConfigError("num-partitions must be at least 1")
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition {scheme!r}; use one of {', '.join(SCHEMES)}")
    pool = private_pool(labels, num_classes, pipc, seed)
    if len(pool) < num_partitions:
        raise ConfigError(f"{len(pool)} private images cannot be split over {num_partitions} clients")
    rng = np.random.default_rng(derive_seed("partition", scheme, seed, num_partitions))
    y = labels.numpy()[pool]
    if scheme == "iid":
        parts = np.array_split(rng.permutation(pool), num_partitions)
    elif scheme == "dirichlet":
        parts = _dirichlet(pool, y, num_classes, num_partitions, alpha, rng)
    else:
        parts = _shards(pool, y, num_partitions, shards_per_client, rng)
    return [np.sort(p) for p in parts]


def _dirichlet(pool, y, num_classes, n, alpha, rng) -> list[np.ndarray]:
    if alpha <= 0:
        raise ConfigError("dirichlet alpha must be > 0")
    for _ in range(100):  # redraw until every client holds at least one image
        buckets: list[list[int]] = [[] for _ in range(n)]
        for c in range(num_classes):
            members = rng.permutation(pool[y == c])
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                buckets[client].extend(chunk.tolist())
        if min(len(b) for b in buckets) > 0:
            return [np.asarray(b, dtype=np.int64) for b in buckets]
    raise ConfigError(f"dirichlet alpha {alpha} leaves some of {n} clients empty; raise alpha or use fewer clients")


def _shards(pool, y, n, per_client, rng) -> list[np.ndarray]:
    if per_client < 1:
        raise ConfigError("shards-per-client must be at least 1")
    ordered = pool[np.argsort(y, kind="stable")]
    shards = np.array_split(ordered, n * per_client)
    order = rng.permutation(len(shards))
    return [np.concatenate([shards[s] for s in order[i * per_client : (i + 1) * per_client]]) for i in range(n)]


def split_train_holdout(indices: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's local train / held-out split (for the client's own evaluation)."""
    rng = np.random.default_rng(derive_seed("holdout", seed, len(indices), int(indices[:1].sum())))
    shuffled = rng.permutation(indices)
    n_hold = int(round(len(indices) * holdout)) if len(indices) > 1 else 0
    return np.sort(shuffled[n_hold:]), np.sort(shuffled[:n_hold])
