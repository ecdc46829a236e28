"""Per-class diversity statistics: K-means curves of a class's embeddings, numbers only.

The class-adaptive allocator (``server/methods/allocation.py``) decides how many synthetic images
each class gets from how many patterns its images show. The measurements live here, in the shared
library, because an edge device computes them on its private data too: it embeds its images with
the global model, runs K-means per class for k = 1..k_max and sends back only these curves and
its per-class counts (a :class:`ClassStatistics` list flattened by :func:`to_record`). The server
merges the devices' curves (:func:`merge`) with the same code it uses for its own data.

What one class's statistics hold (``n`` images, embedding dimension d):

- ``inertia[k-1]``: K-means inertia with k clusters divided by n (mean squared distance of an
  image's embedding to its centroid), k = 1..k_max, made non-increasing in k as the optimum is;
  ``inertia[0]`` is the class's total variance.
- ``silhouette[k-2]``: mean silhouette coefficient with k clusters, k = 2..k_max (in [-1, 1]).

Classes with fewer than ``min_samples`` images get ``n = 0`` and zero curves: too few images to
cluster, and a device reveals less about a class it barely holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import ConfigError

DEFAULT_K_MAX = 6
SILHOUETTE_SAMPLE = 1000  # silhouette is O(n^2): estimate it on at most this many images per class


@dataclass(frozen=True)
class ClassStatistics:
    """K-means curves of one class (see the module docstring)."""

    n: int
    inertia: tuple[float, ...]  # k = 1..k_max, per image
    silhouette: tuple[float, ...]  # k = 2..k_max

    @property
    def k_max(self) -> int:
        return len(self.inertia)


def min_samples_for(k_max: int) -> int:
    """Fewest images of a class worth clustering with up to ``k_max`` clusters."""
    return 2 * k_max + 1


def fit_kmeans(features: np.ndarray, k: int, seed: int):
    """One K-means fit (scikit-learn, k-means++ init, 3 restarts, seeded): the fitted estimator."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit(features)


def class_statistics(features: np.ndarray, k_max: int = DEFAULT_K_MAX, seed: int = 0) -> ClassStatistics:
    """K-means inertia (k = 1..k_max) and silhouette (k = 2..k_max) of one class's embeddings."""
    from sklearn.metrics import silhouette_score

    n = len(features)
    if k_max < 2:
        raise ConfigError(f"k-max {k_max}: need at least 2 so that there is a choice of k")
    if n < min_samples_for(k_max):
        return ClassStatistics(0, (0.0,) * k_max, (0.0,) * (k_max - 1))
    features = np.asarray(features, dtype=np.float64)
    inertia, silhouette = [], []
    sample = min(n, SILHOUETTE_SAMPLE)
    for k in range(1, k_max + 1):
        fitted = fit_kmeans(features, k, seed)
        # K-means is a heuristic: keep the curve the optimum obeys (more clusters never fit worse)
        inertia.append(min(float(fitted.inertia_) / n, inertia[-1] if inertia else math.inf))
        if k >= 2:
            score = silhouette_score(features, fitted.labels_, sample_size=sample, random_state=seed)
            silhouette.append(float(score))
    return ClassStatistics(n, tuple(inertia), tuple(silhouette))


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Penultimate features (``model.embed``) of ``images``, in eval mode, as float64 numpy."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = [model.embed(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    if not chunks:
        return np.zeros((0, 0))
    return torch.cat(chunks).double().numpy()


def statistics_per_class(
    features: np.ndarray, labels: Sequence[int] | torch.Tensor, num_classes: int, k_max: int, seed: int
) -> list[ClassStatistics]:
    """:func:`class_statistics` for every class of a labelled feature matrix."""
    labels = np.asarray(torch.as_tensor(labels).cpu())
    return [class_statistics(features[labels == c], k_max, seed) for c in range(num_classes)]


