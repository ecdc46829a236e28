"""The generator benchmark end to end on digits, at a size that runs in seconds."""

from __future__ import annotations

import json
import statistics

import pytest

from common.report import Cells, format_accuracy
from simulations import bench_generator

OPTIONS = {
    "log_every": 1,
    "width": 16,
    "batch_size": 32,
    "match_batch": 16,
    "pool_steps": 1,
    "select_every": 2,
    "select_per_class": 5,
    "select_ipc": 2,
    "select_epochs": 2,
}
SETS = [arg for key, value in OPTIONS.items() for arg in ("--set", f"{key}={value}")]


def test_each_variant_keeps_its_own_stage_2_and_every_cell_is_reported(tmp_path):
    out = tmp_path / "bench"
    argv = ["--dataset", "digits", "--stage1-steps", "4", "--stage2-steps", "2", *SETS, "--ipcs", "1"]
    argv += ["--runs", "1", "--epochs", "2", "--dim-epochs", "2", "--cross-archs", "", "--out", str(out)]
    assert bench_generator.main(argv) == 0

    weights, chosen = {}, {}
    for name in ("cgan", "logit", "global-local"):
        meta = json.loads((out / "generators" / name / "generator.json").read_text())
        weights[name] = meta["sha256"]
        chosen[name] = meta["selection"]["chosen"]["2"]["step"]
        assert [step for step, stage, _ in meta["selection"]["history"] if stage == 2] == [6]
        # its own two stage-2 steps only (one stage-1 state seeds all three: nothing may leak between them)
        assert [step for step, _ in meta["loss_curves"]["g_total"] if step > 4] == [5, 6]
    # the selection picks among stage 2's own states: the variants cannot all fall back to the shared CGAN
    assert len(set(weights.values())) == 3, weights
    assert set(chosen.values()) == {6}

    cells = Cells(out / "cells.json")
    for variant in ("cgan", "logit", "global+local"):
        for protocol in ("fixed", "dim"):
            cell = cells.get({"variant": variant, "ipc": 1, "arch": "convnet3", "protocol": protocol})
            assert cell is not None and 0.0 <= cell["mean"] <= 1.0
    table = (out / "table.md").read_text()
    assert "DiM protocol" in table and "global+local" in table and "2: 6," in table
    assert "ipc 10, fixed set" not in table  # --cross-archs "": no empty cross-architecture table


def test_a_rerun_reuses_kept_generators_without_stage_1_and_refuses_other_options(tmp_path):
    out = tmp_path / "bench"
    argv = ["--dataset", "digits", "--stage1-steps", "4", "--stage2-steps", "2", *SETS, "--ipcs", "1,2"]
    argv += ["--runs", "1", "--epochs", "1", "--dim-variants", "", "--cross-archs", "", "--variants", "cgan,logit"]
    assert bench_generator.main([*argv, "--out", str(out)]) == 0
    # ipc-major, so that a run cut short leaves whole columns of the table
    order = [(c["variant"], c["ipc"]) for c in Cells(out / "cells.json").done]
    assert order == [(v, ipc) for ipc in (1, 2) for v in ("random real", "cgan", "logit")]
    kept = (out / "generators" / "logit" / "generator.json").read_text()

    # the generators are what a results folder keeps; without stage1.pt a rerun must not train stage 1 again
    (out / "stage1.pt").unlink()
    (out / "cells.json").unlink()
    assert bench_generator.main([*argv, "--out", str(out)]) == 0
    assert not (out / "stage1.pt").exists()
    assert (out / "generators" / "logit" / "generator.json").read_text() == kept
    assert len(Cells(out / "cells.json").done) == 6  # random real, cgan and logit at ipc 1 and 2, evaluated again

    # a cell is keyed by what its figure depends on: other protocol flags measure anew instead of reusing it
    runs = argv.index("--runs") + 1
    assert bench_generator.main([*argv[:runs], "2", *argv[runs + 1 :], "--out", str(out)]) == 0
    cells = Cells(out / "cells.json")
    assert len(cells.done) == 12
    assert len(cells.latest({"variant": "logit", "ipc": 1})["accuracies"]) == 2

    # --report prints what is there: no evaluation, and a variant without a kept generator is left out
    (out / "table.md").unlink()
    every = [*argv[: argv.index("--variants")], "--variants", "cgan,logit,global+local", "--runs", "2"]
    assert bench_generator.main([*every, "--out", str(out), "--report"]) == 0
    assert len(Cells(out / "cells.json").done) == 12 and not (out / "generators" / "global-local").exists()
    assert "logit" in (out / "table.md").read_text() and "global+local" not in (out / "table.md").read_text()

    # a kept generator trained with other options is refused, not silently reused
    other = [*argv[: argv.index("--ipcs")], "--set", "w_global=0.05", *argv[argv.index("--ipcs") :]]
    with pytest.raises(SystemExit, match=r"trained with other options \(w_global\)"):
        bench_generator.main([*other, "--out", str(out)])


