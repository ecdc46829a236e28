"""The generator method: networks, both stages, resume, the artifact and ``edgedistill generate``."""

from __future__ import annotations

import json

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
from server.methods.generator import CHECKPOINT_FILE, GeneratorConfig, GeneratorTrainer, layer_choice, train_generator
from server.methods.registry import make_task

TINY = dict(width=16, batch_size=32, match_batch=16, log_every=2, checkpoint_every=0)


def info_of(channels: int, size: int) -> DatasetInfo:
    return DatasetInfo("x", channels, size, 10, tuple(map(str, range(10))), (0.5,) * channels, (0.25,) * channels)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 8)])
def test_generator_and_discriminator_shapes_and_ranges(channels, size):
    shape = GeneratorShape(channels, size, 10, noise_dim=100, width=16)
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
    total, terms = plain.generator_objective(x, y, None)
    assert set(terms) == {"cgan"} and total is terms["cgan"]

    matched = GeneratorTrainer(task, GeneratorConfig(**TINY, stage1_steps=1, stage2_steps=1, pool="convnet3"))
    total, terms = matched.generator_objective(x, y, 0)
    assert set(terms) == {"cgan", "global", "local"} and terms["global"] > 0 and terms["local"] > 0
    expected = terms["cgan"] + 0.01 * terms["global"] + 0.001 * terms["local"]
    assert torch.allclose(total, expected)
    # the matching gradient reaches the generator, not the pool model
    total.backward()
    assert all(p.grad is None for p in matched.pool.models[0].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in matched.gen.parameters())


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


def test_interrupted_run_resumes_exactly_across_the_stage_boundary(digits, tmp_path):
    config = dict(**{**TINY, "checkpoint_every": 2}, stage1_steps=6, stage2_steps=4, pool="convnet3", pool_steps=1)
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
    for name in ("generator.json", "generator.safetensors", "stage1.png", "stage2.png"):
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
    assert "convnet3" in json.dumps(manifest["evaluation"])
