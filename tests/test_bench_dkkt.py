"""The DKKT benchmark's model selection: folds of the public subset, candidates, and the choice."""

from __future__ import annotations

import json

import pytest
import torch

from common.report import Cells
from server.methods.registry import make_task
from simulations.bench_dkkt import choose, parse_candidates, score_candidates, validation_split


def test_folds_hold_out_disjoint_public_images_the_method_never_sees(digits):
    task = make_task(digits, 2, pipc=30, seed=3, progress=False)
    held_rows = []
    for fold in range(3):
        trimmed, val = validation_split(task, 8, seed=3, fold=fold)
        assert len(val) == 80 and len(trimmed.real) == 220 and trimmed.pipc == 22
        assert all(int((val.labels == c).sum()) == 8 for c in range(10))
        seen = trimmed.real.images.flatten(1)
        assert not (seen[:, None] == val.images.flatten(1)[None]).all(-1).any()  # never trained on
        assert set(trimmed.real_indices.tolist()) <= set(task.real_indices.tolist())
        held_rows.append({tuple(x.tolist()) for x in val.images.flatten(1)})
    assert not (held_rows[0] & held_rows[1]) and not (held_rows[1] & held_rows[2])
    with pytest.raises(SystemExit, match="val-per-class"):
        validation_split(task, 10, seed=3, fold=2)  # 30 images: fold 2 would leave none to train on


def test_candidates_parse_to_typed_options_with_a_lambda_scale():
    text = "dm: w_kkt=0 | clean: w_kkt=10,kkt_clean_term=true,kkt_aug_weight=0 | l: lambda_scale=0.1"
    candidates = parse_candidates(text)
    assert candidates["dm"] == {"w_kkt": 0.0, "lambda_scale": 1.0}
    assert candidates["clean"] == {"w_kkt": 10.0, "kkt_clean_term": True, "kkt_aug_weight": 0.0, "lambda_scale": 1.0}
    assert candidates["l"] == {"lambda_scale": 0.1}
    with pytest.raises(SystemExit, match="NAME"):
        parse_candidates("w_kkt=1")


def cell(name: str, fold: int, accuracies: list[float], order: int, w: float) -> dict:
    mean = sum(accuracies) / len(accuracies)
    return {
        "ipc": 10,
        "candidate": name,
        "fold": fold,
        "options": {"w_kkt": w},
        "accuracies": accuracies,
        "mean": mean,
        "order": order,
    }


def test_choice_is_the_best_mean_over_folds_with_its_lead_in_standard_errors():
    cells = [
        cell("dm", 0, [0.80, 0.82], 0, 0.0),
        cell("dm", 1, [0.78, 0.80], 0, 0.0),
        cell("w1", 0, [0.86, 0.84], 1, 1.0),
        cell("w1", 1, [0.83, 0.85], 1, 1.0),
        cell("w10", 0, [0.90, 0.60], 2, 10.0),  # one lucky fold, one bad: lower mean
        cell("w10", 1, [0.70, 0.70], 2, 10.0),
        cell("other-ipc", 0, [0.99], 3, 5.0) | {"ipc": 1},
    ]
    scores = score_candidates(cells, 10)
    assert [s["candidate"] for s in scores] == ["dm", "w1", "w10"]
    w1 = scores[1]
    assert w1["mean"] == pytest.approx(0.845) and w1["folds"] == 2
    assert w1["std"] == pytest.approx(0.01 / 2**0.5)  # sample std of the fold means 0.85 and 0.84
    assert w1["seconds_per_iteration"] is None  # these cells were not timed
    timed = [c | {"seconds_per_iteration": s} for c, s in zip(cells[2:4], (0.2, 0.4), strict=True)]
    assert score_candidates(timed, 10)[0]["seconds_per_iteration"] == pytest.approx(0.3)  # the ablation's cost column
    chosen = choose(scores)
    assert chosen["candidate"] == "w1"
    lead = chosen["lead_over_dm"]
    paired_se = 0.01 / 2**0.5 / 2**0.5  # per-fold gaps 0.04 and 0.05: std 0.01 / sqrt(2), over sqrt(2 folds)
    assert lead["candidate"] == "dm" and lead["gap"] == pytest.approx(0.045)
    assert lead["in_sem"] == pytest.approx(0.045 / paired_se)
    assert chosen["lead_over_runner_up"]["candidate"] == "dm"
    # a hard fold lowers both candidates alike: the paired gap sees through it, the pooled SE would not
    shifted = [cell("dm", 0, [0.60], 0, 0.0), cell("dm", 1, [0.80], 0, 0.0)]
    shifted += [cell("w1", 0, [0.62], 1, 1.0), cell("w1", 1, [0.83], 1, 1.0)]
    scores = score_candidates(shifted, 10)
    lead = choose(scores)["lead_over_dm"]
    pooled = (scores[0]["sem"] ** 2 + scores[1]["sem"] ** 2) ** 0.5
    assert lead["in_sem"] == pytest.approx(0.025 / (0.01 / 2**0.5 / 2**0.5)) and lead["in_sem"] > 3
    assert 0.025 / pooled < 0.3
    # a tie goes to the earlier candidate (DM before any DKKT recipe)
    tie = choose(score_candidates([cell("dm", 0, [0.8], 0, 0.0), cell("w1", 0, [0.8], 1, 1.0)], 10))
    assert tie["candidate"] == "dm" and tie["lead_over_dm"] is None