def test_a_stage_2_ablation_reuses_the_kept_stage_1_and_a_stage_1_change_is_refused(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--dataset", "digits", "--stage1-steps", "4", "--stage2-steps", "2", *SETS, "--ipcs", "1"]
    argv += ["--runs", "1", "--epochs", "1", "--dim-variants", "", "--cross-archs", "", "--out", str(out)]
    assert bench_generator.main([*argv, "--variants", "cgan"]) == 0
    kept = (out / "stage1.pt").read_bytes()
    assert "stage 1: 4 steps" in capsys.readouterr().out

    # w_local and lr_stage2 are read by stage 2 only: the ablation starts from the same CGAN, untrained again
    ablation = [*argv, "--set", "w_local=0.01", "--set", "lr_stage2=1e-4", "--variants", "global+local"]
    assert bench_generator.main(ablation) == 0
    assert "stage 1:" not in capsys.readouterr().out
    assert (out / "stage1.pt").read_bytes() == kept
    meta = json.loads((out / "generators" / "global-local" / "generator.json").read_text())
    assert meta["method_options"]["w_local"] == 0.01
    assert [step for step, _ in meta["loss_curves"]["g_total"] if step > 4] == [5, 6]

    # an option stage 1 reads is refused with the fix named, and stage1.pt is left as it was
    with pytest.raises(SystemExit, match=r"stage 1 trained with other options \(batch_size\)"):
        bench_generator.main([*argv, "--set", "batch_size=16", "--variants", "logit"])
    assert (out / "stage1.pt").read_bytes() == kept


def test_stage_2_seeds_repeat_every_variant_and_the_tables_pair_them(tmp_path):
    out = tmp_path / "bench"
    argv = ["--dataset", "digits", "--stage1-steps", "4", "--stage2-steps", "2", *SETS, "--ipcs", "1", "--runs", "1"]
    argv += ["--epochs", "1", "--dim-variants", "", "--cross-archs", "", "--variants", "cgan,logit"]
    assert bench_generator.main([*argv, "--stage2-seeds", "0,1", "--out", str(out)]) == 0
    shas = {}
    for name in ("cgan", "logit", "cgan-seed1", "logit-seed1"):
        meta = json.loads((out / "generators" / name / "generator.json").read_text())
        shas[name] = meta["sha256"]
        assert meta["method_options"]["stage2_seed"] == (1 if name.endswith("seed1") else 0)
    assert len(set(shas.values())) == 4, shas

    cells = Cells(out / "cells.json")
    means = {}
    for variant in ("cgan", "logit"):
        seeds = [cells.get({"variant": variant, "ipc": 1, "stage2_seed": s})["mean"] for s in (0, 1)]
        means[variant] = seeds
        average, spread = statistics.mean(seeds), statistics.stdev(seeds)
        assert f"| {variant} " in (table := (out / "table.md").read_text())
        assert format_accuracy(average, spread) in table  # the seed-averaged row: mean and std across seeds
    difference = [100 * (a - b) for a, b in zip(means["logit"], means["cgan"])]
    assert f"{statistics.mean(difference):+.2f} ± {statistics.stdev(difference):.2f}" in table
    assert "paired by stage-2 seed" in table and "logit seed 1" in table

    # a generator kept by the code before the streams split is refused, not mixed into a new table
    kept = out / "generators" / "logit" / "generator.json"
    meta = json.loads(kept.read_text())
    del meta["method_options"]["stage2_seed"]
    kept.write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="own random stream"):
        bench_generator.main([*argv, "--stage2-seeds", "0,1", "--out", str(out), "--report"])
    with pytest.raises(SystemExit, match="distinct integers"):
        bench_generator.main([*argv, "--stage2-seeds", "0,0", "--out", str(out)])


