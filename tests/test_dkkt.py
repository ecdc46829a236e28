import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from common.datasets import DATASETS
from common.errors import ConfigError
from common.modelio import save_model
from common.models import build_model
from server.methods.dkkt import DKKTLoss, DKKTOptions, select_parameters, stationarity_loss
from server.methods.dsv import averaged_runs
from server.methods.registry import distill, make_config, make_task


def brute_force_stationarity(model, params, x, y, lam):
    """sum_i lam_i grad CE_i from one backward per sample, then mean |theta + sum|."""
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        ce = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(ce, params)
        total = [t + lam[i] * g for t, g in zip(total, grads)]
    entries = sum((p.detach() + t).abs().sum() for p, t in zip(params, total))
    return entries / sum(p.numel() for p in params)


@pytest.mark.parametrize("which", ["all", "last"])
def test_stationarity_term_equals_the_per_sample_computation(which):
    torch.manual_seed(0)
    model = build_model("convnet3", 1, 10, 8, width=8).eval()
    params = [p for _, p in select_parameters(model, which)]
    x, y, lam = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 3, 9]), torch.rand(6) * 3
    fast, _, _ = stationarity_loss(model, params, x, y, lam)
    slow = brute_force_stationarity(model, params, x, y, lam)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-7)
    assert float(fast.detach()) > 0


def test_stationarity_gradient_reaches_images_and_multipliers():
    torch.manual_seed(0)
    model = build_model("convnet3", 1, 10, 8, width=8).eval()
    params = list(model.parameters())
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    lam = torch.ones(4, requires_grad=True)
    loss, _, _ = stationarity_loss(model, params, x, torch.arange(4), lam)
    loss.backward(inputs=[x, lam])
    assert x.grad.abs().sum() > 0 and lam.grad.abs().sum() > 0
    assert all(p.grad is None for p in params)  # the global model is never touched


def test_multipliers_stay_non_negative(digits, digits_model):
    task = make_task(digits, 2, pipc=10, seed=0, progress=False)
    labels = torch.arange(10).repeat_interleave(2)
    term = DKKTLoss(task, DKKTOptions(global_model=str(digits_model), lambda_lr=50.0, kkt_aug_weight=0), labels)
    assert term.lambda0 == pytest.approx(1 / (20 * 5e-4))  # the weight-decay rule, 1 / (M wd)
    syn = task.real.images[:20].clone().requires_grad_(True)
    for t in range(3):
        term.backward(syn, t)
        term.after_step()
        assert float(term.lam.detach().min()) >= 0
    assert bool((term.lam == 0).any())  # steps this large would have gone negative without the clamp


def test_dm_dkkt_with_zero_weight_is_exactly_dm(digits, digits_model):
    task = make_task(digits, 2, pipc=10, seed=4, progress=False)
    options = dict(iterations=6, batch_real=8)
    dm = distill("dm", task, options)
    combined = distill("dm+dkkt", task, {**options, "w_kkt": 0.0, "global_model": str(digits_model)})
    assert torch.equal(dm.images, combined.images)
    assert dm.manifest["loss_curve"] == combined.manifest["loss_curve"]


def test_dm_dkkt_changes_the_images_and_records_the_global_model(digits, digits_model):
    task = make_task(digits, 2, pipc=10, seed=4, progress=False)
    options = dict(iterations=4, batch_real=8, global_model=str(digits_model))
    dm = distill("dm+dkkt", task, {**options, "w_kkt": 0.0})
    combined = distill("dm+dkkt", task, {**options, "w_kkt": 100.0})
    assert not torch.equal(dm.images, combined.images)
    meta = json.loads((digits_model / "model.json").read_text())
    assert combined.manifest["global_model_sha256"] == meta["sha256"]
    assert set(combined.manifest["loss_terms"]) == {"dm", "dkkt"}
    assert combined.manifest["real_images_seen"] == 100 and combined.manifest["real_images_used_this_run"] <= 100


def test_dsv_lowers_the_kkt_loss(digits, digits_model):
    task = make_task(digits, 2, pipc=10, seed=1, progress=False)
    out = distill("dsv", task, {"iterations": 30, "lr_img": 0.05, "log_every": 5, "global_model": str(digits_model)})
    curve = [loss for _, loss in out.manifest["loss_curve"]]
    assert curve[-1] < curve[0]
    assert out.manifest["lambda_min"] >= 0 and out.images.shape == (20, 1, 8, 8)


