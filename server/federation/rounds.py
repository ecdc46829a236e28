"""Server distillation rounds: distill from the global model + public subset, save, evaluate.

:func:`distill_and_evaluate` is the one entry point the federation hook, ``simulate --distill``
(its comparison table) and benchmarks share. It builds the task on the server's public subset
(the same pipc images per class, drawn with the same seed, that the partitioner kept away from
every client), passes the global model to methods that take one, bounds the work by an
iteration budget and a time limit, writes a versioned artifact whose manifest names the round and
the global model's hash, and evaluates it with the quick protocol.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.artifacts import save_distilled_set
from common.datasets import Dataset
from common.diversity import DEFAULT_K_MAX
from common.errors import ConfigError
from common.evaluation import EvalConfig, evaluate_recorded
from server.methods.registry import DistillTask, coerce_option, distill, make_task, option_names


@dataclass(frozen=True)
class RoundPlan:
    """What a server distillation round runs (from the run config or the CLI)."""

    method: str
    ipc: str = "10"
    pipc: str = "50"
    iterations: int = 1000  # for methods with an iteration budget
    time_limit: float = 3600.0  # seconds of optimisation before the method stops early (0: none)
    options: dict[str, Any] = field(default_factory=dict)
    eval_runs: int = 2
    eval_epochs: int = 300
    eval_workers: int = 0  # 0: one per CPU core
    seed: int = 0
    device: str = "auto"
    progress: bool = False
    allocation: str = "fixed"  # fixed | adaptive (K-means on the public subset) | federated (device statistics)
    allocation_k_max: int = DEFAULT_K_MAX


def method_options(plan: RoundPlan, global_model: Path | None) -> dict[str, Any]:
    """The plan's budget and global model, for the options the method actually has."""
    known = option_names(plan.method)
    options = {}
    if "iterations" in known:
        options["iterations"] = plan.iterations
    if "dsv_iterations" in known:
        options["dsv_iterations"] = plan.iterations
    if "time_limit" in known:
        options["time_limit"] = plan.time_limit
    if "global_model" in known and global_model is not None:
        options["global_model"] = str(global_model)
    return {**options, **{k: coerce_option(plan.method, k, v) for k, v in plan.options.items() if k in known}}


def distill_and_evaluate(
    data: Dataset,
    plan: RoundPlan,
    out: Path,
    global_model: Path | None = None,
    labels: dict[str, Any] | None = None,
    device_statistics=None,
) -> dict[str, Any]:
    """Distill with ``plan.method``, write the artifact to ``out``, evaluate it; returns its metrics.

    ``device_statistics``: merged class statistics of the edge devices, used by the ``federated``
    allocation (see :mod:`server.methods.allocation`).
    """
    from common.runtime import resolve_device

    device = resolve_device(plan.device)
    task = make_task(
        data,
        plan.ipc,
        plan.pipc,
        seed=plan.seed,
        device=device,
        dataset_spec=data.info.name,
        progress=plan.progress,
        workdir=out.with_name(out.name + ".work"),
    )
    task = apply_allocation(task, plan, global_model, device_statistics)
    started = time.perf_counter()
    dset = distill(plan.method, task, method_options(plan, global_model))
    seconds = time.perf_counter() - started
    model_meta = _model_meta(global_model)
    dset.manifest.update(
        {
            **(labels or {}),
            "distill_seconds": round(seconds, 2),
            "global_model": str(global_model) if global_model else None,
            "global_model_sha256": model_meta.get("sha256"),
        }
    )
    save_distilled_set(out, dset, overwrite=True)
    result = evaluate_artifact(data, plan, out, dset)
    if task.workdir is not None and task.workdir.exists():
        shutil.rmtree(task.workdir)
    return {
        "method": plan.method,
        "ipc": plan.ipc,
        "pipc": plan.pipc,
        "artifact": str(out),
        "accuracy": result.mean,
        "accuracy_std": result.std,
        "accuracies": result.accuracies,
        "distill_seconds": round(seconds, 2),
        "eval_seconds": round(result.seconds, 2),
        "stopped_early": dset.manifest.get("stopped_early"),
        "counts": {str(c): n for c, n in task.counts.items()},
        "global_model_sha256": model_meta.get("sha256"),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def evaluate_artifact(data: Dataset, plan: RoundPlan, out: Path, dset=None):
    """The quick protocol on a round's artifact (``dset``: the set already in memory); noted in its manifest."""
    from common.artifacts import load_distilled_set
    from common.runtime import resolve_device

    dset = dset if dset is not None else load_distilled_set(out, expect=data.info)
    return evaluate_recorded(
        out,
        dset.images,
        dset.labels,
        data.test,
        data.info,
        runs=plan.eval_runs,
        config=EvalConfig(epochs=plan.eval_epochs),
        seed=plan.seed,
        device=resolve_device(plan.device),
        workers=plan.eval_workers or None,
        progress=plan.progress,
    )


def apply_allocation(task: DistillTask, plan: RoundPlan, global_model: Path | None, device_statistics=None):
    """The task with the plan's per-class counts: fixed, adaptive (server data) or federated (devices)."""
    from server.methods.allocation import AllocationConfig, allocate_task, allocation_for_task, with_allocation

    if plan.allocation == "fixed":
        return task
    config = AllocationConfig(k_max=plan.allocation_k_max, model=str(global_model or ""), seed=plan.seed)
    if plan.allocation == "adaptive":
        return allocate_task(task, config)[0]
    if plan.allocation != "federated":
        raise ConfigError(f"allocation {plan.allocation!r}: use fixed, adaptive or federated")
    if not device_statistics:
        raise ConfigError("the federated allocation needs the devices' class statistics (diversity-stats = true)")
    return with_allocation(task, allocation_for_task(task, device_statistics, config, source="federated"))


def _model_meta(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        return json.loads((Path(path) / "model.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
