"""Class-adaptive images per class: the allocator, the device statistics and their screening."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from common import diversity
from common.errors import ConfigError
from server.methods.allocation import (
    AllocationConfig,
    allocate_from_statistics,
    allocate_task,
    choose_k,
    proportional_counts,
)

pytestmark = pytest.mark.usefixtures("server_task_identity")  # tests play the server (conftest)


def blobs(seed: int = 0, per_blob: int = 60, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: one tight blob. Class 1: four blobs far apart. Class 2: two blobs."""
    rng = np.random.default_rng(seed)
    parts, labels = [], []
    axes = np.eye(dim)
    centres = {0: [np.zeros(dim)], 1: [10 * axes[i] for i in range(4)], 2: [-10 * axes[i] for i in range(2)]}
    for c, cs in centres.items():
        for centre in cs:
            parts.append(centre + 0.5 * rng.standard_normal((per_blob * 4 // len(cs), dim)))
            labels += [c] * (per_blob * 4 // len(cs))
    return np.concatenate(parts), np.asarray(labels)


def test_counts_sum_to_the_budget_and_respect_minimum_and_caps():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 12))
        minimum = int(rng.integers(1, 4))
        caps = rng.integers(minimum, 60, size=n).tolist()
        budget = int(rng.integers(minimum * n, sum(caps) + 1))
        weights = rng.choice([0.0, 0.5, 1.0, 2.0, 7.0], size=n).tolist()
        counts = proportional_counts(weights, budget, minimum, caps)
        assert sum(counts.values()) == budget
        assert all(minimum <= counts[c] <= caps[c] for c in range(n))


def test_counts_are_proportional_where_bounds_allow():
    assert proportional_counts([1, 3], 8) == {0: 2, 1: 6}
    assert proportional_counts([1, 1, 2], 10) == {0: 3, 1: 2, 2: 5}  # remainder tie to the lower class
    assert proportional_counts([0, 10], 10, min_per_class=2) == {0: 2, 1: 8}
    assert proportional_counts([1, 10], 10, caps=[10, 6]) == {0: 4, 1: 6}


def test_impossible_budgets_name_the_fix():
    with pytest.raises(ConfigError, match="ipc"):
        proportional_counts([1, 1], 1, min_per_class=1)
    with pytest.raises(ConfigError, match="pipc"):
        proportional_counts([1, 1], 30, caps=[10, 10])


@pytest.mark.parametrize("criterion", ["silhouette", "elbow"])
def test_the_four_blob_class_gets_the_larger_share(criterion):
    features, labels = blobs()
    stats = diversity.statistics_per_class(features, labels, 3, k_max=6, seed=0)
    chosen = [choose_k(s, criterion) for s in stats]
    assert chosen[1] == 4 and chosen[2] == 2
    allocation = allocate_from_statistics(stats, 30, AllocationConfig(criterion=criterion))
    assert sum(allocation.counts.values()) == 30
    assert allocation.counts[1] > max(allocation.counts[0], allocation.counts[2])


def test_one_blob_counts_as_one_cluster_under_a_silhouette_threshold():
    features, labels = blobs()
    stats = diversity.statistics_per_class(features, labels, 3, k_max=6, seed=0)
    assert choose_k(stats[0], "silhouette", min_silhouette=0.5) == 1
    assert choose_k(stats[1], "silhouette", min_silhouette=0.5) == 4


def test_statistics_are_deterministic_and_inertia_never_grows_with_k():
    features, labels = blobs()
    a = diversity.statistics_per_class(features, labels, 3, 6, seed=3)
    b = diversity.statistics_per_class(features, labels, 3, 6, seed=3)
    assert a == b
    for s in a:
        assert all(later <= earlier for earlier, later in zip(s.inertia, s.inertia[1:]))


def test_federated_merge_of_two_devices_matches_the_central_allocation():
    features, labels = blobs(per_blob=80)
    order = np.random.default_rng(1).permutation(len(labels))
    halves = [order[: len(order) // 2], order[len(order) // 2 :]]
    central = diversity.statistics_per_class(features, labels, 3, 6, seed=0)
    devices = [diversity.statistics_per_class(features[h], labels[h], 3, 6, seed=0) for h in halves]
    merged = diversity.merge(devices)
    config = AllocationConfig()
    assert allocate_from_statistics(merged, 30, config).counts == allocate_from_statistics(central, 30, config).counts
    assert [m.n for m in merged] == [c.n for c in central]
    # the documented bound: per k, the merged per-image inertia lies within 10 % of the union's
    # (devices fit their own centroids), and silhouettes within 0.05
    for m, c in zip(merged, central):
        assert np.allclose(m.inertia, c.inertia, rtol=0.10)
        assert np.allclose(m.silhouette, c.silhouette, atol=0.05)


def test_record_roundtrip_and_screening():
    features, labels = blobs()
    stats = diversity.statistics_per_class(features, labels, 3, 6, seed=0)
    record = diversity.to_record(stats)
    assert diversity.from_record(record, 3, 6, max_count=len(labels)) == stats
    bad = {
        "extra key": {**record, "embeddings": [0.0]},
        "wrong k-max": {**record, "k-max": 5},
        "short list": {**record, "inertia": record["inertia"][:-1]},
        "NaN": {**record, "silhouette": [float("nan")] + record["silhouette"][1:]},
        "counts over num-examples": {**record, "counts": [10**9, 0, 0]},
        "negative count": {**record, "counts": [-1, 0, 0]},
        "float counts": {**record, "counts": [1.0, 2.0, 3.0]},
        "inertia growing": {**record, "inertia": record["inertia"][::-1][:6] + record["inertia"][6:]},
    }
    for name, value in bad.items():
        with pytest.raises(ValueError):
            diversity.from_record(value, 3, 6, max_count=len(labels))
            pytest.fail(f"accepted a record with {name}")


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_a_device_reply_carries_only_the_documented_numbers(digits):
    from common.models import build_model
    from edge_client.client_app import train
    from edge_client.task import ClientTaskConfig

    torch.manual_seed(0)
    model = build_model("convnet3", 1, 10, 8)
    task = ClientTaskConfig(dataset="digits", pipc="5", diversity_stats=True, diversity_k_max=4)
    msg = Message(
        content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(task.to_record())}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    reply = train(msg, _context({"partition-id": 0, "num-partitions": 2})).content
    assert set(reply.keys()) == {"arrays", "metrics", "diversity"}
    record = reply.metric_records["diversity"]
    assert tuple(sorted(record.keys())) == tuple(sorted(diversity.RECORD_KEYS))
    assert len(record["counts"]) == 10 and len(record["inertia"]) == 40 and len(record["silhouette"]) == 30
    examples = reply.metric_records["metrics"]["num-examples"]
    stats = diversity.from_record(record, 10, 4, max_count=examples)
    assert sum(s.n for s in stats) == examples  # every class of a 2-way digits split has enough images


def _strategy_with_statistics():
    from server.federation.strategy import build_strategy

    strategy = build_strategy("fedavg", diversity_shape=(3, 6), min_train_nodes=1, min_available_nodes=1)
    strategy.set_reference(ArrayRecord({"w": torch.zeros(2)}))
    return strategy


def _reply(node: int, record: dict | None, examples: int = 1000, extra: dict | None = None) -> Message:
    request = Message(
        content=RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)})}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    content = {
        "arrays": ArrayRecord({"w": torch.ones(2)}),
        "metrics": MetricRecord({"train-loss": 0.1, "train-accuracy": 0.5, "num-examples": examples}),
    }
    if record is not None:
        content["diversity"] = MetricRecord(record)
    return Message(content=RecordDict({**content, **(extra or {})}), reply_to=request)


def test_the_server_merges_valid_statistics_and_drops_malformed_ones():
    features, labels = blobs()
    record = diversity.to_record(diversity.statistics_per_class(features, labels, 3, 6, seed=0))
    strategy = _strategy_with_statistics()
    replies = [
        _reply(1, record),
        _reply(2, record),
        _reply(3, {**record, "counts": [5000, 0, 0]}),  # more images than it trained on
        _reply(4, None),  # statistics missing
        _reply(5, record, extra={"spy": MetricRecord({"x": 1.0})}),  # a record nobody asked for
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.ones(2))
    log = strategy.round_log[1]
    assert log["clients_ok"] == 2 and log["diversity_devices"] == 2
    assert sorted(d["node"] for d in log["dropped"]) == [3, 4, 5]
    assert [s.n for s in strategy.latest_diversity] == [2 * n for n in record["counts"]]


def test_adaptive_distill_records_the_allocation_in_the_manifest(digits):
    from server.methods.registry import distill, make_task

    task = make_task(digits, 5, pipc=60, seed=0)
    adaptive, allocation = allocate_task(task, AllocationConfig(criterion="elbow"))
    assert sum(adaptive.counts.values()) == 50
    dset = distill("random", adaptive)
    assert dset.counts() == allocation.counts
    manifest = dset.manifest["allocation"]
    assert manifest["criterion"] == "elbow" and manifest["chosen_k"] == allocation.chosen_k
    assert distill("random", task).manifest["allocation"] == {"allocation": "fixed"}


def test_allocate_command_prints_the_table_and_writes_json_and_picture(tmp_path, capsys):
    from common.cli import main

    assert main(["allocate", "--dataset", "digits", "--ipc", "4", "--pipc", "40", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| class" in printed and "budget 40" in printed
    saved = json.loads((tmp_path / "allocation.json").read_text())
    assert sum(saved["counts"].values()) == 40
    assert (tmp_path / "embedding.png").stat().st_size > 10_000
