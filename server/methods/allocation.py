"""Class-adaptive images per class (Kang et al., IPIU 2024): split a budget by class diversity.

A fixed budget B = ipc x C is split unevenly: a class whose embeddings form more clusters gets
more synthetic images. Per class, K-means runs for k = 1..k_max on the class's embeddings
(penultimate features of a given model) and a criterion picks k:

- ``silhouette`` (default): the k in 2..k_max with the highest mean silhouette; k = 1 when that
  best silhouette is below ``min_silhouette`` (0 by default, i.e. never).
- ``elbow``: the knee of the inertia curve k = 1..k_max (the point farthest below the chord from
  its first to its last point, both axes scaled to [0, 1]).

The chosen k is the class's diversity; counts are proportional to it, at least ``min_per_class``
and at most the images the class has (``caps``), integers that sum exactly to B (largest
remainder, ties to the lower class index), so the same inputs always give the same counts.

The curves come from :mod:`common.diversity`, either computed here on the server's own data
(:func:`allocate_task`) or merged from the edge devices' statistics (:func:`allocate_from_statistics`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.diversity import DEFAULT_K_MAX, ClassStatistics, embed, fit_kmeans, statistics_per_class
from common.errors import ConfigError
from server.methods.registry import DistillTask

ALLOCATIONS = ("fixed", "adaptive")
CRITERIA = ("silhouette", "elbow")


@dataclass(frozen=True)
class AllocationConfig:
    """How to turn class diversity into per-class counts."""

    criterion: str = "silhouette"  # silhouette | elbow
    k_max: int = DEFAULT_K_MAX
    min_per_class: int = 1
    min_silhouette: float = 0.0  # silhouette criterion: below this best score a class counts as one cluster
    model: str = ""  # directory of a trained model to embed with ("": train one on the visible data)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"allocation criterion {self.criterion!r}: use one of {', '.join(CRITERIA)}")
        if self.k_max < 2:
            raise ConfigError(f"allocation k-max {self.k_max}: use at least 2")
        if self.min_per_class < 1:
            raise ConfigError("allocation min-per-class must be at least 1")


@dataclass
class Allocation:
    """Per-class counts and the diagnostics that explain them (goes into manifests as a dict)."""

    counts: dict[int, int]
    chosen_k: list[int]
    criterion: str
    source: str  # "central" (the server's data) or "federated" (merged device statistics)
    statistics: list[ClassStatistics]
    embedding_model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocation": "adaptive",
            "source": self.source,
            "criterion": self.criterion,
            "counts": {str(c): n for c, n in self.counts.items()},
            "chosen_k": self.chosen_k,
            "images_per_class_measured": [s.n for s in self.statistics],
            "inertia": [list(s.inertia) for s in self.statistics],
            "silhouette": [list(s.silhouette) for s in self.statistics],
            "embedding_model": self.embedding_model,
            **self.extra,
        }


def choose_k(stats: ClassStatistics, criterion: str = "silhouette", min_silhouette: float = 0.0) -> int:
    """The number of clusters a class shows, by ``criterion`` (see the module docstring)."""
    if stats.n == 0:
        return 1
    if criterion == "silhouette":
        best = int(np.argmax(stats.silhouette))  # first maximum: ties go to the smaller k
        return 1 if stats.silhouette[best] < min_silhouette else best + 2
    if criterion == "elbow":
        curve = np.asarray(stats.inertia, dtype=np.float64)
        span = curve[0] - curve[-1]
        if span <= 0:
            return 1
        x = np.linspace(0.0, 1.0, len(curve))
        y = (curve - curve[-1]) / span
        return int(np.argmax((1.0 - x) - y)) + 1
    raise ConfigError(f"allocation criterion {criterion!r}: use one of {', '.join(CRITERIA)}")


def proportional_counts(
    weights: Sequence[float], budget: int, min_per_class: int = 1, caps: Sequence[int] | None = None
) -> dict[int, int]:
    """Integers proportional to ``weights`` that sum to ``budget``, each in [min_per_class, cap].

    Real shares are ``clip(t * weight, min_per_class, cap)`` with the scale t found by bisection so
    that they sum to ``budget``; integers are their floors plus one unit for each of the largest
    remainders (ties to the lower class index) until the budget is met.
    """
    n = len(weights)
    caps = list(caps) if caps is not None else [budget] * n
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ConfigError("class weights must be finite and >= 0")
    if any(cap < min_per_class for cap in caps):
        raise ConfigError(
            f"a class has fewer images ({min(caps)}) than the minimum per class ({min_per_class}); lower the minimum"
        )
    if not min_per_class * n <= budget <= sum(caps):
        raise ConfigError(
            f"budget {budget} cannot be split over {n} classes with {min_per_class}..{caps} images each; "
            "change --ipc, the minimum per class, or --pipc"
        )
    top = max(weights)
    # a zero weight still takes budget once every other class is full (never below the minimum)
    weights = [w if w > 0 else 1e-9 * (top or 1.0) for w in weights]

    def shares(scale: float) -> list[float]:
        return [min(float(caps[c]), max(float(min_per_class), scale * weights[c])) for c in range(n)]

    low, high = 0.0, 1.0
    while sum(shares(high)) < budget:
        high *= 2.0
    for _ in range(200):  # the clipped total grows monotonically with the scale: bisect it
        mid = (low + high) / 2
        low, high = (mid, high) if sum(shares(mid)) < budget else (low, mid)
    share = shares(high)
    counts = [min(caps[c], max(min_per_class, math.floor(share[c] + 1e-9))) for c in range(n)]
    while sum(counts) > budget:  # rounding of shares summing a hair above the budget
        counts[max((c for c in range(n) if counts[c] > min_per_class), key=lambda c: counts[c] - share[c])] -= 1
    order = [c for c in sorted(range(n), key=lambda c: (-(share[c] - counts[c]), c)) if counts[c] < caps[c]]
    for c in order[: budget - sum(counts)]:  # leftover units to the largest remainders with room
        counts[c] += 1
    return dict(enumerate(counts))


def allocate_from_statistics(
    statistics: Sequence[ClassStatistics],
    budget: int,
    config: AllocationConfig,
    caps: Sequence[int] | None = None,
    source: str = "central",
) -> Allocation:
    """Counts from per-class K-means curves (the server's own, or the devices' merged ones)."""
    chosen = [choose_k(s, config.criterion, config.min_silhouette) for s in statistics]
    counts = proportional_counts([float(k) for k in chosen], budget, config.min_per_class, caps)
    return Allocation(counts, chosen, config.criterion, source, list(statistics))


def load_embedding_model(task: DistillTask, config: AllocationConfig) -> tuple[torch.nn.Module, str]:
    """The model whose penultimate features are embedded: ``config.model`` or one trained on the visible data."""
    if config.model:
        from server.methods.dkkt import load_global_model

        model, meta = load_global_model(config.model, task.info, task.device)
        return model, f"{config.model} (sha256 {str(meta.get('sha256', ''))[:12]})"
    from server.methods.coreset import FeatureSelectionConfig, train_feature_network

    settings = FeatureSelectionConfig()
    model = train_feature_network(task, settings)
    return model, f"{settings.feature_model} trained {settings.feature_steps} steps on {len(task.real)} visible images"


def class_embeddings(task: DistillTask, config: AllocationConfig) -> tuple[np.ndarray, str]:
    model, description = load_embedding_model(task, config)
    return embed(model, task.real.images), description


def allocate_task(task: DistillTask, config: AllocationConfig) -> tuple[DistillTask, Allocation]:
    """The task with class-adaptive counts (same total), computed on the images the task may see."""
    features, description = class_embeddings(task, config)
    allocation = allocation_of_features(task, features, config, description)
    return with_allocation(task, allocation), allocation


def allocation_of_features(
    task: DistillTask, features: np.ndarray, config: AllocationConfig, embedding_model: str = ""
) -> Allocation:
    """The allocation of ``task``'s budget from embeddings of its visible images (row i: ``task.real[i]``)."""
    stats = statistics_per_class(features, task.real.labels, task.info.num_classes, config.k_max, config.seed)
    allocation = allocation_for_task(task, stats, config)
    allocation.embedding_model = embedding_model
    return allocation


