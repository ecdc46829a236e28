import json
from dataclasses import replace

import pytest
import torch

from common.errors import ConfigError
from server.methods.dm import CHECKPOINT_FILE, DMConfig, DMLoss, run_dm
from server.methods.registry import distill, make_task


def test_dm_loss_decreases_on_digits(digits):
    task = make_task(digits, 5, pipc=20, seed=0, progress=False)
    out = distill("dm", task, {"iterations": 40, "init": "noise", "lr_img": 100.0, "log_every": 5})
    curve = [loss for _, loss in out.manifest["loss_curve"]]
    assert len(curve) == 8 and curve[-1] < 0.8 * curve[0]
    assert out.manifest["seconds_per_iteration"] > 0 and out.counts() == task.counts


def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(digits, tmp_path):
    config = dict(iterations=12, checkpoint_every=5, batch_real=16, log_every=3)
    full = run_dm(make_task(digits, 2, pipc=20, seed=3, progress=False), DMConfig(**config))

    task = make_task(digits, 2, pipc=20, seed=3, progress=False, workdir=tmp_path)

    def crash(t, loss):
        if t == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dm(task, DMConfig(**config), on_iteration=crash)
    assert (tmp_path / CHECKPOINT_FILE).exists()
    resumed = run_dm(task, DMConfig(**config, resume=True))
    assert resumed.extra["resumed_from"] == 5 and resumed.extra["iterations_this_run"] == 7
    assert torch.equal(resumed.images, full.images)
    assert resumed.extra["loss_curve"] == full.extra["loss_curve"]


def test_resume_refuses_a_checkpoint_of_another_job(digits, tmp_path):
    task = make_task(digits, 2, pipc=20, seed=3, progress=False, workdir=tmp_path)
    run_dm(task, DMConfig(iterations=4, checkpoint_every=2, batch_real=8), on_iteration=None)
    other = make_task(digits, 3, pipc=20, seed=3, progress=False, workdir=tmp_path)
    with pytest.raises(Exception, match="different job"):
        run_dm(other, DMConfig(iterations=4, checkpoint_every=2, batch_real=8, resume=True))
    with pytest.raises(ConfigError, match="no DM checkpoint"):
        run_dm(make_task(digits, 2, progress=False, workdir=tmp_path / "none"), DMConfig(resume=True))


def test_ragged_counts(digits):
    counts = {c: 1 + c % 3 for c in range(10)}
    out = distill("dm", make_task(digits, counts, pipc=10, seed=0, progress=False), {"iterations": 3})
    assert out.counts() == counts and out.images.shape == (sum(counts.values()), 1, 8, 8)


def test_pipc_bounds_the_real_images_dm_draws(digits):
    task = make_task(digits, 3, pipc=5, seed=1, progress=False)
    objective = DMLoss(task, DMConfig(batch_real=256))
    syn = torch.zeros(30, 1, 8, 8, requires_grad=True)
    for t in range(3):
        objective.backward(syn, t)
    used = objective.used_train_indices()
    assert len(used) == 50  # batch_real 256 is capped by the 5 public images per class
    assert set(used.tolist()) <= set(task.real_indices.tolist())
    assert torch.bincount(digits.train.labels[used], minlength=10).tolist() == [5] * 10


def _gradient(digits, task, config: DMConfig) -> torch.Tensor:
    syn = digits.train.images[:20].clone().requires_grad_(True)
    DMLoss(task, config).backward(syn, 0)
    return syn.grad


@pytest.mark.parametrize("option", ["batch_classes", "channels_last"])
def test_batching_over_classes_and_memory_layout_do_not_change_the_gradient(digits, option):
    task = make_task(digits, 2, pipc=8, seed=0, progress=False)
    off, on = (_gradient(digits, task, DMConfig(**{option: value})) for value in (False, True))
    assert torch.allclose(off, on, rtol=1e-4, atol=1e-5)


def test_chunked_real_forward_gives_the_whole_batch_gradient(digits):
    # 8 real images per class in chunks of 3 (a ragged last chunk), each chunk augmented by the class's transform
    task = make_task(digits, 2, pipc=8, seed=0, progress=False)
    whole, chunked = (_gradient(digits, task, DMConfig(real_chunk=n)) for n in (0, 3))
    assert whole.abs().sum() > 0 and torch.allclose(whole, chunked, rtol=1e-4, atol=1e-6)


def test_real_chunk_is_cache_sized_on_cpus_whole_batch_on_gpus_and_never_splits_batch_statistics(digits):
    from common.models import build_model
    from server.methods.dm import per_sample, resolve_real_chunk

    assert resolve_real_chunk(-1, torch.device("cpu")) == 32 and resolve_real_chunk(-1, torch.device("cuda")) == 0
    assert resolve_real_chunk(5, torch.device("cuda")) == 5
    task = make_task(digits, 2, pipc=8, seed=0, progress=False)
    objective = DMLoss(task, DMConfig(real_chunk=3))
    assert per_sample(objective.network(0))  # instance norm: chunks give the same mean
    bn = build_model("convnet3", 1, 10, 8, norm="batchnorm").train().requires_grad_(False)
    real = digits.train.images[:8]
    assert not per_sample(bn)
    assert torch.allclose(objective.real_embedding_mean(bn, real, None), bn.embed(real).mean(0), atol=1e-6)
    with pytest.raises(ConfigError, match="real_chunk"):
        DMConfig(real_chunk=-2)


def test_cli_dm_writes_loss_curve_and_grid(tmp_path):
    from common.cli import main

    out = tmp_path / "dm"
    args = [
        "distill",
        "--method",
        "dm",
        "--dataset",
        "digits",
        "--ipc",
        "2",
        "--pipc",
        "10",
        "--iterations",
        "4",
        "--log-every",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p[0] for p in manifest["loss_curve"]] == [2, 4] and manifest["pipc"] == 10
    assert (out / "grid.png").stat().st_size > 100
    assert not (tmp_path / "dm.work").exists()  # checkpoints are removed once the artifact is written
    assert main(args[:-5] + ["--out", str(tmp_path / "dm2"), "--resume", "--no-progress"]) == 2


def test_psi_sees_the_images_at_their_own_size_unless_asked_to_pad(digits):
    task = make_task(digits, 2, pipc=8, seed=0, progress=False)
    mnist_like = replace(task, info=replace(task.info, image_size=28))
    assert DMLoss(mnist_like, DMConfig()).network(0).embed_dim == 128 * 3 * 3  # no padding to 32
    assert DMLoss(mnist_like, DMConfig(embed_fit="pad")).network(0).embed_dim == 2048


def test_the_dm_network_is_drawn_anew_every_iteration_and_reproducibly(digits):
    task = make_task(digits, 2, pipc=8, seed=0, progress=False)
    objective = DMLoss(task, DMConfig())
    first, again, second = (objective.network(t).state_dict() for t in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.allclose(first["stages.block2.0.weight"], second["stages.block2.0.weight"])
    seen = []
    original = objective.network
    objective.network = lambda t: seen.append(t) or original(t)
    syn = digits.train.images[:20].clone().requires_grad_(True)
    for t in range(3):
        objective.backward(syn, t)
    assert seen == [0, 1, 2]