def merge(devices: Sequence[Sequence[ClassStatistics]]) -> list[ClassStatistics]:
    """Per class, the count-weighted mean of the devices' curves (devices with ``n = 0`` count nothing).

    Exact for a mean of per-image quantities computed against each device's own centroids; it is
    not the K-means of the union (a device fits its own centroids, so its inertia is at most what
    the union's centroids would give it). ``tests/test_allocation.py`` bounds the difference.
    """
    if not devices:
        raise ValueError("merge needs at least one device's statistics")
    num_classes, k_max = len(devices[0]), devices[0][0].k_max
    merged = []
    for c in range(num_classes):
        rows = [d[c] for d in devices if d[c].n > 0]
        total = sum(r.n for r in rows)
        if total == 0:
            merged.append(ClassStatistics(0, (0.0,) * k_max, (0.0,) * (k_max - 1)))
            continue
        inertia = tuple(sum(r.n * r.inertia[i] for r in rows) / total for i in range(k_max))
        silhouette = tuple(sum(r.n * r.silhouette[i] for r in rows) / total for i in range(k_max - 1))
        merged.append(ClassStatistics(total, inertia, silhouette))
    return merged


# ------------------------------------------------------------------ the device's reply record
# The names and shapes of the "diversity" MetricRecord a device adds to its training reply.
RECORD_NAME = "diversity"
RECORD_KEYS = ("k-max", "counts", "inertia", "silhouette")


def to_record(stats: Sequence[ClassStatistics]) -> dict[str, int | list[int] | list[float]]:
    """Flatten per-class statistics into the values of the ``diversity`` MetricRecord."""
    return {
        "k-max": stats[0].k_max,
        "counts": [s.n for s in stats],
        "inertia": [float(v) for s in stats for v in s.inertia],
        "silhouette": [float(v) for s in stats for v in s.silhouette],
    }


def from_record(record, num_classes: int, k_max: int, max_count: int) -> list[ClassStatistics]:
    """Parse and check a device's ``diversity`` record; ``ValueError`` says what is wrong.

    A record is accepted only with exactly the documented keys, the expected ``k-max``, lists of the
    expected lengths and types, counts >= 0 summing to at most ``max_count``, finite non-negative inertia that does
    not grow with k (within rounding), and silhouettes in [-1, 1].
    """
    keys = set(record.keys())
    if keys != set(RECORD_KEYS):
        raise ValueError(f"diversity record keys {sorted(keys)}, expected {list(RECORD_KEYS)}")
    if record["k-max"] != k_max or isinstance(record["k-max"], bool) or not isinstance(record["k-max"], int):
        raise ValueError(f"diversity k-max {record['k-max']!r}, expected {k_max}")
    counts, inertia, silhouette = record["counts"], record["inertia"], record["silhouette"]
    _check_list("counts", counts, num_classes, int)
    _check_list("inertia", inertia, num_classes * k_max, float)
    _check_list("silhouette", silhouette, num_classes * (k_max - 1), float)
    if any(n < 0 for n in counts) or sum(counts) > max_count:
        raise ValueError(f"diversity counts must be >= 0 and sum to at most num-examples ({max_count})")
    if any(not math.isfinite(v) or v < 0 for v in inertia):
        raise ValueError("diversity inertia must be finite and >= 0")
    if any(not math.isfinite(v) or abs(v) > 1 for v in silhouette):
        raise ValueError("diversity silhouette must lie in [-1, 1]")
    stats = []
    for c in range(num_classes):
        curve = tuple(inertia[c * k_max : (c + 1) * k_max])
        if any(later > earlier * (1 + 1e-6) + 1e-9 for earlier, later in zip(curve, curve[1:])):
            raise ValueError(f"diversity inertia of class {c} grows with k (K-means inertia cannot)")
        stats.append(ClassStatistics(int(counts[c]), curve, tuple(silhouette[c * (k_max - 1) : (c + 1) * (k_max - 1)])))
    return stats


def _check_list(name: str, values, length: int, kind: type) -> None:
    if not isinstance(values, list) or len(values) != length:
        raise ValueError(f"diversity {name} must be a list of {length} values")
    if any(isinstance(v, bool) or not isinstance(v, kind) for v in values):
        raise ValueError(f"diversity {name} must hold {kind.__name__} values")
