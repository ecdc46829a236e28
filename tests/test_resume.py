"""Kill a real federation (SIGKILL of the `edgedistill simulate` process) and resume it; drop-out rounds.

The uninterrupted run is the reference: a resumed run must end with the same global model
(sha256 of its weights) and the same ``metrics.json`` (timings aside), and leave no temporary files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from common.faults import ENV, RAISE_ENV  # noqa: E402
from simulations.simulate import FLOWER_ENV  # noqa: E402

pytestmark = pytest.mark.e2e
SIMULATE = [
    *("simulate", "--clients", "3", "--rounds", "3", "--pipc", "10", "--lr", "0.05", "--cpus-per-client", "0.5"),
    *("--distill", "dm", "--distill-every", "1", "--ipc", "1", "--iterations", "2"),
    *("--eval-runs", "1", "--eval-epochs", "2", "--compare", ""),
]
VOLATILE = {"seconds", "distill_seconds", "distilled_artifact"}


def _start(out: Path, *extra: str, fault: str = "") -> subprocess.Popen:
    env = {**os.environ, **FLOWER_ENV, ENV: fault}
    log = (out.parent / f"{out.name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "common.cli", *SIMULATE, "--out", str(out), *extra],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the run and the Ray processes it starts share one process group
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's agents outlive a killed driver otherwise
        proc.wait()


def _simulate(out: Path, *extra: str, fault: str = "") -> int:
    return _finish(_start(out, *extra, fault=fault))


def _outcome(out: Path) -> tuple[str, list[dict], dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    history = [{k: v for k, v in h.items() if k not in VOLATILE} for h in metrics["history"]]
    model = json.loads((out / "global-model" / "model.json").read_text())
    return model["sha256"], history, metrics["node_drops"]


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old")) or ".tmp." in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _simulate(out) == 0, (out.parent / "run.log").read_text()[-3000:]
    sha, history, drops = _outcome(out)
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert all("distilled_accuracy" in h for h in history[1:]) and drops == {}
    return sha, history, drops


KILL_POINTS = {
    "devices training round 2": "round-start@2",
    "aggregating round 2": "aggregation@2",
    "writing round 2's checkpoint": "atomic-write:federation-checkpoint.pt@3",  # 1, 2: round 1 before/after
    "swapping in round 2's global model": "dir-swap:global-model@1",  # round 1 writes it, nothing to swap
    "distilling after round 2": "distillation@2",
}
DEFAULT_SUITE = {"writing round 2's checkpoint", "distilling after round 2"}  # the rest: -m slow (~1 min each)


@pytest.mark.parametrize(
    "point", [pytest.param(p, marks=() if p in DEFAULT_SUITE else pytest.mark.slow) for p in sorted(KILL_POINTS)]
)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(point, reference, tmp_path):
    out = tmp_path / "run"
    assert _simulate(out, fault=KILL_POINTS[point]) == -signal.SIGKILL
    assert _simulate(out, "--resume") == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert _outcome(out) == reference
    assert _leftovers(out) == []
    assert len(list((out / "distilled").iterdir())) == 3  # one artifact per round, none half-written


@pytest.mark.slow
def test_a_run_killed_from_outside_mid_round_resumes_to_the_same_result(reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # round 1 and its distillation are done ...
        with contextlib.suppress(OSError, ValueError, KeyError):
            history = json.loads((out / "metrics.json").read_text())["history"]
            if len(history) == 2 and "distilled_accuracy" in history[1]:
                break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # ... so the devices are training round 2
    _finish(proc)
    assert _simulate(out, "--resume") == 0
    assert _outcome(out) == reference


def test_resume_refuses_changed_settings_unless_allowed(tmp_path, capsys):
    from common.cli import main

    out = tmp_path / "run"
    assert _simulate(out, fault="round-start@2") == -signal.SIGKILL
    args = [*SIMULATE, "--out", str(out), "--resume", "--lr", "0.1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "settings differ from the interrupted run's: lr 0.05 -> 0.1" in err and "resume-allow-changes" in err
    assert _simulate(out, "--resume", "--lr", "0.1", "--resume-allow-changes") == 0


def test_a_round_in_which_every_device_fails_keeps_the_model_and_the_run_finishes(tmp_path, monkeypatch):
    from server.federation.run import FederationConfig
    from simulations.simulate import run_simulated_fleet

    monkeypatch.setenv(RAISE_ENV, "client-train:2")  # every device raises in round 2 (Ray workers inherit it)
    config = FederationConfig(
        dataset="digits",
        num_rounds=3,
        min_train_nodes=3,
        min_available_nodes=3,
        pipc="10",
        lr=0.05,
        out_dir=str(tmp_path),
    )
    history = run_simulated_fleet(config, clients=3, cpus_per_client=0.5)
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    failed = history[2]
    assert "only 0 valid client updates of 3" in failed["failed"] and failed["clients_dropped"] == 3
    assert failed["accuracy"] == history[1]["accuracy"]  # the previous global model, kept
    assert "failed" not in history[3] and history[3]["clients_ok"] == 3
    drops = json.loads((tmp_path / "metrics.json").read_text())["node_drops"]
    assert sorted(drops.values()) == [1, 1, 1]