def test_a_dsv_started_candidate_without_the_dkkt_term_is_not_taken_for_dm():
    dsv_start = {"w_kkt": 0.0, "init_dsv_iterations": 1000}
    cells = [
        cell("dsvinit-dm", 0, [0.86], 0, 0.0) | {"options": dsv_start},  # listed first: would be "dm" by w_kkt alone
        cell("dm", 0, [0.80], 1, 0.0),
        cell("w30", 0, [0.88], 2, 30.0),
    ]
    chosen = choose(score_candidates(cells, 10))
    assert chosen["candidate"] == "w30"
    assert chosen["lead_over_dm"]["candidate"] == "dm" and chosen["lead_over_dm"]["gap"] == pytest.approx(0.08)


def test_the_table_averages_the_kept_dm_and_dsv_sets_into_the_same_dsv_dm_avg_cell(tmp_path):
    from common.cli import main
    from common.report import Cells
    from simulations import bench_dkkt

    model = tmp_path / "model"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--device", "cpu", "--out", str(model)]) == 0
    common = ["--dataset", "digits", "--global-model", str(model), "--ipcs", "1", "--pipcs", "10"]
    common += ["--sweep-ipcs", "1", "--sweep-pipc", "10", "--val-folds", "1", "--val-per-class", "3"]
    common += ["--candidates", "dm: w_kkt=0", "--iterations", "3", "--runs", "1", "--sweep-runs", "1"]
    common += ["--epochs", "2", "--device", "cpu"]
    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    assert bench_dkkt.main([*common, "--methods", "dm,dsv,dsv-dm-avg", "--out", str(reused)]) == 0
    assert bench_dkkt.main([*common, "--methods", "dsv-dm-avg", "--out", str(fresh)]) == 0

    key = {"method": "dsv-dm-avg", "ipc": 1, "pipc": 10}
    averaged, ran = Cells(reused / "cells.json").get(key), Cells(fresh / "cells.json").get(key)
    assert "averaged from this cell's dm and dsv sets" in averaged["note"] and "note" not in ran
    assert averaged["accuracies"] == ran["accuracies"]  # the same set, so the same seeded evaluation
    assert (reused / "sets" / "pipc10-ipc1" / "dsv.pt").exists() and not (fresh / "sets").exists()


