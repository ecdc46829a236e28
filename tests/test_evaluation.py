import pytest
import torch

from common.errors import ConfigError
from common.evaluation import PRESETS, EvalConfig, evaluate_set
from server.registry import distill, make_task


def test_presets_follow_the_protocol():
    paper, quick = PRESETS["paper"], PRESETS["quick"]
    assert (paper.epochs, paper.lr, paper.momentum, paper.weight_decay, paper.batch_size) == (
        1000,
        0.01,
        0.9,
        5e-4,
        256,
    )
    assert quick.epochs == 300 and paper.dsa and paper.lr_decay_at == 0.5
    with pytest.raises(ConfigError):
        EvalConfig(epochs=0)


def test_training_on_ten_digits_per_class_beats_chance_and_is_seeded(digits):
    chosen = distill("random", make_task(digits, 10, seed=0, progress=False))
    config = EvalConfig(epochs=150)
    a = evaluate_set(
        chosen.images, chosen.labels, digits.test, digits.info, runs=2, config=config, seed=5, workers=1, progress=False
    )
    b = evaluate_set(
        chosen.images, chosen.labels, digits.test, digits.info, runs=2, config=config, seed=5, workers=1, progress=False
    )
    assert len(a.accuracies) == 2 and a.accuracies == b.accuracies
    assert a.mean > 0.7  # chance is 0.1
    assert a.accuracies[0] != a.accuracies[1]  # runs use different seeds
    assert a.to_dict()["config"]["dsa_strategy"] == "color_crop_cutout_scale_rotate"  # no flips for digits


def test_parallel_workers_give_the_protocol_result(digits):
    chosen = distill("random", make_task(digits, 2, seed=0, progress=False))
    result = evaluate_set(
        chosen.images,
        chosen.labels,
        digits.test,
        digits.info,
        runs=2,
        config=EvalConfig(epochs=10),
        workers=2,
        progress=False,
    )
    assert len(result.accuracies) == 2 and all(0.0 <= a <= 1.0 for a in result.accuracies)
    assert result.std >= 0 and torch.isfinite(torch.tensor(result.mean))