def test_term_gradients_reach_the_generator_in_proportion_to_their_weight(tmp_path):
    from simulations import generator_gradients

    out = tmp_path / "bench"
    argv = ["--dataset", "digits", "--stage1-steps", "4", "--stage2-steps", "2", *SETS, "--ipcs", "1", "--runs", "1"]
    argv += ["--epochs", "1", "--dim-variants", "", "--cross-archs", "", "--variants", "cgan", "--out", str(out)]
    assert bench_generator.main(argv) == 0
    grads = tmp_path / "grads"
    assert (
        generator_gradients.main(
            ["--dataset", "digits", "--stage1", str(out / "stage1.pt"), "--stage1-steps", "4", *SETS]
            + ["--w-locals", "0.1,0.2", "--steps", "1", "--out", str(grads)]
        )
        == 0
    )
    terms = json.loads((grads / "gradients.json").read_text())["terms"]
    low, high = terms["0.1"], terms["0.2"]
    assert low["cgan"]["ratio"] == pytest.approx(1.0) and low["cgan"]["cosine"] == pytest.approx(1.0)
    # the same first stage-2 step: the CGAN and global gradients agree, the local one doubles with w_local
    assert high["cgan"]["norm"] == pytest.approx(low["cgan"]["norm"], rel=1e-5)
    assert high["global"]["norm"] == pytest.approx(low["global"]["norm"], rel=1e-5) and low["global"]["norm"] > 0
    assert low["local"]["norm"] > 0
    assert high["local"]["norm"] == pytest.approx(2 * low["local"]["norm"], rel=1e-4)


def test_extra_variants_run_on_the_shared_cgan_and_are_paired_with_it(tmp_path):
    out = tmp_path / "bench"
    argv = ["--dataset", "digits", "--stage1-steps", "4", "--stage2-steps", "2", *SETS, "--ipcs", "1", "--runs", "1"]
    argv += ["--epochs", "40", "--dim-variants", "", "--cross-archs", "", "--variants", "cgan", "--out", str(out)]
    extra = ["--extra-variants", "norm: match_scale=cgan-gradient,w_global=0.3,w_local=0", "--stage2-seeds", "0,1"]
    assert bench_generator.main([*argv, *extra]) == 0
    meta = json.loads((out / "generators" / "norm-seed1" / "generator.json").read_text())
    options = meta["method_options"]
    assert (options["match_scale"], options["w_global"], options["w_local"], options["stage2_seed"]) == (
        "cgan-gradient",
        0.3,
        0,
        1,
    )
    assert "weight_global" in meta["loss_curves"] and meta["pool_drawn"]

    cells = Cells(out / "cells.json")
    gaps = [
        100
        * (
            cells.get({"variant": "norm", "stage2_seed": s})["mean"]
            - cells.get({"variant": "cgan", "stage2_seed": s})["mean"]
        )
        for s in (0, 1)
    ]
    assert any(gaps), gaps  # the variants' samples differ: the pairing below has figures to pair
    table = (out / "table.md").read_text()
    assert "extra variants norm: match_scale=cgan-gradient, w_global=0.3, w_local=0.0" in table
    assert f"| norm - cgan (fixed)            | {statistics.mean(gaps):+.2f} ± {statistics.stdev(gaps):.2f}" in table

    bad = {
        "not stage-2 options": ["--extra-variants", "wide: width=64"],
        "new name": ["--extra-variants", "logit: w_global=1"],
        "--pairs item": [*extra, "--pairs", "norm vs nothing"],
        "match_scale": ["--extra-variants", "odd: match_scale=sum"],
    }
    for message, flags in bad.items():
        with pytest.raises(SystemExit, match=message):
            bench_generator.main([*argv, *flags])
