"""The federated part with real Flower objects: client replies, robust FedAvg, partitions."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from common.models import build_model
from common.partition import partition_indices
from common.subsets import public_subset_indices
from edge_client.client_app import evaluate, train
from edge_client.task import ClientTaskConfig
from server.federation.strategy import ScreeningConfig, build_strategy

pytestmark = pytest.mark.usefixtures("server_task_identity")  # tests play the server (conftest)


def _train_message(state: dict, config: dict, node_id: int = 7) -> Message:
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_client_train_replies_with_weights_and_scalar_metrics_only(digits):
    torch.manual_seed(0)
    model = build_model("convnet3", 1, 10, 8)
    task = ClientTaskConfig(dataset="digits", pipc="5", local_epochs=1)
    msg = _train_message(model.state_dict(), task.to_record())
    reply = train(msg, _context({"partition-id": 1, "num-partitions": 4}))
    content = reply.content
    assert set(content.array_records) == {"arrays"} and set(content.metric_records) == {"metrics"}
    assert not content.config_records
    arrays = content.array_records["arrays"]
    state = model.state_dict()
    assert set(arrays.keys()) == set(state)
    for name, array in arrays.items():
        assert tuple(array.shape) == tuple(state[name].shape)
        assert tuple(array.shape[-3:]) != (1, 8, 8)  # no images, however batched
    metrics = content.metric_records["metrics"]
    assert set(metrics.keys()) == {"train-loss", "train-accuracy", "num-examples"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    # 1437 train images - 50 public, split over 4 clients, minus a 10% held-out split
    assert metrics["num-examples"] == 347 - 35  # 1387 private images over 4 clients, 10% held out
    changed = [not np.allclose(arrays[k].numpy(), state[k].numpy()) for k in state]
    assert any(changed)
    eval_reply = evaluate(
        _train_message(model.state_dict(), task.to_record()), _context({"partition-id": 1, "num-partitions": 4})
    )
    assert set(eval_reply.content.metric_records["metrics"].keys()) == {"eval-loss", "eval-accuracy", "num-examples"}


def test_client_without_private_data_says_how_to_provide_it():
    from common.errors import ConfigError

    model = build_model("convnet3", 1, 10, 8)
    with pytest.raises(ConfigError, match="data-dir"):
        train(_train_message(model.state_dict(), ClientTaskConfig().to_record()), _context({}))


def _reply(request: Message, state: dict, examples) -> Message:
    metrics = MetricRecord({"train-loss": 0.1, "train-accuracy": 0.5, "num-examples": examples})
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=request)


GLOBAL = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def test_fedavg_with_claimed_weights_matches_a_hand_computation():
    strategy = build_strategy("fedavg", ScreeningConfig(weighting="claimed"), min_train_nodes=1, min_available_nodes=1)
    strategy.set_reference(ArrayRecord(GLOBAL))
    a = {"w": torch.full((2, 3), 1.0), "b": torch.full((3,), -1.0)}
    b = {"w": torch.full((2, 3), 3.0), "b": torch.full((3,), 2.0)}
    requests = [_train_message(GLOBAL, {}, node_id=n) for n in (1, 2)]
    arrays, metrics = strategy.aggregate_train(1, [_reply(requests[0], a, 1), _reply(requests[1], b, 3)])
    out = arrays.to_torch_state_dict()
    assert torch.allclose(out["w"], torch.full((2, 3), (1 * 1 + 3 * 3) / 4))
    assert torch.allclose(out["b"], torch.full((3,), (1 * -1 + 3 * 2) / 4))
    assert metrics["train-loss"] == pytest.approx(0.1)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_deterministic_and_exclude_the_public_subset(digits, scheme):
    labels = digits.train.labels
    parts = partition_indices(labels, 10, 5, scheme=scheme, alpha=0.3, pipc=10, seed=1)
    again = partition_indices(labels, 10, 5, scheme=scheme, alpha=0.3, pipc=10, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    union = np.concatenate(parts)
    public = set(public_subset_indices(labels, 10, 10, 1).tolist())
    assert len(union) == len(set(union.tolist())) == len(labels) - 100
    assert not public & set(union.tolist())
    if scheme != "iid":  # label skew: some client misses a class or is dominated by a few
        shares = [np.bincount(labels.numpy()[p], minlength=10) / len(p) for p in parts]
        assert max(s.max() for s in shares) > 0.3


def test_run_config_is_typed_and_refuses_unknown_keys():
    from common.errors import ConfigError
    from server.federation.run import FederationConfig

    config = FederationConfig.from_run_config({"num-rounds": "4", "strategy": "fedprox", "resume": "true"})
    assert config.num_rounds == 4 and config.resume is True
    assert config.client_task().proximal_mu == 0.01
    assert FederationConfig().client_task().proximal_mu == 0.0  # plain FedAvg sends no proximal term
    with pytest.raises(ConfigError, match="unknown run-config key 'rounds'"):
        FederationConfig.from_run_config({"rounds": 3})
    with pytest.raises(ConfigError, match="strategy 'fedsgd': use one of fedavg, fedprox, krum"):
        FederationConfig(strategy="fedsgd")
    assert FederationConfig(strategy="bulyan", weighting="uniform").screening().weighting == "uniform"


def test_the_flower_app_config_in_pyproject_is_a_valid_federation_config():
    import dataclasses
    from pathlib import Path

    from server.federation.run import FederationConfig

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    config = FederationConfig.from_run_config(pyproject["tool"]["flwr"]["app"]["config"])
    assert config.dataset == "digits" and config.weight_decay == 5e-4 and config.distill_method == ""
    assert config == FederationConfig()  # the file states the defaults, not other values
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(FederationConfig)}
    listed = set(pyproject["tool"]["flwr"]["app"]["config"])
    assert listed == fields, f"missing from pyproject: {sorted(fields - listed)}; unknown: {sorted(listed - fields)}"
    assert pyproject["tool"]["flwr"]["app"]["components"]["serverapp"] == "server.federation.server_app:app"
