"""The evaluation protocol (DESIGN s.8): train fresh networks on a set, test on real test data.

SGD (lr 0.01, momentum 0.9, weight decay 5e-4), batch 256 capped by the set size, lr x 0.1 at
half the epochs, per-sample DSA while training, and the accuracy *at the last epoch* — never the
best test epoch. ``evaluate_set`` repeats this over several seeds and reports mean +- std.
On CPU, runs go to parallel worker processes (one thread each), which keeps both cores busy on
the small batches that distilled sets give.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.augment import DEFAULT_STRATEGY, DSA, strategy_for_dataset
from common.datasets import DatasetInfo, Split
from common.errors import ConfigError
from common.models import build_model
from common.runtime import derive_seed, make_generator, resolve_device


@dataclass(frozen=True)
class EvalConfig:
    epochs: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_decay_at: float = 0.5  # fraction of training after which lr is multiplied by 0.1
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY
    test_batch_size: int = 1000

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.lr_decay_at <= 1:
            raise ConfigError("evaluation needs epochs >= 1, batch size >= 1, lr > 0 and 0 <= lr_decay_at <= 1")


PRESETS = {"paper": EvalConfig(), "quick": EvalConfig(epochs=300)}
# DiM's evaluation of a generator (its validate.py): 1000 epochs, constant lr 0.01, batch 64 of
# fresh samples, per-sample DSA color + crop, the best of a test every 200 epochs. It picks the
# epoch on the test split, so its figures are optimistic and never compared with the default's.
DIM_PROTOCOL = EvalConfig(epochs=1000, batch_size=64, lr_decay_at=0.0, dsa_strategy="color_crop")
DIM_TESTS = 5


def dim_images_per_epoch(total: int, batch_size: int = 64) -> int:
    """DiM's epoch on a generator: ``total // batch + 1`` batches of fresh samples (ipc x C = total)."""
    return (total // batch_size + 1) * batch_size


@dataclass
class EvalResult:
    arch: str
    accuracies: list[float]
    config: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracies) / len(self.accuracies))

    def to_dict(self) -> dict:
        return {
            "arch": self.arch,
            "mean": self.mean,
            "std": self.std,
            "accuracies": self.accuracies,
            "runs": len(self.accuracies),
            "seconds": round(self.seconds, 2),
            "config": self.config,
        }

    def manifest_entry(self) -> dict:
        """``{"ARCH@EPOCHSep": scores}``: how an artifact's manifest records this evaluation."""
        scores = {k: v for k, v in self.to_dict().items() if k in ("mean", "std", "accuracies", "runs")}
        return {f"{self.arch}@{self.config.get('epochs')}ep": scores}

    def __str__(self) -> str:
        return f"{self.arch}: {100 * self.mean:.2f} +- {100 * self.std:.2f} % ({len(self.accuracies)} runs)"


