"""The DKKT loss: Deep Support Vectors from a trained (global) model (Lee et al., NeurIPS 2024).

A network theta* trained with coupled weight decay satisfies, at a stationary point, the KKT
conditions of its training problem. For synthetic images x_i with labels y_i and multipliers
lambda_i >= 0:

    L_stat   = mean over the chosen parameter entries | theta* + grad_theta sum_i lambda_i CE_i |
    L_primal = (1/M) sum_i CE_i over the samples not yet classified as y_i
    L_DKKT   = a * L_kkt(A(x)) [+ L_kkt(x)] + beta_tv TV(x) + beta_norm ||x||^2,
    L_kkt    = L_stat + beta_primal * L_primal

A is the published composed augmentation (crop, translate, flip, noise in one per-image copy,
:class:`~common.augment.ComposedAugment`), a = 5; the un-augmented term L_kkt(x) is not in the
published loss and is off unless ``kkt_clean_term`` (or ``kkt_aug_weight`` 0) asks for it.

The weighted sum of per-sample gradients is one gradient of the lambda-weighted loss sum
(``create_graph=True``, i.e. double backprop), so no per-sample gradients are computed.
Exact stationarity of ``mean CE + wd/2 ||theta||^2`` over N samples gives lambda = 1/(N wd);
for M synthetic images lambda starts at 1/(M wd) unless given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.augment import ComposedAugment
from common.datasets import DatasetInfo
from common.errors import ConfigError
from common.modelio import load_model
from common.runtime import derive_seed, make_generator
from server.methods.registry import DistillTask


@dataclass(frozen=True)
class DKKTOptions:
    """Options every DKKT-based method shares (flags ``--global-model``, ``--lambda-init`` ...)."""

    global_model: str = ""  # directory of a trained model (a federation's OUT/global-model)
    kkt_params: str = "all"  # all | last (classifier) | comma-separated parameter-name prefixes
    lambda_init: float = 0.0  # 0: the weight-decay rule 1/(M * wd) with the model's recorded wd
    lambda_lr: float = 0.001  # Adam step for the multipliers, relative to their initial value (0: fixed)
    beta_primal: float = 2e-3
    beta_tv: float = 0.0
    beta_norm: float = 0.0
    kkt_aug_weight: float = 5.0  # weight of the KKT terms on the augmented copy (0: no augmented copy)
    kkt_clean_term: bool = False  # also the KKT terms on the un-augmented images (not in the published loss)
    kkt_translate: float = 0.125  # augmented copy: shift by up to this fraction of the side
    kkt_crop: float = 0.2  # ... keep a square of side U[1 - crop, 1], resized back
    kkt_flip: float = 0.5  # ... horizontal flip probability (0 for digit datasets)
    kkt_aug_noise: float = 0.05  # ... std of the Gaussian noise added
    kkt_batch: int = 0  # synthetic images per KKT step (0: all); a subset is rescaled by M / batch

    def check(self, method: str) -> None:
        if not self.global_model:
            raise ConfigError(
                f"{method} needs --global-model DIR: a federation's OUT/global-model or any saved model directory"
            )
        if self.lambda_init < 0 or self.lambda_lr < 0 or self.kkt_batch < 0 or self.kkt_aug_weight < 0:
            raise ConfigError("lambda_init, lambda_lr, kkt_batch and kkt_aug_weight must be >= 0")


def load_global_model(path: str | Path, info: DatasetInfo, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Load a trained model for DKKT and check it was trained on this dataset's shape and classes."""
    model, model_info, meta = load_model(path, device)
    mine = (info.channels, info.image_size, info.num_classes)
    theirs = (model_info.channels, model_info.image_size, model_info.num_classes)
    if mine != theirs:
        raise ConfigError(
            f"global model {path} expects (channels, size, classes) {theirs} but the dataset has {mine}; "
            "use a model trained on this dataset"
        )
    return model.eval(), meta