def test_dsv_dm_avg_is_the_mean_of_both_runs(digits, digits_model):
    task = make_task(digits, 1, pipc=5, seed=2, progress=False)
    model = str(digits_model)
    avg = distill("dsv-dm-avg", task, {"iterations": 3, "dsv_iterations": 3, "global_model": model})
    dm = distill("dm", task, {"iterations": 3})
    dsv = distill("dsv", task, {"iterations": 3, "global_model": model})
    assert torch.equal(avg.images, (dm.images + dsv.images) / 2)  # bit for bit: a benchmark reuses dm's and dsv's sets
    dm_config, dsv_config = averaged_runs(make_config("dsv-dm-avg", {"iterations": 3, "global_model": model}))
    assert dm_config == make_config("dm", {"iterations": 3})
    assert dsv_config == make_config("dsv", {"iterations": 1000, "global_model": model})


def test_dkkt_methods_refuse_a_missing_or_mismatched_model(digits, tmp_path):
    task = make_task(digits, 1, pipc=5, progress=False)
    with pytest.raises(ConfigError, match="--global-model"):
        distill("dsv", task, {"iterations": 1})
    other = build_model("convnet3", 3, 10, 8)
    save_model(tmp_path / "rgb", other, _info(digits, channels=3), {})  # no weight decay recorded either
    with pytest.raises(ConfigError, match="expects"):
        distill("dsv", task, {"iterations": 1, "global_model": str(tmp_path / "rgb")})
    save_model(tmp_path / "nowd", build_model("convnet3", 1, 10, 8), digits.info, {})
    with pytest.raises(ConfigError, match="--lambda-init"):
        distill("dsv", task, {"iterations": 1, "global_model": str(tmp_path / "nowd")})


def _info(data, **changes):
    from dataclasses import replace

    return replace(data.info, **changes)


def test_spectrum_of_a_constant_image_is_all_low_frequency():
    from common.visualize import mean_log_spectrum

    spectrum = mean_log_spectrum(torch.ones(3, 1, 8, 8))
    assert spectrum.shape == (8, 8) and float(spectrum[4, 4]) > 0
    assert float(spectrum.sum() - spectrum[4, 4]) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("dsv_init", [0, 4])
def test_dm_dkkt_resumes_exactly_including_the_multipliers(digits, digits_model, tmp_path, dsv_init):
    from server.methods.dsv import DMDKKTConfig, run_dm_dkkt

    config = dict(iterations=8, checkpoint_every=3, batch_real=8, log_every=2, global_model=str(digits_model))
    config["init_dsv_iterations"] = dsv_init
    full = run_dm_dkkt(make_task(digits, 1, pipc=10, seed=5, progress=False), DMDKKTConfig(**config))
    task = make_task(digits, 1, pipc=10, seed=5, progress=False, workdir=tmp_path)

    def crash(t, loss):
        if t == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dm_dkkt(task, DMDKKTConfig(**config), on_iteration=crash)
    resumed = run_dm_dkkt(task, DMDKKTConfig(**config, resume=True))
    assert resumed.extra["resumed_from"] == 3
    assert torch.equal(resumed.images, full.images)
    assert resumed.extra["lambda_mean"] == full.extra["lambda_mean"]
    assert resumed.extra["loss_terms"] == full.extra["loss_terms"]


def test_a_time_limit_stops_the_run_early_with_a_note(digits, digits_model):
    task = make_task(digits, 1, pipc=10, seed=0, progress=False)
    out = distill("dsv", task, {"iterations": 10_000, "time_limit": 0.2, "global_model": str(digits_model)})
    assert out.manifest["iterations"] < 10_000 and "time limit" in out.manifest["stopped_early"]
    assert out.counts() == task.counts


def test_dsv_from_noise_reads_no_real_image(digits, digits_model):
    from common.datasets import Split

    task = make_task(digits, 1, pipc=5, seed=0, progress=False)
    poisoned = Split(torch.full_like(task.real.images, float("nan")), task.real.labels)
    task.real = poisoned  # any read of a real image would turn the result into NaN
    out = distill("dsv", task, {"iterations": 3, "init": "noise", "global_model": str(digits_model)})
    assert torch.isfinite(out.images).all()


