"""The job table of the distillation service: SQLite in WAL mode under the service's state directory.

It is the single source of truth every executor and API call goes through, so a restart of the
service loses nothing: queued jobs stay queued, and :meth:`JobStore.recover` puts the jobs that
were running when the process died back in the queue (their method checkpoint lets them resume).
Every change is one transaction; :meth:`JobStore.claim` hands each queued job to exactly one
worker even when several processes claim at once (``BEGIN IMMEDIATE`` takes the write lock first).
Jobs are plain dicts with the columns below; ``request`` is the submitted request as a dict.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from common.errors import EdgeDistillError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ENDED = (SUCCEEDED, FAILED, CANCELLED)
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    iteration INTEGER NOT NULL DEFAULT 0,
    iterations INTEGER NOT NULL DEFAULT 0,
    loss REAL NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    artifact TEXT NOT NULL DEFAULT '',
    artifact_sha256 TEXT NOT NULL DEFAULT '',
    accuracy REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    phase TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, seq);
"""


class JobNotFound(EdgeDistillError):
    """No job with that id (the API answers NOT_FOUND)."""


class JobStateError(EdgeDistillError):
    """The job is not in a state that allows the change (the API answers FAILED_PRECONDITION)."""


class JobStore:
    """The table; safe to share between threads (each thread keeps its own connection)."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path, self.timeout = Path(path), timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._connect()
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        if "phase" not in {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}:
            db.execute("ALTER TABLE jobs ADD COLUMN phase TEXT NOT NULL DEFAULT ''")  # a table from before it

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (opened once: a connection per call costs more than the query)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")  # a finished transaction survives a power cut
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self):
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _fetch(db: sqlite3.Connection, job_id: str) -> dict:
        """The job with ``job_id`` (request decoded); :class:`JobNotFound` if there is none."""
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}; list the jobs to find its id")
        job = dict(row)
        job["request"] = json.loads(job["request"])
        return job

    # ---------------------------------------------------------------- the API's calls
    def submit(self, request: dict, priority: int = 0) -> dict:
        """Queue a validated request; returns the new job."""
        job_id = uuid.uuid4().hex[:16]
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, state, request, priority, submitted_at) VALUES (?, ?, ?, ?, ?)",
                (job_id, QUEUED, json.dumps(request, sort_keys=True), int(priority), time.time()),
            )
            return self._fetch(db, job_id)

    def get(self, job_id: str) -> dict:
        return self._fetch(self._connect(), job_id)

    def get_many(self, job_ids: list[str]) -> dict[str, dict]:
        """The jobs among ``job_ids`` that exist, by id, read in one query (for many watchers at once)."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        rows = self._connect().execute(f"SELECT * FROM jobs WHERE id IN ({marks})", list(job_ids)).fetchall()
        return {r["id"]: {**dict(r), "request": json.loads(r["request"])} for r in rows}

    def list(self, state: str | None = None, page_size: int = 50, page_token: str = "") -> tuple[list[dict], str]:
        """Newest first; ``(jobs, next_page_token)``, the token empty on the last page."""
        if state is not None and state not in STATES:
            raise EdgeDistillError(f"unknown job state {state!r}; use one of {', '.join(STATES)}")
        before = _decode_token(page_token)
        query, args = "SELECT * FROM jobs WHERE seq < ?", [before]
        if state is not None:
            query, args = query + " AND state = ?", [*args, state]
        rows = self._connect().execute(query + " ORDER BY seq DESC LIMIT ?", (*args, page_size + 1)).fetchall()
        jobs = [{**dict(r), "request": json.loads(r["request"])} for r in rows[:page_size]]
        token = _encode_token(jobs[-1]["seq"]) if len(rows) > page_size else ""
        return jobs, token

    def cancel(self, job_id: str) -> dict:
        with self._transaction() as db:
            job = self._fetch(db, job_id)
            if job["state"] in ENDED:
                raise JobStateError(f"job {job_id} already ended ({job['state']}); nothing to cancel")
            db.execute("UPDATE jobs SET state = ?, finished_at = ? WHERE id = ?", (CANCELLED, time.time(), job_id))
            return self._fetch(db, job_id)

    # ---------------------------------------------------------------- the executors' calls
    def claim(self, worker: str) -> dict | None:
        """The next queued job (highest priority, then oldest), now RUNNING for ``worker``; None if none."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = ? ORDER BY priority DESC, seq LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = ?, worker = ?, started_at = ?, phase = '', attempts = attempts + 1 "
                "WHERE id = ?",
                (RUNNING, worker, time.time(), row["id"]),
            )
            return self._fetch(db, row["id"])

    def progress(self, job_id: str, iteration: int, iterations: int, loss: float) -> bool:
        """Record progress; False when the job is no longer running (cancelled: the worker stops)."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET iteration = ?, iterations = ?, loss = ? WHERE id = ? AND state = ?",
                (int(iteration), int(iterations), float(loss), job_id, RUNNING),
            ).rowcount
        return changed == 1

    def set_phase(self, job_id: str, phase: str) -> bool:
        """Name the running job's phase after distilling (``evaluating``); False when it no longer runs."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET phase = ? WHERE id = ? AND state = ?", (phase, job_id, RUNNING)
            ).rowcount
        return changed == 1

    def finish(self, job_id: str, state: str, **result) -> None:
        """End a running job: SUCCEEDED with artifact / artifact_sha256 / accuracy, or FAILED with error."""
        if state not in (SUCCEEDED, FAILED):
            raise ValueError(f"finish() takes SUCCEEDED or FAILED, not {state}")
        allowed = {"error", "artifact", "artifact_sha256", "accuracy"}
        if unknown := set(result) - allowed:
            raise ValueError(f"unknown result fields {sorted(unknown)}")
        columns = ", ".join(f"{k} = ?" for k in result)
        with self._transaction() as db:
            db.execute(
                f"UPDATE jobs SET state = ?, finished_at = ?{', ' + columns if columns else ''} "
                "WHERE id = ? AND state = ?",
                (state, time.time(), *result.values(), job_id, RUNNING),
            )

    def recover(self) -> list[str]:
        """At start: jobs left RUNNING by a dead process go back to the queue; returns their ids."""
        with self._transaction() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state = ?", (RUNNING,)).fetchall()]
            db.execute("UPDATE jobs SET state = ?, worker = '' WHERE state = ?", (QUEUED, RUNNING))
        return ids


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode()


def _decode_token(token: str) -> int:
    if not token:
        return 2**62
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, UnicodeDecodeError):
        raise EdgeDistillError("page_token is not one this server issued; start again from an empty token") from None
