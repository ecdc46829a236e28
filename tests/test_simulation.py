"""Real Flower simulations (Simulation Engine on Ray) on the bundled digits."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from server.federation.run import FederationConfig  # noqa: E402
from simulations.simulate import FLOWER_ENV, PROJECT_ROOT, free_ports, run_simulated_fleet  # noqa: E402


def _config(out, rounds, resume=False) -> FederationConfig:
    return FederationConfig(
        dataset="digits",
        num_rounds=rounds,
        min_train_nodes=4,
        min_available_nodes=4,
        pipc="10",
        partition="iid",
        lr=0.05,
        out_dir=str(out),
        resume=resume,
        seed=0,
    )


def test_four_clients_learn_digits_and_a_stopped_run_resumes_to_the_same_history(tmp_path):
    full = run_simulated_fleet(_config(tmp_path / "full", 3), clients=4)
    assert [h["round"] for h in full] == [0, 1, 2, 3]
    assert full[-1]["accuracy"] > 0.5 and full[0]["accuracy"] < 0.25  # chance is 0.1
    assert all(h["clients_ok"] == 4 and h["clients_dropped"] == 0 for h in full[1:])
    model_meta = json.loads((tmp_path / "full" / "global-model" / "model.json").read_text())
    assert model_meta["round"] == 3 and model_meta["weight_decay"] == 5e-4
    assert (tmp_path / "full" / "accuracy.png").stat().st_size > 1000

    stopped = run_simulated_fleet(_config(tmp_path / "resumed", 2), clients=4)  # "killed" after round 2
    assert [h["round"] for h in stopped] == [0, 1, 2]
    resumed = run_simulated_fleet(_config(tmp_path / "resumed", 3, resume=True), clients=4)
    assert [h["round"] for h in resumed] == [0, 1, 2, 3]
    for a, b in zip(full, resumed):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_server_distillation_rounds_inside_a_simulation_and_the_summary_table(tmp_path, capsys):
    from common.artifacts import load_distilled_set, read_manifest
    from common.cli import main

    out = tmp_path / "sim"
    args = ["simulate", "--clients", "3", "--rounds", "2", "--pipc", "10", "--out", str(out), "--lr", "0.05"]
    args += ["--distill", "dm+dkkt", "--distill-every", "1", "--ipc", "2", "--iterations", "3"]
    args += ["--distill-option", "batch_real=8", "--compare", "random,dsv", "--eval-runs", "1", "--eval-epochs", "5"]
    args += ["--distill-allocation", "federated"]  # per-class counts from the devices' K-means statistics
    assert main(args) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    final_model = json.loads((out / "global-model" / "model.json").read_text())
    for record in history[1:]:
        artifact = out / "distilled" / f"round-{record['round']:04d}-dm+dkkt"
        manifest = read_manifest(artifact)
        assert manifest["round"] == record["round"] and manifest["method"] == "dm+dkkt"
        assert manifest["global_model_accuracy"] == record["accuracy"]
        assert manifest["real_images_seen"] == 100  # pipc 10 x 10 classes, never more
        assert 0.0 <= record["distilled_accuracy"] <= 1.0
        assert len(load_distilled_set(artifact)) == 20
        assert record["diversity_devices"] == 3  # every device sent valid statistics
        allocation = manifest["allocation"]
        assert allocation["source"] == "federated" and sum(allocation["counts"].values()) == 20
        assert record["distill_counts"] == allocation["counts"]
        # merged over the 3 devices: every private training image of a class is counted
        assert sum(allocation["images_per_class_measured"]) > 1000
    assert manifest["global_model_sha256"] == final_model["sha256"]  # the last round used the final model
    first = read_manifest(out / "distilled" / "round-0001-dm+dkkt")
    assert first["global_model_sha256"] != final_model["sha256"]  # ... and round 1 the model of round 1
    printed = capsys.readouterr().out
    assert "global model (FedAvg, 2 rounds)" in printed and "dm+dkkt (server round)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [m["method"] for m in summary["methods"]] == ["random", "dsv", "dm+dkkt"]
    assert read_manifest(out / "compare" / "dsv")["global_model_sha256"] == final_model["sha256"]
    assert (out / "spectra.png").stat().st_size > 1000


@pytest.mark.e2e
def test_flwr_run_of_the_project_on_flowers_own_local_simulation_superlink(tmp_path):
    """`flwr run . local`: Flower's default connection starts a simulation SuperLink of its own."""
    bin_dir = Path(sys.executable).parent
    http_port, control_port = free_ports(2)
    env = {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(tmp_path / "home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = tmp_path / "out"
    config = f"num-rounds=1 min-train-nodes=3 min-available-nodes=3 out-dir='{out}' pipc='10' lr=0.05"
    command = [str(bin_dir / "flwr"), "run", str(PROJECT_ROOT), "local", "--run-config", config]
    command += ["--federation-config", "num-supernodes=3", "--stream"]
    try:
        run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        printed = run.stdout + run.stderr
        assert run.returncode == 0 and (out / "metrics.json").exists(), printed[-3000:]
        history = json.loads((out / "metrics.json").read_text())["history"]
        assert [h["round"] for h in history] == [0, 1] and history[1]["clients_ok"] == 3
        assert "round   1: global accuracy" in printed  # the ServerApp's progress line, streamed
        assert "deprecat" not in printed.lower()
    finally:  # Flower leaves its managed SuperLink running, detached, in a session of its own
        for stat in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError, ProcessLookupError):
                command_line = stat.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "flower-superlink" in command_line and f"--port {http_port}" in command_line:
                    os.killpg(int(stat.parent.name), signal.SIGTERM)