def test_published_dkkt_loss_is_one_augmented_pass_unless_the_clean_term_is_asked_for(digits, digits_model):
    task = make_task(digits, 2, pipc=10, seed=0, progress=False)
    labels = torch.arange(10).repeat_interleave(2)
    syn = task.real.images[:20].clone().requires_grad_(True)
    passes = {}
    for clean in (False, True):
        term = DKKTLoss(task, DKKTOptions(global_model=str(digits_model), kkt_clean_term=clean), labels)
        seen = []
        term.model.register_forward_hook(lambda module, inputs, output, seen=seen: seen.append(inputs[0].detach()))
        passes[clean] = (term.loss(syn, 0), seen)
    published, (augmented,) = passes[False]  # one forward, on an augmented copy
    with_clean, (augmented_again, clean_input) = passes[True]
    assert not torch.allclose(augmented, syn) and torch.equal(augmented, augmented_again)  # same draw for t = 0
    assert torch.equal(clean_input, syn.detach())
    clean_only = DKKTLoss(task, DKKTOptions(global_model=str(digits_model), kkt_aug_weight=0), labels).loss(syn, 0)
    assert float(with_clean) == pytest.approx(float(published) + float(clean_only), rel=1e-5)


def test_the_weight_decay_rule_makes_an_exactly_trained_classifier_stationary():
    """Convex last layer: mean CE + wd/2 |theta|^2 minimised to machine precision on N samples."""
    from server.methods.dkkt import lambda_from_weight_decay

    torch.manual_seed(0)
    n, wd = 60, 1e-2
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    model = torch.nn.Linear(5, 3).double()
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + wd / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(10):
        optimizer.step(closure)
    params = list(model.parameters())
    lam = torch.full((n,), lambda_from_weight_decay(n, wd), dtype=torch.float64)
    at_rule, _, _ = stationarity_loss(model, params, x, y, lam)
    scale = sum(p.abs().sum() for p in params) / sum(p.numel() for p in params)
    assert float(at_rule) < 1e-6 * float(scale)  # theta* + sum_i lambda_i grad CE_i = 0
    for wrong in (lam * 2, lam / 2, -lam):  # another scale, or the opposite sign, is far from stationary
        assert float(stationarity_loss(model, params, x, y, wrong)[0]) > 0.1 * float(scale)


def test_the_primal_term_counts_only_misclassified_samples():
    from server.methods.dkkt import primal_loss

    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1])  # the first is right, the other two wrong
    ce = F.cross_entropy(logits, y, reduction="none")
    primal, accuracy = primal_loss(logits, ce, y)
    assert float(primal) == pytest.approx(float(ce[1:].sum()) / 3) and float(accuracy) == pytest.approx(1 / 3)
    primal.backward()
    assert float(logits.grad[0].abs().sum()) == 0 and float(logits.grad[1:].abs().sum()) > 0


def test_the_augmentation_weight_scales_the_published_loss(digits, digits_model):
    task = make_task(digits, 2, pipc=10, seed=0, progress=False)
    labels = torch.arange(10).repeat_interleave(2)
    syn = task.real.images[:20].clone().requires_grad_(True)
    losses = [
        float(DKKTLoss(task, DKKTOptions(global_model=str(digits_model), kkt_aug_weight=w), labels).loss(syn, 3))
        for w in (1.0, 5.0)
    ]
    assert losses[1] == pytest.approx(5 * losses[0], rel=1e-6) and losses[0] > 0


def test_kkt_batch_rescales_the_multipliers_to_the_whole_set(digits, digits_model):
    """Identical images: a subset of B with lambda x M / B has exactly the stationarity sum of all M."""
    task = make_task(digits, 2, pipc=10, seed=0, progress=False)
    labels = torch.zeros(12, dtype=torch.int64)
    syn = task.real.images[:1].repeat(12, 1, 1, 1).requires_grad_(True)
    options = DKKTOptions(global_model=str(digits_model), kkt_aug_weight=0)
    full = float(DKKTLoss(task, options, labels).loss(syn, 0))
    for batch in (3, 4, 6):
        sub = float(DKKTLoss(task, replace(options, kkt_batch=batch), labels).loss(syn, 0))
        assert sub == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize(
    ("kind", "expected"), [("warmup", [0.5, 1.0, 1.5, 2.0, 2.0]), ("decay", [2.0, 2.0, 1.5, 1.0, 0.5])]
)
def test_the_w_kkt_schedule_ramps_over_its_share_of_the_run(kind, expected):
    from server.methods.dkkt import WeightSchedule

    schedule = WeightSchedule(2.0, kind, ramp=0.8, iterations=5)
    assert [schedule.at(t) for t in range(5)] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="constant, warmup or decay"):
        WeightSchedule(1.0, "cosine")


