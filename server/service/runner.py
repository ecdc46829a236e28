"""What a worker does with one claimed job: distil, write the artifact, evaluate it when the request
asks (``eval_runs``), record the outcome.

Every executor (local processes, Ray tasks) calls :func:`run_job`; the job table is the only
channel back. A job's method checkpoints live in ``work/<id>`` under the state directory: a job
that was running when the service died is claimed again and resumes from there (the methods'
resume is exact, so the artifact is the one an uninterrupted run writes). Progress goes into the
table at every loss-curve point; when a client has cancelled the job, the next progress write
says so and the run stops without writing anything.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from common.errors import Cancelled, EdgeDistillError
from server.service.store import CANCELLED, FAILED, SUCCEEDED, JobStore


@dataclass(frozen=True)
class ServiceLayout:
    """Where the service keeps its state (one directory, so a backup or a move is one copy)."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "jobs.db"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def create(self) -> ServiceLayout:
        for folder in (self.root, self.models, self.artifacts, self.work, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def run_job(layout: ServiceLayout, job: dict, data_root: str = "", device: str = "auto") -> str:
    """Run a claimed job to its end; returns the state it ended in (SUCCEEDED, FAILED or CANCELLED)."""
    store = JobStore(layout.database)
    try:
        artifact, images_sha256 = distil_job(layout, store, job, data_root, device)
        accuracy = evaluate_job(store, job, artifact, data_root, device)
    except Cancelled:
        shutil.rmtree(layout.work / job["id"], ignore_errors=True)  # the table already says CANCELLED
        shutil.rmtree(layout.artifacts / job["id"], ignore_errors=True)  # one written before an evaluation
        return CANCELLED
    except EdgeDistillError as exc:
        store.finish(job["id"], FAILED, error=str(exc))
        return FAILED
    except Exception as exc:  # a bug or a broken machine: the job fails, the worker goes on
        log = layout.logs / f"{job['id']}.log"
        log.write_text(traceback.format_exc())
        store.finish(job["id"], FAILED, error=f"internal error {type(exc).__name__}: {exc} (traceback in {log})")
        return FAILED
    store.finish(job["id"], SUCCEEDED, artifact=str(artifact), artifact_sha256=images_sha256, accuracy=accuracy)
    shutil.rmtree(layout.work / job["id"], ignore_errors=True)
    return SUCCEEDED


def distil_job(layout: ServiceLayout, store: JobStore, job: dict, data_root: str, device: str) -> tuple[Path, str]:
    """The artifact directory of a job, written atomically (the same files ``edgedistill distill`` writes),
    and the sha256 of its images."""
    from common.artifacts import save_distilled_set
    from common.datasets import load_dataset
    from common.runtime import resolve_device, seed_everything
    from server.methods.registry import coerce_option, distill, make_task, option_names

    request = job["request"]
    method, job_id = request["method"], job["id"]
    seed_everything(request["seed"])
    data = load_dataset(request["dataset"], data_root=data_root or None)
    workdir = layout.work / job_id
    task = make_task(
        data,
        {int(c): int(n) for c, n in request["counts"].items()},
        request["pipc"] or None,
        seed=request["seed"],
        device=resolve_device(device),
        dataset_spec=request["dataset"],
        progress=False,
        workdir=workdir,
    )
    task.on_progress = lambda iteration, iterations, loss: store.progress(job_id, iteration, iterations, loss)
    options = {key: coerce_option(method, key, value) for key, value in request["options"].items()}
    if request.get("global_model"):
        options["global_model"] = str(layout.models / request["global_model"])
    if "resume" in option_names(method) and workdir.is_dir() and any(workdir.glob("*checkpoint*")):
        options["resume"] = True  # claimed again after the service died: continue where it stopped
    started = time.perf_counter()
    dset = distill(method, task, options)
    dset.manifest.update({"distill_seconds": round(time.perf_counter() - started, 2), "job_id": job_id})
    if request.get("label"):
        dset.manifest["label"] = request["label"]
    artifact = save_distilled_set(layout.artifacts / job_id, dset, overwrite=True)
    return artifact, dset.manifest["tensors_sha256"]  # the save records it in the manifest it wrote


def evaluate_job(store: JobStore, job: dict, artifact: Path, data_root: str, device: str) -> float:
    """The mean test accuracy of ``eval_runs`` fresh ConvNet-3 trained on the artifact (quick protocol),
    recorded in its manifest as ``edgedistill evaluate --quick`` records it; 0.0 when none was asked."""
    from common.artifacts import load_distilled_set
    from common.datasets import load_dataset
    from common.evaluation import PRESETS, evaluate_recorded

    runs = int(job["request"].get("eval_runs") or 0)
    if runs == 0:
        return 0.0
    if not store.set_phase(job["id"], "evaluating"):
        raise Cancelled(f"job {job['id']} was cancelled")
    data = load_dataset(job["request"]["dataset"], data_root=data_root or None)
    dset = load_distilled_set(artifact, expect=data.info)
    result = evaluate_recorded(
        artifact,
        dset.images,
        dset.labels,
        data.test,
        data.info,
        runs=runs,
        config=PRESETS["quick"],
        seed=job["request"]["seed"],
        device=device,
        workers=1,  # in the worker's own process: a service worker may not start a process pool
        progress=False,
    )
    return result.mean


def worker_loop(layout: ServiceLayout, name: str, data_root: str, device: str, poll_seconds: float = 0.5) -> None:
    """A local worker process: claim, run, repeat until the service stops it."""
    from common.runtime import die_with_parent

    die_with_parent()
    os.environ.setdefault("TQDM_DISABLE", "1")
    store = JobStore(layout.database)
    while True:
        job = store.claim(name)
        if job is None:
            time.sleep(poll_seconds)
            continue
        run_job(layout, job, data_root, device)
