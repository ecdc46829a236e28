"""The job service's SQLite job table: durable, ordered, each job claimed by exactly one worker."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import EdgeDistillError
from server.service.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobNotFound,
    JobStateError,
    JobStore,
)

ROOT = Path(__file__).resolve().parents[1]


def test_jobs_survive_a_reopen_and_are_claimed_by_priority_then_age(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    low = store.submit({"method": "dm"}, priority=0)
    high = store.submit({"method": "dsv"}, priority=5)
    later_low = store.submit({"method": "random"}, priority=0)
    store = JobStore(tmp_path / "jobs.db")  # a restarted service sees the same table
    assert store.get(low["id"])["request"] == {"method": "dm"} and store.get(low["id"])["state"] == QUEUED
    order = [store.claim("w1")["id"] for _ in range(3)]
    assert order == [high["id"], low["id"], later_low["id"]] and store.claim("w1") is None
    assert store.get(high["id"])["state"] == RUNNING and store.get(high["id"])["attempts"] == 1


def test_a_restart_puts_running_jobs_back_in_the_queue_and_counts_the_attempt(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job = store.submit({"method": "dm"})
    store.claim("worker-that-dies")
    assert JobStore(tmp_path / "jobs.db").recover() == [job["id"]]
    again = store.claim("w2")
    assert again["id"] == job["id"] and again["attempts"] == 2 and again["worker"] == "w2"
    store.finish(job["id"], SUCCEEDED, artifact="/a", artifact_sha256="ab", accuracy=0.9)
    done = store.get(job["id"])
    assert done["state"] == SUCCEEDED and done["artifact"] == "/a" and done["finished_at"] >= done["started_at"] > 0
    assert store.recover() == []  # ended jobs stay ended


def test_cancel_stops_a_job_and_refuses_what_cannot_be_cancelled(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    running = store.submit({"method": "dm"})
    store.claim("w")
    assert store.progress(running["id"], 3, 10, 0.5) is True
    assert store.cancel(running["id"])["state"] == CANCELLED
    assert store.progress(running["id"], 4, 10, 0.4) is False  # the worker learns it should stop
    store.finish(running["id"], FAILED, error="too late")  # a late finish does not overwrite the cancel
    assert store.get(running["id"])["state"] == CANCELLED
    with pytest.raises(JobStateError, match="already ended"):
        store.cancel(running["id"])
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        store.cancel("nope")
    with pytest.raises(JobNotFound):
        store.get("nope")


def test_listing_is_newest_first_in_pages_and_filters_by_state(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    ids = [store.submit({"n": i})["id"] for i in range(7)]
    store.claim("w")  # the oldest is now RUNNING
    seen, token = [], ""
    while True:
        page, token = store.list(page_size=3, page_token=token)
        seen += [j["id"] for j in page]
        if not token:
            break
    assert seen == ids[::-1]
    queued, _ = store.list(state=QUEUED, page_size=50)
    assert [j["id"] for j in queued] == ids[:0:-1]
    with pytest.raises(EdgeDistillError, match="page_token"):
        store.list(page_token="not-a-token!")
    with pytest.raises(EdgeDistillError, match="unknown job state"):
        store.list(state="DONE")


def test_concurrent_workers_in_separate_processes_claim_every_job_exactly_once(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    ids = {store.submit({"n": i})["id"] for i in range(60)}
    worker = (
        "import sys; from server.service.store import JobStore\n"
        "store = JobStore(sys.argv[1])\n"
        "while (job := store.claim(sys.argv[2])) is not None: print(job['id'], flush=True)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, str(tmp_path / "jobs.db"), f"w{i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    claimed = [line.strip() for p in procs for line in p.communicate(timeout=120)[0].splitlines()]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(claimed) == sorted(ids)  # none twice, none lost


def test_a_table_from_before_the_phase_column_opens_with_its_jobs_and_a_phase(tmp_path):
    import sqlite3

    from server.service import store as store_module

    old_schema = store_module.SCHEMA.replace(",\n    phase TEXT NOT NULL DEFAULT ''", "")
    assert "phase" not in old_schema
    db = sqlite3.connect(tmp_path / "jobs.db")
    db.executescript(old_schema)
    db.execute("INSERT INTO jobs (id, state, request, submitted_at) VALUES ('old', ?, '{}', 1.0)", (QUEUED,))
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.db")
    assert store.get("old")["phase"] == "" and store.claim("w1")["id"] == "old"
    assert store.set_phase("old", "evaluating") and store.get("old")["phase"] == "evaluating"
    store.recover()
    assert store.claim("w2")["phase"] == ""  # a job claimed again starts from distilling
    store.cancel("old")
    assert not store.set_phase("old", "evaluating")  # a cancelled job is not running: the worker stops
