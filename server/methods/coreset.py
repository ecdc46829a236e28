"""Coreset baselines: ``random``, ``herding`` and ``kcenter`` selections of real images.

Herding and k-center work in the embedding space of a ConvNet-3 trained on exactly the data the
method may see (the public subset under ``--pipc``), as in the DC/DM papers' baselines.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.errors import ConfigError
from common.models import build_model
from common.runtime import derive_seed, make_generator
from server.methods.registry import DistillTask, MethodOutput, register_method


@dataclass(frozen=True)
class RandomConfig:
    pass


@dataclass(frozen=True)
class FeatureSelectionConfig:
    feature_model: str = "convnet3"  # architecture trained to embed the images
    feature_steps: int = 300  # SGD steps (batch 256) training the embedding network
    feature_lr: float = 0.01


def _check_budget(task: DistillTask) -> None:
    for c, n in task.counts.items():
        have = len(task.real_of_class(c))
        if n > have:
            raise ConfigError(
                f"class {c} needs {n} images but the method may see only {have}; lower --ipc or raise --pipc"
            )


def _output(task: DistillTask, picked: list[torch.Tensor]) -> MethodOutput:
    idx = torch.cat(picked)
    real_idx = task.real_indices[idx]
    return MethodOutput(
        task.real.images[idx].clone(), task.real.labels[idx].clone(), {"selected_train_indices": real_idx.tolist()}
    )


@register_method("random", RandomConfig, "random real images per class")
def select_random(task: DistillTask, config: RandomConfig) -> MethodOutput:
    _check_budget(task)
    picked = []
    for c, n in task.counts.items():
        members = task.real_of_class(c)
        order = torch.randperm(len(members), generator=make_generator(derive_seed("random", task.seed, c)))
        picked.append(members[order[:n]])
    return _output(task, picked)


# herding and k-center on the same task and seed share one feature network (benchmarks run both)
_FEATURE_NET_CACHE: dict[tuple, torch.nn.Module] = {}


def _feature_cache_key(task: DistillTask, config: FeatureSelectionConfig) -> tuple:
    digest = hashlib.sha256(task.real_indices.numpy().tobytes()).hexdigest()
    return (task.dataset_spec, task.info.name, digest, task.seed, str(task.device), config)


def train_feature_network(task: DistillTask, config: FeatureSelectionConfig) -> torch.nn.Module:
    """A ConvNet trained (no augmentation) on the data the method may see, to embed it."""
    key = _feature_cache_key(task, config)
    if key not in _FEATURE_NET_CACHE:
        _FEATURE_NET_CACHE.clear()
        _FEATURE_NET_CACHE[key] = _train_feature_network(task, config)
    return _FEATURE_NET_CACHE[key]


def _train_feature_network(task: DistillTask, config: FeatureSelectionConfig) -> torch.nn.Module:
    generator = make_generator(derive_seed("feature-net", task.seed))
    torch.manual_seed(derive_seed("feature-net-init", task.seed))
    info = task.info
    model = build_model(config.feature_model, info.channels, info.num_classes, info.image_size).to(task.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.feature_lr, momentum=0.9, weight_decay=5e-4)
    n = len(task.real)
    batch = min(256, n)
    model.train()
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for _ in tqdm(
        range(config.feature_steps), desc="feature network", disable=None if task.progress else True, leave=False
    ):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        loss = F.cross_entropy(model(task.real.images[idx].to(task.device)), task.real.labels[idx].to(task.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def embed_all(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    return torch.cat([model.embed(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


def herding_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """Running-mean herding: each pick brings the mean of the picks closest to the class mean."""
    mu = features.mean(0)
    total = torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool)
    picks = []
    for step in range(1, k + 1):
        dist = ((mu - (total + features) / step) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        picks.append(i)
        available[i] = False
        total += features[i]
    return torch.tensor(picks, dtype=torch.long)


def kcenter_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center: start at the point nearest the mean, then the farthest from all picks."""
    first = int(((features - features.mean(0)) ** 2).sum(1).argmin())
    picks = [first]
    nearest = torch.cdist(features, features[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        i = int(nearest.argmax())
        picks.append(i)
        nearest = torch.minimum(nearest, torch.cdist(features, features[i : i + 1]).squeeze(1))
    return torch.tensor(picks, dtype=torch.long)


def _select_by_features(task: DistillTask, config: FeatureSelectionConfig, order_fn) -> MethodOutput:
    _check_budget(task)
    if config.feature_steps < 1:
        raise ConfigError("feature_steps must be at least 1")
    model = train_feature_network(task, config)
    features = embed_all(model, task.real.images, task.device)
    picked = []
    for c, n in task.counts.items():
        members = task.real_of_class(c)
        picked.append(members[order_fn(features[members].double(), n)])
    return _output(task, picked)


@register_method("herding", FeatureSelectionConfig, "herding selection in a trained ConvNet's embedding")
def select_herding(task: DistillTask, config: FeatureSelectionConfig) -> MethodOutput:
    return _select_by_features(task, config, herding_order)


@register_method("kcenter", FeatureSelectionConfig, "greedy k-center selection in a trained ConvNet's embedding")
def select_kcenter(task: DistillTask, config: FeatureSelectionConfig) -> MethodOutput:
    return _select_by_features(task, config, kcenter_order)
