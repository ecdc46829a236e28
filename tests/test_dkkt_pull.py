import json

import pytest
import torch

from simulations import dkkt_pull


def run(tmp_path, model, *extra):
    out = tmp_path / "pull"
    args = ["--dataset", "digits", "--global-model", str(model), "--ipc", "2", "--pipc", "20", "--draws", "2"]
    assert dkkt_pull.main([*args, "--out", str(out), *extra]) == 0
    return json.loads((out / "pull.json").read_text())["rows"]


def test_the_dkkt_pull_scales_with_w_kkt_and_vanishes_at_zero(digits_model, tmp_path):
    recipes = "w0: w_kkt=0,kkt_aug_weight=0 | w1: w_kkt=1,kkt_aug_weight=0 | w3: w_kkt=3,kkt_aug_weight=0"
    rows = {r["recipe"]: r for r in run(tmp_path, digits_model, "--recipes", recipes)}
    assert rows["w0"]["dkkt_over_dm"] == 0
    assert rows["w1"]["dkkt_over_dm"] > 0
    # the same images and seeded draws: three times the weight is three times the pull, same direction
    assert rows["w3"]["dkkt_over_dm"] == pytest.approx(3 * rows["w1"]["dkkt_over_dm"], rel=1e-4)
    assert rows["w3"]["cosine"] == pytest.approx(rows["w1"]["cosine"], abs=1e-4)
    assert len({r["dm_grad_norm"] for r in rows.values()}) == 1


def test_it_also_measures_at_a_kept_set_and_refuses_one_of_another_task(digits_model, tmp_path):
    first = run(tmp_path, digits_model)
    start = dkkt_pull.make_task(dkkt_pull.load_dataset("digits"), 2, "20", progress=False)
    images, labels = dkkt_pull.initial_images(start, "real")
    kept = tmp_path / "dm.pt"
    torch.save({"images": images + 0.5, "labels": labels}, kept)
    rows = run(tmp_path, digits_model, "--at", str(kept))
    assert [r["at"] for r in rows] == ["public-subset start"] * 2 + [str(kept)] * 2
    assert rows[:2] == first  # the start rows do not depend on what else is measured
    assert rows[2]["dm_grad_norm"] != rows[0]["dm_grad_norm"]
    torch.save({"images": images, "labels": labels.flip(0)}, kept)
    with pytest.raises(SystemExit, match="labels are not this task's"):
        run(tmp_path, digits_model, "--at", str(kept))