def test_a_cell_cut_mid_distillation_continues_from_its_checkpoint_to_the_uncut_result(digits, tmp_path, monkeypatch):
    from dataclasses import replace

    from common.commands import eval_config_from_args
    from simulations import bench_dkkt
    from simulations.time_dm import global_model_stand_in

    monkeypatch.setattr(bench_dkkt, "CHECKPOINT_EVERY", 4)
    args = bench_dkkt.parse_args(["--dataset", "digits", "--epochs", "2", "--device", "cpu", "--out", str(tmp_path)])
    args.runs_now, config, device = 1, eval_config_from_args(args), torch.device("cpu")
    task = make_task(digits, 1, pipc=10, seed=0, progress=False)
    model = str(global_model_stand_in(task, tmp_path / "model"))
    options = {"global_model": model, "w_kkt": 10.0, "iterations": 10, "log_every": 1}

    def cell(task, work):
        return bench_dkkt.run_cell(digits, task, "dm+dkkt", options, digits.test, args, config, device, work=work)

    uncut = cell(task, tmp_path / "uncut")

    def cut_at_6(done, total, loss):
        if done == 6:
            raise KeyboardInterrupt  # the session ends mid-cell

    work = bench_dkkt.cell_workdir(tmp_path, "pipc10", "ipc1", "dm+dkkt")
    with pytest.raises(KeyboardInterrupt):
        cell(replace(task, on_progress=cut_at_6), work)
    assert (work / "dm+dkkt-checkpoint.pt").exists()
    continued = cell(task, work)
    assert continued["resumed_from"] == 4 and "resumed_from" not in uncut
    assert continued["accuracies"] == uncut["accuracies"]  # the same set, so the same seeded evaluation
    assert not work.exists() and not (tmp_path / "uncut").exists()  # removed once the cell is done


def test_recipe_validated_skips_the_sweep_and_runs_the_datasets_validated_recipe(tmp_path):
    from common.cli import main
    from common.report import Cells
    from server.methods.recipes import VALIDATED
    from simulations import bench_dkkt

    model = tmp_path / "model"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--device", "cpu", "--out", str(model)]) == 0
    args = ["--dataset", "digits", "--global-model", str(model), "--ipcs", "1", "--pipcs", "10", "--methods", "dm+dkkt"]
    args += ["--recipe", "validated", "--iterations", "2", "--runs", "1", "--epochs", "2", "--device", "cpu"]
    assert bench_dkkt.main([*args, "--out", str(tmp_path / "out")]) == 0

    assert Cells(tmp_path / "out" / "sweep.json").done == []
    cell = Cells(tmp_path / "out" / "cells.json").get({"method": "dm+dkkt", "ipc": 1, "pipc": 10})
    digits_recipe = VALIDATED["digits"][0].options
    assert cell["recipe"] == "validated" and {k: cell["options"][k] for k in digits_recipe} == digits_recipe
    table = (tmp_path / "out" / "table.md").read_text()
    assert "validated recipe, not swept in this run" in table and "Sweep (" not in table  # no stale sweep table
    with pytest.raises(SystemExit, match="no validated recipe for 'npz-of-my-own'; run the sweep"):
        bench_dkkt.validated_choices("npz-of-my-own")


def test_a_table_cell_of_a_recipe_the_validation_no_longer_chooses_is_re_run_not_reused(tmp_path):
    from common.cli import main
    from simulations import bench_dkkt

    model = tmp_path / "model"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--device", "cpu", "--out", str(model)]) == 0
    args = ["--dataset", "digits", "--global-model", str(model), "--ipcs", "1", "--pipcs", "10", "--methods", "dm+dkkt"]
    args += ["--sweep-ipcs", "1", "--sweep-pipc", "10", "--val-folds", "1", "--val-per-class", "3", "--iterations", "2"]
    args += ["--runs", "1", "--sweep-runs", "1", "--epochs", "2", "--device", "cpu", "--out", str(tmp_path / "out")]

    def table_cell(candidates: str) -> dict:
        assert bench_dkkt.main([*args, "--candidates", candidates]) == 0
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        return Cells(tmp_path / "out" / "cells.json").latest({"method": "dm+dkkt"}), results

    first, _ = table_cell("w1: w_kkt=1")
    moved, results = table_cell("w3: w_kkt=3")  # the same --out: the sweep now chooses another recipe
    assert (first["recipe"], first["options"]["w_kkt"]) == ("w1", 1.0)
    assert (moved["recipe"], moved["options"]["w_kkt"]) == ("w3", 3.0)
    assert [c["options"]["w_kkt"] for c in results["cells"]] == [1.0, 3.0]
    back, _ = table_cell("w1: w_kkt=1")  # chosen again: its cell is reused and is the one the report shows
    assert back == first and len(Cells(tmp_path / "out" / "cells.json").done) == 3