def test_a_warmup_schedule_scales_the_dkkt_term_of_the_run(digits, digits_model):
    task = make_task(digits, 1, pipc=10, seed=3, progress=False)
    options = dict(iterations=4, batch_real=8, log_every=1, w_kkt=10.0, global_model=str(digits_model))
    constant = distill("dm+dkkt", task, options)
    warmup = distill("dm+dkkt", task, {**options, "w_kkt_schedule": "warmup", "w_kkt_ramp": 1.0})
    first_constant = constant.manifest["loss_terms"]["dkkt"][0][1]
    assert warmup.manifest["loss_terms"]["dkkt"][0][1] == pytest.approx(first_constant / 4, rel=1e-5)  # weight 10/4
    assert constant.manifest["loss_terms"]["dm"][0] == warmup.manifest["loss_terms"]["dm"][0]
    assert not torch.equal(constant.images, warmup.images)


def test_dsv_initialised_dm_starts_from_the_dsv_images(digits, digits_model):
    task = make_task(digits, 1, pipc=10, seed=6, progress=False)
    model = str(digits_model)
    dsv = distill("dsv", task, {"iterations": 5, "lr_img": 0.05, "global_model": model})
    start = distill(
        "dm+dkkt",
        task,
        {"iterations": 0, "init_dsv_iterations": 5, "init_dsv_lr": 0.05, "recipe": "published", "global_model": model},
    )
    assert torch.equal(start.images, dsv.images)
    assert start.manifest["dsv_init"]["iterations"] == 5
    plain = distill("dm+dkkt", task, {"iterations": 0, "global_model": model})
    assert not torch.equal(plain.images, dsv.images)


