"""Real Flower simulations (Simulation Engine on Ray) on the bundled digits."""

import json

import pytest

pytest.importorskip("ray")

from server.federation import FederationConfig  # noqa: E402
from simulations.simulate import run_simulated_fleet  # noqa: E402


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
