"""The generator method: networks, both stages, resume, the artifact and ``edgedistill generate``."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from common.artifacts import load_distilled_set
from common.datasets import DatasetInfo
from common.errors import ArtifactError, ConfigError
from server.methods.gan import (
    ACDiscriminator,
    ConditionalGenerator,
    GeneratorSampler,
    GeneratorShape,
    from_unit,
    load_generator,
    sample,
    save_generator,
    to_unit,
)
from server.methods.generator import (
    CHECKPOINT_FILE,
    GeneratorConfig,
    GeneratorTrainer,
    layer_choice,
    matching_losses,
    shared_augment,
    train_generator,
)
from server.methods.registry import make_task

TINY = dict(width=16, batch_size=32, match_batch=16, log_every=2, checkpoint_every=0)


def info_of(channels: int, size: int) -> DatasetInfo:
    return DatasetInfo("x", channels, size, 10, tuple(map(str, range(10))), (0.5,) * channels, (0.25,) * channels)


@pytest.mark.parametrize("arch", ["small", "dim"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 8)])
def test_generator_and_discriminator_shapes_and_ranges(channels, size, arch):
    shape = GeneratorShape(channels, size, 10, noise_dim=100, width=16, arch=arch)
    gen, disc = ConditionalGenerator(shape), ACDiscriminator(shape)
    labels = torch.arange(10).repeat(2)
    images = gen(torch.randn(20, 100) * 5, labels)
    assert images.shape == (20, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1
    critic, classes = disc(images)
    assert critic.shape == (20,) and classes.shape == (20, 10)
    info = info_of(channels, size)
    assert torch.allclose(to_unit(from_unit(images, info), info), images, atol=1e-5)


def test_sampling_is_deterministic_per_seed_and_honours_counts():
    info = info_of(1, 28)
    torch.manual_seed(0)
    gen = ConditionalGenerator(GeneratorShape.for_dataset(info, width=16))
    counts = {c: (c % 3) + 1 for c in range(10)}
    a_images, a_labels = sample(gen, counts, seed=7, info=info)
    b_images, _ = sample(gen, counts, seed=7, info=info)
    c_images, _ = sample(gen, counts, seed=8, info=info)
    assert torch.equal(a_images, b_images) and not torch.equal(a_images, c_images)
    assert {c: int((a_labels == c).sum()) for c in range(10)} == counts
    # a class's k-th image does not depend on the counts (same noise; float rounding of the batch aside)
    more, more_labels = sample(gen, {c: 70 for c in range(10)}, seed=7, info=info)
    assert torch.allclose(more[more_labels == 2][:3], a_images[a_labels == 2], atol=1e-5)
    sampler = GeneratorSampler(gen.shape, gen.state_dict(), info, counts, seed=7)
    assert torch.equal(sampler(1)[0], sampler(1)[0]) and not torch.equal(sampler(1)[0], sampler(2)[0])


def test_cgan_stage_reduces_the_class_head_loss(digits):
    task = make_task(digits, 1, progress=False)
    config = GeneratorConfig(**{**TINY, "log_every": 20}, stage1_steps=160, stage2_steps=0, lr_stage1=5e-4)
    trainer = train_generator(task, config)
    d_class = [v for _, v in trainer.curves["d_class"]]
    assert len(d_class) == 8
    assert d_class[-1] < 0.7 * d_class[0], d_class  # ln 10 = 2.30 at chance
    assert "g_global" not in trainer.curves and trainer.pool is None


def test_zero_matching_weights_leave_only_the_cgan_loss(digits):
    task = make_task(digits, 1, pipc=20, progress=False)
    plain = GeneratorTrainer(task, GeneratorConfig(**TINY, stage1_steps=1, stage2_steps=1, w_global=0, w_local=0))
    assert plain.pool is None
    x, y = plain.real_batch(8)
    total, terms = plain.generator_objective(x, y, False)
    assert set(terms) == {"cgan"} and total is terms["cgan"]

    matched = GeneratorTrainer(task, GeneratorConfig(**TINY, stage1_steps=1, stage2_steps=1, pool="convnet3"))
    matched.pool.maybe_redraw(0, matched.rng)
    total, terms = matched.generator_objective(x, y, True)
    assert set(terms) == {"cgan", "global", "local"} and terms["global"] > 0 and terms["local"] > 0
    assert torch.allclose(total, terms["cgan"] + terms["global"] + terms["local"])
    # the matching gradient reaches the generator, not the pool model
    total.backward()
    assert all(p.grad is None for p in matched.pool.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in matched.gen.parameters())


def test_variants_share_the_main_stream_and_stage2_seeds_repeat_stage_2_only(digits):
    """Matching draws from its own stream: a variant whose terms weigh nothing trains the CGAN's
    generator exactly, although it trains a pool model. ``stage2_seed`` changes stage 2, not stage 1."""
    task = make_task(digits, 1, pipc=20, seed=3, progress=False)
    base = dict(**TINY, stage1_steps=2, stage2_steps=3, pool="convnet3", pool_steps=2)
    cgan = train_generator(task, GeneratorConfig(**base, w_global=0, w_local=0))
    silent = train_generator(task, GeneratorConfig(**base, w_global=1e-30, w_local=1e-30))
    assert cgan.pool is None and silent.pool.draws == 1 and "pool_ce" in silent.curves
    for name, value in cgan.gen.state_dict().items():
        assert torch.equal(value, silent.gen.state_dict()[name]), name

    def weights(trainer):
        return torch.cat([v.flatten() for v in trainer.gen.state_dict().values() if v.is_floating_point()])

    other = train_generator(task, GeneratorConfig(**base, w_global=0, w_local=0, stage2_seed=1))
    again = train_generator(task, GeneratorConfig(**base, w_global=0, w_local=0, stage2_seed=1))
    assert torch.equal(weights(other), weights(again))
    assert not torch.equal(weights(other), weights(cgan))
    assert torch.equal(other.stage1_grid[0], cgan.stage1_grid[0])  # the same CGAN entered stage 2
    with pytest.raises(ConfigError, match="stage2_seed"):
        GeneratorConfig(stage2_seed=-1)


def test_matching_terms_never_outweigh_the_gan_term_at_the_start_of_stage_2(digits):
    """The scale regression behind the prototype collapse: summed terms swamped the CGAN loss."""
    task = make_task(digits, 1, pipc=50, seed=1, progress=False)
    config = GeneratorConfig(**TINY, stage1_steps=100, stage2_steps=1, lr_stage1=5e-4, pool="convnet3", pool_steps=4)
    stage1 = train_generator(task, replace(config, stage2_steps=0))
    trainer = GeneratorTrainer(task, config)
    trainer.load_state_dict({**stage1.state_dict(), "pool": None})
    trainer.begin_stage2()
    trainer.pool.maybe_redraw(0, trainer.rng)
    trainer.pool.train([trainer.real_batch(config.match_batch) for _ in range(config.pool_steps)], trainer.rng)
    x, y = trainer.real_batch(64)
    _, terms = trainer.generator_objective(x, y, True)
    params = [p for p in trainer.gen.parameters()]

    def pull(term: torch.Tensor) -> float:
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))

    gan = pull(terms["cgan"])
    for name in ("global", "local"):
        assert pull(terms[name]) < gan, (name, pull(terms[name]), gan)
        assert abs(terms[name].item()) < abs(terms["cgan"].item()), (name, terms)
    # the same terms summed over the batch and the entries (the old scale) would have outweighed it
    fake = from_unit(trainer.gen(trainer.noise(64), y), task.info)
    _, mean_local = matching_losses(trainer.pool.model, trainer.pool.layer, fake, x, y)
    with torch.no_grad():
        mid, _ = trainer.pool.model.features_and_logits(x, trainer.pool.layer)
    summed_local = config.w_local * mean_local * mid.numel()
    assert pull(summed_local) > gan and summed_local.item() > abs(terms["cgan"].item())


def test_cgan_gradient_scale_gives_each_term_its_share_of_the_gan_terms_pull(digits):
    """``match_scale=cgan-gradient``: a term's gradient on the generator is w times the CGAN term's."""
    task = make_task(digits, 1, pipc=20, seed=2, progress=False)
    scaled = dict(**TINY, stage1_steps=1, stage2_steps=2, pool="convnet3", pool_steps=1, match_scale="cgan-gradient")
    trainer = GeneratorTrainer(task, GeneratorConfig(**scaled, w_global=0.3, w_local=0.05))
    trainer.pool.maybe_redraw(0, trainer.rng)
    x, y = trainer.real_batch(16)
    total, terms = trainer.generator_objective(x, y, True)
    params = list(trainer.gen.parameters())

    def pull(term: torch.Tensor) -> float:
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))

    gan = pull(terms["cgan"])
    assert pull(terms["global"]) == pytest.approx(0.3 * gan, rel=1e-4)
    assert pull(terms["local"]) == pytest.approx(0.05 * gan, rel=1e-4)
    assert torch.allclose(total, terms["cgan"] + terms["global"] + terms["local"])
    # the factors are not the raw weights: the raw terms' gradients are not the CGAN's size
    assert trainer.match_weights["global"] != pytest.approx(0.3, rel=0.5)
    assert trainer.match_weights["local"] != pytest.approx(0.05, rel=0.5)

    logit = train_generator(task, GeneratorConfig(**scaled, w_global=0.3, w_local=0))
    assert {"weight_global", "weight_local"} <= set(logit.curves)
    assert all(value == 0 for _, value in logit.curves["weight_local"])
    assert all(value > 0 for _, value in logit.curves["weight_global"])
    with pytest.raises(ConfigError, match="match_scale"):
        GeneratorConfig(match_scale="norm")


def test_local_match_class_mean_compares_per_class_mean_features():
    torch.manual_seed(0)
    from common.models import build_model

    model = build_model("convnet3", 1, 10, 8)
    real, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 0, 1, 1, 1])
    shuffled = real[torch.tensor([2, 0, 1, 5, 3, 4])]  # the same images, paired with other class members
    _, pair = matching_losses(model, "block2", shuffled, real, labels, "pair")
    _, class_mean = matching_losses(model, "block2", shuffled, real, labels, "class-mean")
    assert pair > 1e-4 and class_mean < 1e-9  # same class means, different pairs
    with pytest.raises(ConfigError, match="local_match"):
        GeneratorConfig(local_match="batch")


def test_shared_augmentation_gives_each_pair_the_same_transform():
    from common.augment import DSA

    torch.manual_seed(0)
    real = torch.randn(64, 1, 16, 16)
    fake = real.clone().requires_grad_(True)
    for strategy in ("crop", "scale", "rotate", "color", "cutout"):
        real_aug, fake_aug = shared_augment(DSA(strategy), real, fake, torch.Generator().manual_seed(3))
        assert torch.allclose(real_aug, fake_aug, atol=1e-6), strategy  # paired images: one transform
        assert not torch.allclose(real_aug, real, atol=1e-3), strategy  # ... that really transforms
    fake_aug.sum().backward()  # differentiable on the generated side
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    same = real[:1].repeat(64, 1, 1, 1)  # one image in every pair: the pairs' transforms differ
    real_aug, fake_aug = shared_augment(DSA("crop"), same, same.clone(), torch.Generator().manual_seed(4))
    assert torch.equal(real_aug, fake_aug) and len({tuple(x.flatten().tolist()) for x in real_aug}) > 10
    _, out = shared_augment(None, real, fake, torch.Generator())
    assert out is fake


def test_pool_models_are_redrawn_on_dims_schedule(digits):
    task = make_task(digits, 1, pipc=20, progress=False)
    config = GeneratorConfig(**TINY, stage1_steps=0, stage2_steps=7, pool="convnet3", pool_steps=1)
    assert GeneratorTrainer(task, config).reinit_every == 13  # one epoch: ceil(200 / 16)
    trainer = GeneratorTrainer(task, replace(config, pool_reinit_every=3))
    trainer.begin_stage2()
    assert [g["lr"] for o in (trainer.opt_g, trainer.opt_d) for g in o.param_groups] == [5e-6, 5e-6]
    models = []
    for _ in range(7):
        trainer.train_step()
        trainer.step += 1
        models.append(trainer.pool.model)
    assert trainer.pool.draws == 3  # steps 0, 3, 6
    assert [len({id(m) for m in models[i : i + 3]}) for i in (0, 3)] == [1, 1] and models[2] is not models[3]
    assert trainer.pool.dsa is not None and trainer.pool.dsa.strategy == "color_crop"
    first_conv = [next(m.parameters()).detach() for m in (models[0], models[3], models[6])]
    assert not torch.equal(first_conv[0], first_conv[1]) and not torch.equal(first_conv[1], first_conv[2])


def test_held_out_selection_never_trains_on_them_and_ends_on_the_best_state(digits):
    task = make_task(digits, 1, pipc=20, seed=2, progress=False)
    config = GeneratorConfig(
        **TINY,
        stage1_steps=6,
        stage2_steps=4,
        pool="convnet3",
        pool_steps=1,
        select_every=2,
        select_per_class=5,
        select_ipc=2,
        select_epochs=3,
    )
    trainer = train_generator(task, config)
    held = trainer.selector.held
    assert len(held) == 50 and len(trainer.real_y) == 150
    assert not (trainer.real_x.flatten(1)[:, None] == held.images.flatten(1)[None]).all(-1).any()
    history = trainer.selector.history
    # each stage picks among the states its own steps reached: stage 2 cannot return stage 1's generator
    assert [step for step, stage, _ in history if stage == 1] == [2, 4, 6]
    assert [step for step, stage, _ in history if stage == 2] == [8, 10]
    assert trainer.chosen["2"]["step"] in (8, 10)
    for stage in (1, 2):
        scores = [(score, step) for step, s, score in history if s == stage]
        best_score = max(score for score, _ in scores)
        assert trainer.chosen[str(stage)]["score"] == best_score
    # the generator the method returns is the selected one (scoring is deterministic)
    assert trainer.selector.score(trainer.gen) == trainer.chosen["2"]["score"]


def test_pool_layers_default_to_the_middle_stage_and_are_checked():
    assert layer_choice("auto", "resnet18", ("stem", "layer1", "layer2", "layer3", "layer4")) == "layer2"
    assert layer_choice("auto", "convnet3", ("block1", "block2", "block3")) == "block2"
    assert layer_choice("convnet3:block3", "convnet3", ("block1", "block2", "block3")) == "block3"
    with pytest.raises(ConfigError, match="choose one of"):
        layer_choice("convnet3:layer9", "convnet3", ("block1", "block2", "block3"))
    with pytest.raises(ConfigError, match="unknown model"):
        GeneratorConfig(pool="convnet3,nosuchnet")


def test_generator_reads_only_the_public_subset(digits):
    task = make_task(digits, 1, pipc=7, progress=False)
    trainer = GeneratorTrainer(task, GeneratorConfig(**TINY, stage1_steps=1, stage2_steps=0))
    assert trainer.real_x.shape[0] == 70
    assert torch.equal(trainer.real_x, digits.train.images[task.real_indices])


@pytest.mark.parametrize("select_every", [0, 3])
def test_interrupted_run_resumes_exactly_across_the_stage_boundary(digits, tmp_path, select_every):
    config = dict(**{**TINY, "checkpoint_every": 2}, stage1_steps=6, stage2_steps=4, pool="convnet3", pool_steps=1)
    config.update(select_every=select_every, select_per_class=4, select_ipc=1, select_epochs=2, pool_reinit_every=3)
    full = train_generator(make_task(digits, 1, pipc=20, seed=4, progress=False), GeneratorConfig(**config))

    task = make_task(digits, 1, pipc=20, seed=4, progress=False, workdir=tmp_path)

    def crash(step):
        if step == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_generator(task, GeneratorConfig(**config), on_step=crash)
    assert (tmp_path / CHECKPOINT_FILE).exists() and (tmp_path / "stage1.png").exists()
    resumed = train_generator(task, GeneratorConfig(**config, resume=True))
    assert resumed.resumed_from == 8
    for name, value in full.gen.state_dict().items():
        assert torch.equal(value, resumed.gen.state_dict()[name]), name
    assert resumed.curves == full.curves
    assert resumed.pool.drawn == full.pool.drawn == ["convnet3"] * full.pool.draws  # the manifest's record of draws
    if select_every:
        assert resumed.selector.history == full.selector.history and resumed.chosen == full.chosen
    with pytest.raises(ArtifactError, match="different job"):
        train_generator(task, GeneratorConfig(**{**config, "w_local": 0.5}, resume=True))


def test_time_limit_stops_early_with_a_note(digits):
    from server.methods.generator import _summary

    trainer = train_generator(make_task(digits, 1, progress=False), GeneratorConfig(**TINY, time_limit=0.2))
    summary = _summary(trainer)
    assert 0 < trainer.step < 20000 and "time limit" in summary["stopped_early"]
    assert summary["steps_done"] == trainer.step and summary["seconds_per_step_stage1"] > 0


def test_corrupt_generator_artifact_is_refused(tmp_path):
    info = info_of(1, 8)
    gen = ConditionalGenerator(GeneratorShape.for_dataset(info, width=8))
    save_generator(tmp_path / "g", gen, info, {})
    loaded, loaded_info, _ = load_generator(tmp_path / "g")
    assert loaded_info == info and torch.equal(loaded.project[0].weight, gen.project[0].weight)
    weights = tmp_path / "g" / "generator.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hash"):
        load_generator(tmp_path / "g")
    with pytest.raises(ArtifactError, match="holds no generator"):
        load_generator(tmp_path)


def test_cli_distill_then_generate_any_counts(tmp_path, capsys):
    from common.cli import main

    gen_dir = tmp_path / "gen"
    args = ["distill", "--method", "generator", "--dataset", "digits", "--ipc", "2", "--quick"]
    args += ["--stage1-steps", "20", "--stage2-steps", "3", "--width", "16", "--out", str(gen_dir), "--no-progress"]
    assert main(args) == 0
    dset = load_distilled_set(gen_dir)
    assert len(dset) == 20 and dset.manifest["variant"] == "global+local"
    assert dset.manifest["seconds_per_step_stage2"] > 0 and dset.manifest["pool"] == ["convnet3"]
    for name in ("generator.json", "generator.safetensors", "stage1.png", "stage2.png", "stage2-terms.png"):
        assert (gen_dir / "generator" / name).is_file()

    per_class = tmp_path / "counts.json"
    per_class.write_text(json.dumps({"counts": {str(c): c + 1 for c in range(10)}}))
    out = tmp_path / "g1"
    assert main(["generate", str(gen_dir), "--per-class", str(per_class), "--seed", "3", "--out", str(out)]) == 0
    first = load_distilled_set(out)
    assert first.counts() == {c: c + 1 for c in range(10)}
    assert main(["generate", str(gen_dir), "--per-class", str(per_class), "--seed", "3", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    again = tmp_path / "g2"
    assert main(["generate", str(gen_dir / "generator"), "--ipc", "10", "--seed", "3", "--out", str(again)]) == 0
    second = load_distilled_set(again)
    assert torch.allclose(second.images[second.labels == 9], first.images[first.labels == 9], atol=1e-5)
    assert main(["generate", str(gen_dir), "--per-class", "{not json", "--out", str(tmp_path / "g3")]) == 2
    assert "--per-class" in capsys.readouterr().err


def test_dim_protocol_is_reported_apart(tmp_path, digits):
    from common.cli import main

    gen_dir = tmp_path / "gen"
    args = ["distill", "--method", "generator", "--dataset", "digits", "--ipc", "1", "--out", str(gen_dir)]
    args += ["--stage1-steps", "10", "--stage2-steps", "0", "--width", "8", "--no-progress"]
    assert main(args) == 0
    out = tmp_path / "eval"
    args = ["generate", str(gen_dir), "--ipc", "2", "--out", str(out), "--evaluate", "--dim-protocol"]
    assert main(args + ["--epochs", "3", "--runs", "1", "--workers", "1", "--no-progress"]) == 0
    manifest = load_distilled_set(out).manifest
    dim = manifest["evaluation_dim_protocol"]["convnet3"]
    assert dim["config"]["protocol"] == "resampled-best" and 0 <= dim["mean"] <= 1
    assert dim["config"]["lr_decay_at"] == 0 and dim["config"]["batch_size"] == 64  # constant lr, DiM's batch
    assert "convnet3" in json.dumps(manifest["evaluation"])


def test_dim_sampler_draws_fresh_random_label_batches():
    from common.evaluation import dim_images_per_epoch

    assert [dim_images_per_epoch(n) for n in (10, 100, 500)] == [64, 128, 512]
    info = info_of(1, 8)
    torch.manual_seed(0)
    gen = ConditionalGenerator(GeneratorShape.for_dataset(info, width=8))
    sampler = GeneratorSampler(gen.shape, gen.state_dict(), info, {c: 1 for c in range(10)}, 5, random_labels=128)
    images, labels = sampler(0)
    assert images.shape == (128, 1, 8, 8) and len(labels.unique()) == 10
    assert not torch.equal(sampler(1)[1], labels) and torch.equal(sampler(0)[1], labels)


def test_cancel_from_the_progress_hook_stops_the_generator(digits):
    from common.errors import Cancelled

    seen = []

    def hook(step, total, loss):
        seen.append((step, total))
        return step < 4

    task = replace(make_task(digits, 1, progress=False), on_progress=hook)
    with pytest.raises(Cancelled, match="after 4 of 12"):
        train_generator(task, GeneratorConfig(**TINY, stage1_steps=10, stage2_steps=2, pool="convnet3", pool_steps=1))
    assert seen == [(2, 12), (4, 12)]
