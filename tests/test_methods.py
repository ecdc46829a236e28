import pytest
import torch

from common.errors import ConfigError
from server.methods.coreset import herding_order, kcenter_order
from server.methods.registry import distill, get_method, list_methods, make_task


def test_registry_holds_the_baselines_and_refuses_unknown_names_and_options():
    assert {"random", "herding", "kcenter"} <= set(list_methods())
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("magic")
    with pytest.raises(ConfigError, match="no option"):
        distill("random", None, {"iterations": 3})


def test_random_honours_ragged_counts_and_is_seeded(digits):
    counts = {c: 1 + c % 3 for c in range(10)}
    task = make_task(digits, counts, pipc=None, seed=1, progress=False)
    a, b = distill("random", task), distill("random", task)
    assert a.counts() == counts
    assert torch.equal(a.images, b.images)
    c = distill("random", make_task(digits, counts, pipc=None, seed=2, progress=False))
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_pipc_limits_what_every_method_sees(digits, method):
    task = make_task(digits, 3, pipc=5, seed=0, progress=False)
    assert len(task.real) == 50 and torch.bincount(task.real.labels).tolist() == [5] * 10
    options = {} if method == "random" else {"feature_steps": 5}
    out = distill(method, task, options)
    used = set(out.manifest["selected_train_indices"])
    assert used <= set(task.real_indices.tolist()) and len(used) == 30
    assert out.manifest["pipc"] == 5 and out.manifest["real_images_seen"] == 50
    for idx, label in zip(out.manifest["selected_train_indices"], out.labels.tolist()):
        assert digits.train.labels[idx] == label


def test_asking_for_more_images_than_the_subset_holds_is_a_config_error(digits):
    with pytest.raises(ConfigError, match="raise --pipc"):
        distill("random", make_task(digits, 10, pipc=5, progress=False))


def test_public_subset_is_seeded_and_per_class(digits):
    a = make_task(digits, 1, pipc=7, seed=3, progress=False).real_indices
    b = make_task(digits, 1, pipc=7, seed=3, progress=False).real_indices
    c = make_task(digits, 1, pipc=7, seed=4, progress=False).real_indices
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_herding_follows_the_running_mean_rule():
    feats = torch.tensor([[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0], [1.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    # mean is (0.2, 1.0): first the point nearest it, then the one that brings the running mean closest
    order = herding_order(feats, 3).tolist()
    mu = feats.mean(0)
    brute, chosen = [], []
    for _ in range(3):
        best = min(
            (i for i in range(5) if i not in chosen),
            key=lambda i: float(((feats[chosen + [i]].mean(0) - mu) ** 2).sum()),
        )
        chosen.append(best)
        brute.append(best)
    assert order == brute


def test_kcenter_picks_the_farthest_points():
    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [-5.0, 0.0], [0.0, 0.2]], dtype=torch.float64)
    order = kcenter_order(feats, 3).tolist()
    assert order[0] in (0, 1, 4) and set(order[1:]) == {2, 3}


def test_herding_and_kcenter_differ_from_random(digits):
    task = make_task(digits, 5, pipc=None, seed=0, progress=False)
    herd = distill("herding", task, {"feature_steps": 30})
    kc = distill("kcenter", task, {"feature_steps": 30})
    rnd = distill("random", task)
    assert herd.manifest["selected_train_indices"] != rnd.manifest["selected_train_indices"]
    assert herd.manifest["selected_train_indices"] != kc.manifest["selected_train_indices"]