def make_optimizer(model: torch.nn.Module, config: EvalConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def set_epoch_lr(optimizer: torch.optim.Optimizer, config: EvalConfig, epoch: int) -> None:
    """The protocol's step schedule: lr x 0.1 from ``lr_decay_at`` of the epochs on."""
    decay_epoch = int(config.epochs * config.lr_decay_at)
    for group in optimizer.param_groups:
        group["lr"] = config.lr * (0.1 if 0 < decay_epoch <= epoch else 1.0)


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: EvalConfig,
    dsa: DSA | None,
    generator: torch.Generator,
) -> float:
    """One pass over ``(images, labels)`` (already on the model's device); returns the last loss."""
    n = images.shape[0]
    batch = min(config.batch_size, n)
    order = torch.randperm(n, generator=generator).to(images.device)
    loss = torch.zeros(())
    for start in range(0, n, batch):
        idx = order[start : start + batch]
        x = images[idx]
        if dsa is not None:
            x = dsa(x, generator)
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def train_network(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: EvalConfig,
    generator: torch.Generator,
    device: torch.device,
    progress: tqdm | None = None,
) -> torch.nn.Module:
    """Train ``model`` in place on a (small) labelled tensor set with the protocol's schedule."""
    model.to(device).train()
    images, labels = images.to(device), labels.to(device)
    optimizer = make_optimizer(model, config)
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    for epoch in range(config.epochs):
        set_epoch_lr(optimizer, config, epoch)
        loss = train_epoch(model, optimizer, images, labels, config, dsa, generator)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
    return model


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, split: Split, device: torch.device, batch_size: int = 1000) -> float:
    model.to(device).eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        x = split.images[start : start + batch_size].to(device)
        y = split.labels[start : start + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(1, len(split))


@dataclass(frozen=True)
class _Run:
    arch: str
    info: DatasetInfo
    config: EvalConfig
    seed: int
    index: int
    device: str
    threads: int
    progress: bool
    model_options: dict


def _start_run(run: _Run, label: str = "") -> tuple[torch.nn.Module, torch.device, tqdm]:
    """In the worker: threads, the seeded fresh network, and its progress bar."""
    if run.threads:
        torch.set_num_threads(run.threads)
    device = torch.device(run.device)
    torch.manual_seed(run.seed)  # network initialisation
    model = build_model(run.arch, run.info.channels, run.info.num_classes, run.info.image_size, **run.model_options)
    bar = tqdm(
        total=run.config.epochs,
        desc=f"{run.arch} run {run.index + 1}{label}",
        position=run.index,
        leave=False,
        disable=None if run.progress else True,
        dynamic_ncols=True,
    )
    return model.to(device), device, bar


def _one_run(run: _Run, images: torch.Tensor, labels: torch.Tensor, test: Split) -> float:
    model, device, bar = _start_run(run)
    with bar:
        train_network(model, images, labels, run.config, make_generator(run.seed), device, bar)
    return test_accuracy(model, test, device, run.config.test_batch_size)


def default_workers(device: torch.device, runs: int) -> int:
    """Parallel processes on CPU (one per core, at most one per run); 1 on CUDA."""
    if device.type != "cpu":
        return 1
    return max(1, min(runs, os.cpu_count() or 1))


def _plan(arch, info, config, runs, seed, device, workers, progress, model_options):
    if config.dsa:
        config = replace(config, dsa_strategy=strategy_for_dataset(info.name, config.dsa_strategy))
    if runs < 1:
        raise ConfigError("--runs must be at least 1")
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    workers = workers or default_workers(dev, runs)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    plan = [
        _Run(arch, info, config, derive_seed(seed, arch, i), i, str(dev), threads, progress, model_options or {})
        for i in range(runs)
    ]
    return config, plan, workers


def _exit_with_parent() -> None:
    """Worker initializer: end this worker when the process that spawned it is gone (killed or
    crashed), instead of training on as an orphan that takes the cores from the next job."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _map_runs(fn: Callable, plan: list[_Run], workers: int, *args) -> list[float]:
    """``fn(run, *args)`` for every run: in this process, or in ``workers`` spawned processes."""
    if workers == 1:
        return [fn(r, *args) for r in plan]
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_with_parent) as pool:
        futures = [pool.submit(fn, r, *args) for r in plan]
        return [f.result() for f in futures]


def evaluate_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    test: Split,
    info: DatasetInfo,
    arch: str = "convnet3",
    runs: int = 5,
    config: EvalConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    workers: int | None = None,
    progress: bool = True,
    model_options: dict | None = None,
) -> EvalResult:
    """Train ``runs`` fresh ``arch`` networks on ``(images, labels)``; last-epoch test accuracy each."""
    config, plan, workers = _plan(
        arch, info, config or PRESETS["paper"], runs, seed, device, workers, progress, model_options
    )
    images, labels = images.detach().cpu().float(), labels.detach().cpu().long()
    started = time.perf_counter()
    accuracies = _map_runs(_one_run, plan, workers, images, labels, test)
    return EvalResult(arch, accuracies, config=asdict(config), seconds=time.perf_counter() - started)


def _one_resampled_run(run: _Run, sampler: Callable, test: Split, test_every: int) -> float:
    model, device, bar = _start_run(run, " (resampled)")
    optimizer = make_optimizer(model, run.config)
    dsa = DSA(run.config.dsa_strategy) if run.config.dsa else None
    generator, best = make_generator(run.seed), 0.0
    with bar:
        for epoch in range(run.config.epochs):
            images, labels = sampler(derive_seed(run.seed, "sample", epoch))
            model.train()
            set_epoch_lr(optimizer, run.config, epoch)
            train_epoch(model, optimizer, images.to(device), labels.to(device), run.config, dsa, generator)
            if (epoch + 1) % test_every == 0 or epoch + 1 == run.config.epochs:
                best = max(best, test_accuracy(model, test, device, run.config.test_batch_size))
            bar.update(1)
    return best


def evaluate_resampled(
    sampler: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    test: Split,
    info: DatasetInfo,
    arch: str = "convnet3",
    runs: int = 5,
    config: EvalConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    workers: int | None = None,
    progress: bool = True,
    test_every: int | None = None,
) -> EvalResult:
    """DiM's protocol, for generators only: a fresh set ``sampler(seed)`` every epoch, and the
    *best* test accuracy over the epochs tested (every ``test_every``; default: DIM_TESTS tests
    per run). ``config`` defaults to :data:`DIM_PROTOCOL`. Not comparable with
    :func:`evaluate_set`; results carry ``protocol: resampled-best`` in their config."""
    config = config or DIM_PROTOCOL
    test_every = test_every or max(1, config.epochs // DIM_TESTS)
    if test_every < 1:
        raise ConfigError("test_every must be at least 1")
    config, plan, workers = _plan(arch, info, config, runs, seed, device, workers, progress, None)
    started = time.perf_counter()
    accuracies = _map_runs(_one_resampled_run, plan, workers, sampler, test, test_every)
    details = {**asdict(config), "protocol": "resampled-best", "test_every": test_every}
    return EvalResult(arch, accuracies, config=details, seconds=time.perf_counter() - started)


def evaluate_recorded(
    path: str | Path, images: torch.Tensor, labels: torch.Tensor, test: Split, info: DatasetInfo, **evaluate
) -> EvalResult:
    """:func:`evaluate_set` on the set saved at ``path``, recorded in that artifact's manifest
    (``evaluation``, one entry per architecture and protocol length); every caller records it this way."""
    from common.artifacts import update_manifest

    result = evaluate_set(images, labels, test, info, **evaluate)
    update_manifest(path, evaluation=result.manifest_entry())
    return result
