"""Plain local training and testing loops (no Flower): what an edge device runs.

The optimiser uses *coupled* L2 weight decay (``weight_decay=`` on SGD or Adam, never AdamW):
the DKKT loss on the server assumes the stationarity condition that coupled decay gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import ConfigError


@dataclass(frozen=True)
class LocalTrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adam (coupled weight decay either way)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    proximal_mu: float = 0.0  # FedProx term mu/2 ||w - w_global||^2 (0: plain FedAvg)


def make_optimizer(params, config: LocalTrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigError(f"unknown optimizer {config.optimizer!r}; use sgd or adam (AdamW would break DKKT)")


def train_local(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: LocalTrainConfig,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Train in place; returns mean loss and accuracy over the last epoch."""
    model.to(device).train()
    optimizer = make_optimizer(model.parameters(), config)
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu > 0 else None
    n = len(labels)
    loss_sum, correct = 0.0, 0
    for _ in range(config.epochs):
        loss_sum, correct = 0.0, 0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            objective = loss
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                objective = loss + 0.5 * config.proximal_mu * prox
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
    return {"train-loss": loss_sum / max(1, n), "train-accuracy": correct / max(1, n)}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device="cpu", batch=1000):
    """(mean cross-entropy, accuracy) on a labelled tensor set."""
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch):
        x, y = images[start : start + batch].to(device), labels[start : start + batch].to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = max(1, len(labels))
    return loss_sum / n, correct / n


def train_central_model(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: LocalTrainConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Train a model on data the server may use (a reference or teacher model for DKKT)."""
    from common.runtime import make_generator

    return train_local(model, images, labels, config, make_generator(seed), device)
