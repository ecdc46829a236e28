"""The ``DistillService`` gRPC servicer: requests in, job table rows out, errors as status codes.

Every call is a thin translation between protobuf messages and :class:`JobStore` /
:func:`validate_request` / :func:`receive_model`; the servicer holds no job state of its own, so
any number of servers could answer from one table and a restart loses nothing. A refused request
ends with ``context.abort(code, message)`` before anything is written.
"""

from __future__ import annotations

import io
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc

from common.errors import EdgeDistillError
from server.service.models import chunk_messages, receive_model
from server.service.runner import ServiceLayout
from server.service.store import ENDED, QUEUED, RUNNING, SUCCEEDED, JobNotFound, JobStateError, JobStore
from server.service.v1 import distill_pb2 as pb
from server.service.v1 import distill_pb2_grpc as pb_grpc
from server.service.validation import RequestError, validate_request

WATCH_POLL_SECONDS = 0.25
MAX_PAGE_SIZE = 500
CHUNK_RANGE = (1024, 2 << 20)  # bytes per artifact chunk a client may ask for


def request_to_dict(message: pb.SubmitJobRequest) -> dict:
    return {
        "method": message.method,
        "dataset": message.dataset,
        "global_model": message.global_model,
        "ipc": message.ipc,
        "class_counts": dict(message.class_counts),
        "pipc": message.pipc,
        "options": dict(message.options),
        "seed": message.seed,
        "priority": message.priority,
        "label": message.label,
        "eval_runs": message.eval_runs,
    }


def job_to_message(job: dict) -> pb.Job:
    request = job["request"]
    counts = {int(c): int(n) for c, n in request["counts"].items()}
    uniform = len(set(counts.values())) == 1
    submitted = pb.SubmitJobRequest(
        method=request["method"],
        dataset=request["dataset"],
        global_model=request["global_model"],
        ipc=next(iter(counts.values())) if uniform else 0,
        class_counts={} if uniform else counts,
        pipc=request["pipc"],
        options=request["options"],
        seed=request["seed"],
        priority=request["priority"],
        label=request["label"],
        eval_runs=request.get("eval_runs", 0),
    )
    return pb.Job(
        id=job["id"],
        state=pb.JobState.Value(job["state"]),
        request=submitted,
        submitted_at=job["submitted_at"],
        started_at=job["started_at"],
        finished_at=job["finished_at"],
        iteration=job["iteration"],
        iterations=job["iterations"],
        error=job["error"],
        artifact=job["artifact"],
        artifact_sha256=job["artifact_sha256"],
        accuracy=job["accuracy"],
        attempts=job["attempts"],
    )


def _phase(job: dict) -> str:
    if job["state"] == QUEUED:
        return "queued"
    if job["state"] == RUNNING:
        return job["phase"] or ("distilling" if job["iterations"] else "loading")
    return "done"


@contextmanager
def _status_on_error(context: grpc.ServicerContext):
    """An EdgeDistillError raised inside ends the RPC with its gRPC status and one-line message."""
    try:
        yield
    except EdgeDistillError as exc:
        if isinstance(exc, RequestError):
            code = getattr(grpc.StatusCode, exc.code)
        elif isinstance(exc, JobNotFound):
            code = grpc.StatusCode.NOT_FOUND
        elif isinstance(exc, JobStateError):
            code = grpc.StatusCode.FAILED_PRECONDITION
        else:
            code = grpc.StatusCode.INVALID_ARGUMENT
        context.abort(code, str(exc))


class WatchHub:
    """One thread reads every watched job in one query per tick and wakes the watchers.

    Without it, each WatchJob stream would poll the table on its own: 200 watchers at 4 Hz are
    800 queries a second competing with submissions for the GIL and the database.
    """

    def __init__(self, store: JobStore, tick: float = WATCH_POLL_SECONDS) -> None:
        self.store, self.tick = store, tick
        self.counts: dict[str, int] = {}
        self.snapshots: dict[str, dict] = {}
        self.generation = 0
        self.changed = threading.Condition()
        threading.Thread(target=self._poll, name="watch-hub", daemon=True).start()

    def _poll(self) -> None:
        while True:
            time.sleep(self.tick)
            with self.changed:
                ids = list(self.counts)
            if not ids:
                continue
            snapshots = self.store.get_many(ids)
            with self.changed:
                self.snapshots.update(snapshots)
                self.generation += 1
                self.changed.notify_all()

    @contextmanager
    def watching(self, job_id: str):
        """Yields ``next_snapshot()``: the job after the next tick (None if the tick timed out)."""
        with self.changed:
            self.counts[job_id] = self.counts.get(job_id, 0) + 1

        def next_snapshot() -> dict | None:
            with self.changed:
                seen = self.generation
                self.changed.wait_for(lambda: self.generation != seen, timeout=5 * self.tick)
                return self.snapshots.get(job_id)

        try:
            yield next_snapshot
        finally:
            with self.changed:
                self.counts[job_id] -= 1
                if not self.counts[job_id]:
                    del self.counts[job_id]
                    self.snapshots.pop(job_id, None)