def select_parameters(model: torch.nn.Module, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    named = list(model.named_parameters())
    if which == "all":
        return named
    prefixes = ["classifier."] if which == "last" else [p.strip() for p in which.split(",") if p.strip()]
    chosen = [(n, p) for n, p in named if any(n.startswith(pre) for pre in prefixes)]
    if not chosen:
        raise ConfigError(f"kkt_params {which!r} selects no parameter; names start with e.g. {named[0][0]!r}")
    return chosen


def lambda_from_weight_decay(num_images: int, weight_decay: float) -> float:
    """lambda of exact stationarity when ``num_images`` samples carry the whole mean loss: 1/(M wd)."""
    return 1.0 / (num_images * weight_decay)


def initial_lambda(options: DKKTOptions, num_images: int, weight_decay: float | None) -> float:
    if options.lambda_init > 0:
        return options.lambda_init
    if not weight_decay:
        raise ConfigError(
            "the global model records no weight decay, so lambda cannot start from 1/(M wd); pass --lambda-init"
        )
    return lambda_from_weight_decay(num_images, weight_decay)


def stationarity_loss(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    lam: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_stat, per-sample CE, logits)``: mean |theta* + grad sum_i lam_i CE_i| over the entries of ``params``."""
    logits = model(x)
    ce = F.cross_entropy(logits, y, reduction="none")
    grads = torch.autograd.grad((lam * ce).sum(), params, create_graph=True)
    total = sum((p.detach() + g).abs().sum() for p, g in zip(params, grads, strict=True))
    return total / sum(p.numel() for p in params), ce, logits


def primal_loss(logits: torch.Tensor, ce: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_primal, accuracy)``: the cross-entropy of the misclassified samples only, over the batch size."""
    wrong = (logits.argmax(1) != y).float()
    return (ce * wrong).sum() / len(y), 1 - wrong.mean()


@dataclass(frozen=True)
class WeightSchedule:
    """w_kkt over the run (ours, for the ablation): ``constant``; ``warmup`` rises linearly from 0 over the first
    ``ramp`` share of the iterations; ``decay`` falls linearly to 0 over the last ``ramp`` share."""

    weight: float = 1.0
    kind: str = "constant"  # constant | warmup | decay
    ramp: float = 0.5
    iterations: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "warmup", "decay"):
            raise ConfigError(f"w_kkt_schedule {self.kind!r}: use constant, warmup or decay")
        if not 0 < self.ramp <= 1:
            raise ConfigError(f"w_kkt_ramp {self.ramp}: use a share of the iterations in (0, 1]")

    def at(self, iteration: int) -> float:
        if self.kind == "constant":
            return self.weight
        span = max(1.0, self.ramp * self.iterations)
        if self.kind == "warmup":
            return self.weight * min(1.0, (iteration + 1) / span)
        return self.weight * min(1.0, max(0.0, (self.iterations - iteration) / span))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class DKKTLoss:
    """The DKKT term (an :class:`~server.methods.pixel_loop.Objective`) against a frozen trained model."""

    name = "dkkt"

    def __init__(
        self,
        task: DistillTask,
        options: DKKTOptions,
        labels: torch.Tensor,
        weight: float | WeightSchedule = 1.0,
    ) -> None:
        self.task, self.options = task, options
        self.schedule = weight if isinstance(weight, WeightSchedule) else WeightSchedule(weight)
        self.model, self.meta = load_global_model(options.global_model, task.info, task.device)
        self.params = [p for _, p in select_parameters(self.model, options.kkt_params)]
        for p in self.model.parameters():
            p.requires_grad_(any(p is q for q in self.params))
        self.labels = labels.to(task.device)
        self.lambda0 = initial_lambda(options, len(labels), self.meta.get("weight_decay"))
        self.lam = torch.full((len(labels),), self.lambda0, device=task.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.lam], lr=options.lambda_lr * self.lambda0)
        augment = ComposedAugment(options.kkt_translate, options.kkt_crop, options.kkt_flip, options.kkt_aug_noise)
        self.augment = augment.for_dataset(task.info.name) if options.kkt_aug_weight > 0 else None
        self.clean_term = options.kkt_clean_term or self.augment is None

    def kkt(self, x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_stat + beta_primal L_primal, accuracy)`` on one batch."""
        stat, ce, logits = stationarity_loss(self.model, self.params, x, y, lam)
        primal, accuracy = primal_loss(logits, ce, y)
        return stat + self.options.beta_primal * primal, accuracy

    def loss(self, syn: torch.Tensor, iteration: int) -> torch.Tensor:
        g = make_generator(derive_seed("dkkt-iter", self.task.seed, iteration))
        m, batch = len(syn), self.options.kkt_batch
        if batch and batch < m:
            pick = torch.randperm(m, generator=g)[:batch].to(syn.device)
            x, y, lam = syn[pick], self.labels[pick], self.lam[pick] * (m / batch)
        else:
            x, y, lam = syn, self.labels, self.lam
        total = syn.new_zeros(())
        if self.augment is not None:
            aug_loss, self.accuracy = self.kkt(self.augment(x, g), y, lam)
            total = total + self.options.kkt_aug_weight * aug_loss
        if self.clean_term:
            clean_loss, self.accuracy = self.kkt(x, y, lam)  # the summary's primal accuracy: un-augmented
            total = total + clean_loss
        if self.options.beta_tv:
            total = total + self.options.beta_tv * total_variation(syn)
        if self.options.beta_norm:
            total = total + self.options.beta_norm * syn.pow(2).mean()
        return total

    def backward(self, syn: torch.Tensor, iteration: int) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.schedule.at(iteration) * self.loss(syn, iteration)
        loss.backward(inputs=[syn, self.lam])
        return float(loss.detach())

    def after_step(self) -> None:
        if self.options.lambda_lr > 0:
            self.optimizer.step()
        with torch.no_grad():
            self.lam.clamp_(min=0.0)  # dual feasibility: lambda >= 0

    def state_dict(self) -> dict:
        return {"lambda": self.lam.detach().cpu(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            with torch.no_grad():
                self.lam.copy_(state["lambda"].to(self.lam.device))
            self.optimizer.load_state_dict(state["optimizer"])

    def summary(self) -> dict:
        lam = self.lam.detach()
        return {
            "lambda_init": self.lambda0,
            "lambda_mean": float(lam.mean()),
            "lambda_min": float(lam.min()),
            "kkt_primal_accuracy": float(getattr(self, "accuracy", float("nan"))),
            "global_model_sha256": self.meta.get("sha256", ""),
            "global_model_round": self.meta.get("round"),
        }