def test_a_dsv_start_spends_dm_dkkts_time_limit(digits, digits_model, monkeypatch):
    import types

    from server.methods import pixel_loop

    ticks = iter(range(10**6))  # a clock where every optimisation step takes exactly 1 s
    monkeypatch.setattr(pixel_loop, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    task = make_task(digits, 1, pipc=10, seed=6, progress=False)
    options = {"iterations": 10, "init_dsv_iterations": 4, "time_limit": 6.0, "global_model": str(digits_model)}
    out = distill("dm+dkkt", task, options)
    assert out.manifest["dsv_init"]["iterations"] == 4  # 4 s of the 6 s limit ...
    assert out.manifest["iterations"] == 2 and "after 2 iterations" in out.manifest["stopped_early"]  # ... 2 s left


def test_dm_dkkt_starts_from_the_datasets_validated_recipe_and_the_caller_wins(digits, digits_model):
    from server.methods.recipes import apply_recipe, recipe_for

    task = make_task(digits, 1, pipc=10, seed=2, progress=False)
    base = {"iterations": 3, "batch_real": 8, "global_model": str(digits_model)}
    validated = distill("dm+dkkt", task, base)
    recipe = recipe_for("digits", 1).options
    assert {k: validated.manifest["options"][k] for k in recipe} == recipe
    assert validated.manifest["recipe"]["recipe"] == "validated" and validated.manifest["recipe"]["command"]
    published = distill("dm+dkkt", task, {**base, "recipe": "published"})
    assert published.manifest["options"]["kkt_aug_weight"] == 5.0 and published.manifest["options"]["w_kkt"] == 1.0
    assert published.manifest["recipe"] == {"recipe": "published", "why": "asked for"}
    assert not torch.equal(validated.images, published.images)
    mine = distill("dm+dkkt", task, {**base, "w_kkt": 0.5})
    assert mine.manifest["options"]["w_kkt"] == 0.5 and mine.manifest["options"]["kkt_clean_term"] is True
    assert mine.manifest["recipe"]["overridden_by_caller"] == ["w_kkt"]
    other = replace(task, info=replace(task.info, name="npz-of-my-own"))
    assert apply_recipe(other, {"w_kkt": 2.0}) == (
        {"w_kkt": 2.0},
        {"recipe": "published", "why": "no validated recipe for 'npz-of-my-own'"},
    )
    with pytest.raises(ConfigError, match="use validated"):
        distill("dm+dkkt", task, {**base, "recipe": "best"})


def test_every_stored_recipe_is_a_valid_dm_dkkt_config_with_its_evidence():
    from server.methods import recipes

    for dataset, stored in recipes.VALIDATED.items():
        assert dataset in DATASETS, dataset
        assert sorted(r.chosen_at["ipc"] for r in stored) == sorted({r.chosen_at["ipc"] for r in stored})
        for recipe in stored:
            config = make_config("dm+dkkt", recipe.options)  # an unknown or mistyped key fails here
            assert all(getattr(config, k) == v for k, v in recipe.options.items())
            assert recipe.evidence and "--sweep-ipcs" in recipe.command and recipe.chosen_at["iterations"] >= 1000


def test_a_task_takes_the_recipe_swept_at_the_nearest_ipc(monkeypatch):
    from server.methods import recipes

    one, ten = (recipes.Recipe({"w_kkt": w}, "test", chosen_at={"ipc": i}) for w, i in ((10.0, 1), (1.0, 10)))
    monkeypatch.setitem(recipes.VALIDATED, "two-recipes", [one, ten])
    assert [recipes.recipe_for("two-recipes", ipc) for ipc in (1, 3, 8, 50)] == [one, one, ten, ten]
    assert recipes.recipe_for("none-measured", 10) is None


def stop_and_resume(digits, method: str, options: dict, stop_at: tuple[int, int], tmp_path):
    """Run ``method`` whole, then again cancelled at ``(total, done)`` of a loop's progress (as a killed job
    service leaves it) and resumed; returns the whole run, the resumed run and the checkpoints the cut left."""
    from server.methods.registry import Cancelled

    options = {**options, "checkpoint_every": 2, "log_every": 1, "batch_real": 8}

    def task(workdir):
        return make_task(digits, 1, pipc=10, seed=3, progress=False, workdir=workdir)

    whole = distill(method, task(tmp_path / "whole"), options)
    cut = task(tmp_path / "cut")
    cut.on_progress = lambda done, total, loss: (total, done) != stop_at  # False cancels the run there
    with pytest.raises(Cancelled):
        distill(method, cut, options)
    left = sorted(p.name for p in (tmp_path / "cut").glob("*-checkpoint.pt"))
    return whole, distill(method, task(tmp_path / "cut"), {**options, "resume": True}), left


@pytest.mark.parametrize("stop_at", [(4, 3), (6, 1)], ids=["during-the-dsv-start", "before-dm+dkkts-first-checkpoint"])
def test_a_dm_dkkt_run_stopped_in_or_just_after_its_dsv_start_resumes_to_the_uninterrupted_result(
    digits, digits_model, tmp_path, stop_at
):
    """Stopped there, the workdir holds the DSV start's checkpoint but none of dm+dkkt's own (the job
    service then claims the job again with resume on): the start continues, the main loop begins fresh."""
    options = {"iterations": 6, "init_dsv_iterations": 4, "global_model": str(digits_model)}
    whole, resumed, left = stop_and_resume(digits, "dm+dkkt", options, stop_at, tmp_path)
    assert left == ["dsv-checkpoint.pt"]
    assert torch.equal(resumed.images, whole.images)
    assert resumed.manifest["resumed_from"] is None and resumed.manifest["iterations"] == 6


def test_resume_without_any_checkpoint_of_a_dsv_started_run_names_the_fix(digits, digits_model, tmp_path):
    task = make_task(digits, 1, pipc=10, seed=3, progress=False, workdir=tmp_path)
    options = {"iterations": 2, "init_dsv_iterations": 2, "resume": True, "global_model": str(digits_model)}
    with pytest.raises(ConfigError, match="no DSV or DM\\+DKKT checkpoint .* run without --resume"):
        distill("dm+dkkt", task, options)


def test_dsv_dm_avg_stopped_in_its_dsv_run_before_a_checkpoint_resumes_to_the_uninterrupted_result(
    digits, digits_model, tmp_path
):
    options = {"iterations": 4, "dsv_iterations": 6, "global_model": str(digits_model)}
    whole, resumed, left = stop_and_resume(digits, "dsv-dm-avg", options, (6, 1), tmp_path)  # DM's run is done
    assert left == ["dm-checkpoint.pt"]
    assert torch.equal(resumed.images, whole.images)
    assert resumed.manifest["dm"]["resumed_from"] == 2 and resumed.manifest["dsv"]["resumed_from"] is None