class DistillService(pb_grpc.DistillServiceServicer):
    def __init__(self, layout: ServiceLayout, data_root: str = "", max_upload_bytes: int = 256 << 20) -> None:
        self.layout, self.data_root, self.max_upload_bytes = layout, data_root, max_upload_bytes
        self.store = JobStore(layout.database)
        self.watchers = WatchHub(self.store)

    def SubmitJob(self, request, context):
        with _status_on_error(context):
            normalised = validate_request(request_to_dict(request), self.data_root, self.layout.models)
        return job_to_message(self.store.submit(normalised, priority=normalised["priority"]))

    def GetJob(self, request, context):
        with _status_on_error(context):
            return job_to_message(self.store.get(request.id))

    def ListJobs(self, request, context):
        size = request.page_size or 50
        if not 1 <= size <= MAX_PAGE_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page_size must be 1..{MAX_PAGE_SIZE} (0: 50)")
        state = pb.JobState.Name(request.state) if request.state else None
        with _status_on_error(context):
            jobs, token = self.store.list(state, size, request.page_token)
        return pb.ListJobsResponse(jobs=[job_to_message(j) for j in jobs], next_page_token=token)

    def WatchJob(self, request, context):
        with _status_on_error(context):
            job = self.store.get(request.id)
        last, first_seen = None, None
        with self.watchers.watching(request.id) as next_snapshot:
            while context.is_active():
                now, seen = time.time(), (job["state"], job["iteration"], job["attempts"], job["phase"])
                if seen != last:
                    if job["state"] == RUNNING and job["iteration"] and first_seen is None:
                        first_seen = (now, job["iteration"])
                    yield self._event(job, now, first_seen)
                    last = seen
                if job["state"] in ENDED:
                    return
                job = next_snapshot() or job

    @staticmethod
    def _event(job: dict, now: float, first_seen: tuple[float, int] | None) -> pb.JobEvent:
        eta = 0.0
        if first_seen and job["iteration"] > first_seen[1]:
            rate = (now - first_seen[0]) / (job["iteration"] - first_seen[1])
            eta = rate * (job["iterations"] - job["iteration"])
        metrics = {"accuracy": job["accuracy"]} if job["accuracy"] else {}
        message = job["error"] or (f"artifact {job['artifact']}" if job["state"] == SUCCEEDED else "")
        if job["state"] == SUCCEEDED and job["accuracy"]:
            message += f"; test accuracy {100 * job['accuracy']:.2f} % ({job['request'].get('eval_runs')} runs)"
        return pb.JobEvent(
            id=job["id"],
            state=pb.JobState.Value(job["state"]),
            phase=_phase(job),
            iteration=job["iteration"],
            iterations=job["iterations"],
            loss=job["loss"],
            eta_seconds=eta,
            metrics=metrics,
            message=message,
        )

    def CancelJob(self, request, context):
        with _status_on_error(context):
            return job_to_message(self.store.cancel(request.id))

    def UploadModel(self, request_iterator, context):
        with _status_on_error(context):
            ref = receive_model(request_iterator, self.layout.models, self.max_upload_bytes)
        return pb.ModelRef(**ref)

    def DownloadArtifact(self, request, context):
        with _status_on_error(context):
            job = self.store.get(request.id)
        if job["state"] != SUCCEEDED:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job['id']} is {job['state']}; only a SUCCEEDED job has an artifact (watch it first)",
            )
        size = request.chunk_bytes or (1 << 20)
        if not CHUNK_RANGE[0] <= size <= CHUNK_RANGE[1]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunk_bytes must be {CHUNK_RANGE[0]}..{CHUNK_RANGE[1]}")
        yield from chunk_messages(pb.ArtifactChunk, pack_directory(self.layout.artifacts / job["id"]), size)


def pack_directory(directory: Path) -> bytes:
    """An artifact directory (its regular files, sub-folders included) as an uncompressed tar archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
            tar.add(str(path), arcname=path.relative_to(directory).as_posix(), recursive=False)
    return buffer.getvalue()
