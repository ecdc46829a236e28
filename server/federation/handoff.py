"""Server distillation rounds handed to the job service instead of run in the ServerApp's process.

With ``distill-service = "HOST:PORT"`` in the run config, a distillation round uploads the round's
global model, submits a job with the round's plan (the same method, budget, per-class counts,
public subset and seed the in-process round would use) and returns at once: the federation goes
on while the service works. At every later round, and at the end of the run (waiting up to
``distill-service-wait`` seconds), finished jobs are collected: the artifact is downloaded to
``OUT/distilled/round-NNNN-METHOD`` (the path an in-process round writes), evaluated with the
same quick protocol, and its metrics land in the round's record of ``metrics.json``. A job that
failed or was cancelled records ``distill_error`` instead. The job ids are in the checkpointed
history, so a resumed federation collects what its predecessor submitted.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from common.datasets import Dataset
from common.errors import EdgeDistillError

log = logging.getLogger("edgedistill.server")


def service_client(config):
    from server.service.client import ServiceClient

    return ServiceClient(
        config.distill_service,
        ca_cert=config.distill_service_ca,
        client_cert=config.distill_service_cert,
        client_key=config.distill_service_key,
        token_file=config.distill_service_token_file,
    )


def submit_round(config, data: Dataset, model_dir: Path, server_round: int, out: Path, device_statistics=None) -> dict:
    """Upload the global model and queue the round's job; returns the fields for the round's record."""
    from common.subsets import parse_pipc
    from server.federation.rounds import apply_allocation, method_options
    from server.methods.registry import make_task, option_names

    plan = config.round_plan()
    task = apply_allocation(make_task(data, plan.ipc, plan.pipc, seed=plan.seed), plan, model_dir, device_statistics)
    options = method_options(plan, None)
    client = service_client(config)
    model_id = client.upload_model(model_dir).id if "global_model" in option_names(plan.method) else ""
    job = client.submit(
        method=plan.method,
        dataset=config.dataset,
        global_model=model_id,
        class_counts={int(c): int(n) for c, n in task.counts.items()},
        pipc=parse_pipc(plan.pipc) or 0,  # 0: all, as in the in-process round
        options={key: str(value) for key, value in options.items()},  # coerce_option reads them back
        seed=plan.seed,
        label=f"federation {out.resolve()} round {server_round}",
    )
    log.info("server distillation round %d handed to %s as job %s", server_round, config.distill_service, job.id)
    return {"distill_method": plan.method, "distill_job": job.id, "distill_service": config.distill_service}


def collect_rounds(config, data: Dataset, history: list[dict], out: Path, wait_seconds: float = 0.0) -> bool:
    """Fold finished jobs into their rounds' records; True when something changed.

    With ``wait_seconds`` > 0, keeps polling until no job is pending or the time is up.
    """
    from server.service.v1 import distill_pb2 as pb

    deadline, changed = time.time() + wait_seconds, False
    client = None
    while True:
        pending = [h for h in history if h.get("distill_job") and not _collected(h)]
        if not pending:
            return changed
        client = client or service_client(config)
        for record in pending:
            try:
                job = client.get(record["distill_job"])
            except EdgeDistillError as exc:
                log.warning("job service: %s (round %d stays pending)", exc, record["round"])
                continue
            if job.state == pb.SUCCEEDED:
                record.update(_fetch_and_evaluate(client, config, data, job, record["round"], out))
                changed = True
            elif job.state in (pb.FAILED, pb.CANCELLED):
                record["distill_error"] = f"{pb.JobState.Name(job.state)}: {job.error or 'cancelled'}"
                changed = True
        if time.time() >= deadline:
            return changed
        time.sleep(1.0)


def _collected(record: dict) -> bool:
    return "distilled_accuracy" in record or "distill_error" in record


def _fetch_and_evaluate(client, config, data: Dataset, job, server_round: int, out: Path) -> dict:
    from server.federation.rounds import evaluate_artifact

    plan = config.round_plan()
    artifact = out / "distilled" / f"round-{server_round:04d}-{plan.method}"
    client.download(job.id, artifact, overwrite=True)
    result = evaluate_artifact(data, plan, artifact)
    return {
        "distilled_accuracy": result.mean,
        "distilled_accuracy_std": result.std,
        "distill_seconds": round(job.finished_at - job.started_at, 2),
        "distilled_artifact": str(artifact),
    }
