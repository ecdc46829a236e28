"""Load test of the job service on loopback: many submitters, many watchers, every job exactly once.

Starts ``edgedistill serve`` (bearer token, 127.0.0.1, a fresh state directory under ``--out``),
then ``--clients`` threads, each on its own channel, submit ``--jobs-per-client`` tiny jobs
(``random`` on digits: the cost is the service, not the method) and poll them with GetJob, while
``--watchers`` threads hold WatchJob streams on those jobs until they end. It reports p50 / p99
latency of SubmitJob and GetJob, submissions per second, jobs finished per second, and checks
that every job SUCCEEDED exactly once (one attempt, one artifact naming its job). Bounded in
count and time (``--timeout``); prints a table and writes ``--out/load.json``.

    python -m simulations.load_service --clients 50 --watchers 200 --jobs-per-client 2 --out runs/load-service
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.fileio import atomic_write_json
from common.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent submitting clients")
    parser.add_argument("--watchers", type=int, default=200, help="concurrent WatchJob streams")
    parser.add_argument("--jobs-per-client", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="local executor worker processes")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the test gives up")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if min(args.clients, args.watchers, args.jobs_per_client, args.workers) < 1 or args.clients > 500:
        parser.error("--clients 1..500, --watchers, --jobs-per-client and --workers >= 1")
    return args


def start_service(state: Path, token_file: Path, workers: int, max_rpcs: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "common.cli", "serve", "--state-dir", str(state), "--port", "0"]
    command += ["--token-file", str(token_file), "--devices", ",".join(["cpu"] * workers)]
    command += ["--max-concurrent-rpcs", str(max_rpcs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            return process, f"127.0.0.1:{match.group(1)}"
    raise SystemExit("the service did not start: " + (process.stdout.read() if process.stdout else ""))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main(argv=None) -> int:
    from server.service.client import ServiceClient
    from server.service.v1 import distill_pb2 as pb

    args = parse_args(argv)
    out = Path(args.out)
    state = out / f"state-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    token_file = out / "token"
    token_file.write_text(secrets.token_hex(16))
    process, address = start_service(state, token_file, args.workers, args.clients + args.watchers + 16)
    submit_ms, get_ms, job_ids, errors = [], [], [], []
    lock, deadline = threading.Lock(), time.time() + args.timeout
    first_job = threading.Event()

    def submitter(index: int) -> None:
        client = ServiceClient(address, token_file=str(token_file))
        mine = []
        for j in range(args.jobs_per_client):
            started = time.perf_counter()
            try:
                job = client.submit(method="random", dataset="digits", ipc=1, seed=index * 1000 + j, label=f"c{index}")
            except Exception as exc:  # a refused or failed call is a result of the test, not a crash
                with lock:
                    errors.append(f"submit: {exc}")
                continue
            with lock:
                submit_ms.append(1000 * (time.perf_counter() - started))
                job_ids.append(job.id)
            first_job.set()
            mine.append(job.id)
        while mine and time.time() < deadline:
            for job_id in list(mine):
                started = time.perf_counter()
                job = client.get(job_id)
                with lock:
                    get_ms.append(1000 * (time.perf_counter() - started))
                if job.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
                    mine.remove(job_id)
            time.sleep(0.2)

    watched_to_end = []

    def watcher(index: int) -> None:
        client = ServiceClient(address, token_file=str(token_file))
        first_job.wait(timeout=60)
        while time.time() < deadline:
            with lock:
                target = job_ids[index % len(job_ids)] if job_ids else None
            if target is None:
                time.sleep(0.1)
                continue
            try:
                events = list(client.watch(target))
            except Exception as exc:
                with lock:
                    errors.append(f"watch: {exc}")
                return
            with lock:
                watched_to_end.append(events[-1].state == pb.SUCCEEDED)
            return

    alone_ms = sequential_submits(address, token_file, count=20)  # one client, nothing else running: no queueing
    started = time.perf_counter()
    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(args.clients)]
    threads += [threading.Thread(target=watcher, args=(i,)) for i in range(args.watchers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.time()))
    wall = time.perf_counter() - started
    client = ServiceClient(address, token_file=str(token_file))
    jobs = [client.get(job_id) for job_id in job_ids]
    process.terminate()
    process.wait(timeout=60)
    exactly_once = all(
        j.state == pb.SUCCEEDED
        and j.attempts == 1
        and json.loads((Path(j.artifact) / "manifest.json").read_text())["job_id"] == j.id
        for j in jobs
    )
    submitted = args.clients * args.jobs_per_client
    finished = max((j.finished_at for j in jobs), default=0) - min((j.submitted_at for j in jobs), default=0)
    result = {
        "clients": args.clients,
        "watchers": args.watchers,
        "jobs_submitted": len(job_ids),
        "jobs_expected": submitted,
        "workers": args.workers,
        "wall_seconds": round(wall, 2),
        "submit_p50_ms": round(percentile(submit_ms, 0.5), 2),
        "submit_p99_ms": round(percentile(submit_ms, 0.99), 2),
        "get_p50_ms": round(percentile(get_ms, 0.5), 2),
        "get_p99_ms": round(percentile(get_ms, 0.99), 2),
        "get_calls": len(get_ms),
        "submits_per_second": round(len(job_ids) / max(1e-9, _span(jobs, "submitted_at")), 1),
        "jobs_finished_per_second": round(len(jobs) / max(1e-9, finished), 2),
        "watch_streams_to_the_end": sum(watched_to_end),
        "every_job_exactly_once": exactly_once and len(job_ids) == submitted and len(set(job_ids)) == submitted,
        "errors": errors[:20],
        "submit_mean_ms": round(statistics.fmean(submit_ms), 2) if submit_ms else None,
        "submit_alone_p50_ms": round(percentile(alone_ms, 0.5), 2),
        "submit_alone_p99_ms": round(percentile(alone_ms, 0.99), 2),
    }
    rows = [[k, v] for k, v in result.items() if k != "errors"]
    print(markdown_table(["measure", "value"], rows))
    if errors:
        print(f"{len(errors)} errors, first: {errors[0]}")
    atomic_write_json(out / "load.json", result)
    return 0 if result["every_job_exactly_once"] and not errors else 1


def sequential_submits(address: str, token_file: Path, count: int) -> list[float]:
    """Latency of ``count`` submissions by one client, one after another (their jobs run and are checked too)."""
    from server.service.client import ServiceClient

    client, latencies = ServiceClient(address, token_file=str(token_file)), []
    client.list()  # the channel is connected before the clock starts
    for i in range(count):
        started = time.perf_counter()
        client.submit(method="random", dataset="digits", ipc=1, seed=10**6 + i, label="alone")
        latencies.append(1000 * (time.perf_counter() - started))
    return latencies


def _span(jobs, field: str) -> float:
    values = [getattr(j, field) for j in jobs]
    return max(values) - min(values) if len(values) > 1 else 1.0


if __name__ == "__main__":
    raise SystemExit(main())