def allocation_for_task(
    task: DistillTask, statistics: Sequence[ClassStatistics], config: AllocationConfig, source: str = "central"
) -> Allocation:
    """Split ``task``'s total budget by ``statistics``; a class never gets more than the images it has."""
    caps = [len(task.real_of_class(c)) for c in range(task.info.num_classes)]
    return allocate_from_statistics(statistics, sum(task.counts.values()), config, caps, source)


def with_allocation(task: DistillTask, allocation: Allocation) -> DistillTask:
    """The task with ``allocation``'s counts, recorded so that :func:`distill` writes it to the manifest."""
    if sum(allocation.counts.values()) != sum(task.counts.values()):
        raise ConfigError("an allocation must keep the task's total budget")
    return dataclasses.replace(task, counts=dict(allocation.counts), allocation=allocation.to_dict())


def cluster_labels(features: np.ndarray, labels: np.ndarray, chosen_k: Sequence[int], seed: int) -> np.ndarray:
    """Per image, its K-means cluster within its class at the class's chosen k (for the picture)."""
    clusters = np.zeros(len(labels), dtype=np.int64)
    for c, k in enumerate(chosen_k):
        members = np.nonzero(labels == c)[0]
        if k > 1 and len(members) > k:
            clusters[members] = fit_kmeans(features[members], k, seed).labels_
    return clusters


def save_embedding_picture(
    path: Path, features: np.ndarray, labels: np.ndarray, chosen_k: Sequence[int], seed: int, title: str = ""
) -> None:
    """PCA of the embeddings to 2-D: colour = class, marker = cluster within the class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from common.visualize import save_figure

    labels = np.asarray(labels)
    points = PCA(n_components=2, random_state=seed).fit_transform(features)
    clusters = cluster_labels(features, labels, chosen_k, seed)
    markers = "o^sDvP*Xh<>p"
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for c in range(len(chosen_k)):
        for j in range(max(1, chosen_k[c])):
            mask = (labels == c) & (clusters == j)
            label = f"class {c} (k={chosen_k[c]})" if j == 0 else None
            ax.scatter(
                *points[mask].T, s=9, alpha=0.7, color=colours(c % 10), marker=markers[j % len(markers)], label=label
            )
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "class embeddings (colour: class, marker: K-means cluster)")
    ax.legend(fontsize=7, markerscale=1.5, loc="best", ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def allocation_table(allocation: Allocation, class_names: Sequence[str] | None = None) -> str:
    """A markdown table: class, images measured, chosen k, best silhouette, count."""
    from common.report import markdown_table

    rows = []
    for c, count in allocation.counts.items():
        stats = allocation.statistics[c]
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        best = f"{max(stats.silhouette):.3f}" if stats.n else "-"
        rows.append([name, stats.n, allocation.chosen_k[c], best, f"{stats.inertia[0]:.4g}", count])
    return markdown_table(["class", "images", "k", "best silhouette", "variance", "count"], rows)
