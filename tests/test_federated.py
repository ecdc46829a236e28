"""The federated part with real Flower objects: client replies, robust FedAvg, partitions."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

from common.models import build_model
from common.partition import partition_indices
from common.subsets import public_subset_indices
from edge_client.client_app import evaluate, train
from edge_client.task import ClientTaskConfig
from server.federation.strategy import FederationError, RobustFedAvg

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
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": examples})})
    return Message(content=content, reply_to=request)


GLOBAL = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def _strategy(**kwargs) -> RobustFedAvg:
    strategy = RobustFedAvg(min_train_nodes=1, min_available_nodes=1, **kwargs)
    strategy.set_reference(ArrayRecord(GLOBAL))
    return strategy


def _request(node: int) -> Message:
    return _train_message(GLOBAL, {}, node_id=node)


def test_fedavg_of_known_weights_matches_a_hand_computation():
    a = {"w": torch.full((2, 3), 1.0), "b": torch.full((3,), -1.0)}
    b = {"w": torch.full((2, 3), 3.0), "b": torch.full((3,), 2.0)}
    arrays, metrics = _strategy().aggregate_train(1, [_reply(_request(1), a, 1), _reply(_request(2), b, 3)])
    out = arrays.to_torch_state_dict()
    assert torch.allclose(out["w"], torch.full((2, 3), (1 * 1 + 3 * 3) / 4))
    assert torch.allclose(out["b"], torch.full((3,), (1 * -1 + 3 * 2) / 4))


def test_hostile_replies_are_dropped_and_the_round_still_produces_a_finite_model():
    good = {"w": torch.full((2, 3), 0.5), "b": torch.full((3,), 0.25)}
    nan = {"w": torch.full((2, 3), float("nan")), "b": torch.zeros(3)}
    wrong_shape = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
    huge = {"w": torch.full((2, 3), 1e6), "b": torch.zeros(3)}
    renamed = {"weight": torch.zeros(2, 3), "b": torch.zeros(3)}
    replies = [
        _reply(_request(1), good, 10),
        _reply(_request(2), nan, 10),
        _reply(_request(3), wrong_shape, 10),
        _reply(_request(4), huge, 10),
        _reply(_request(5), renamed, 10),
        _reply(_request(6), good, -5),  # a negative example count would flip the weighting
        _reply(_request(7), {k: v.double() for k, v in good.items()}, 10),  # wrong dtype
        Message(Error(code=0, reason="client timed out"), reply_to=_request(8)),
    ]
    strategy = _strategy(max_update_norm=100.0)
    arrays, _ = strategy.aggregate_train(3, replies)
    out = arrays.to_torch_state_dict()
    assert all(torch.isfinite(t).all() for t in out.values())
    assert torch.equal(out["w"], good["w"]) and torch.equal(out["b"], good["b"])
    log = strategy.round_log[3]
    assert log["clients_ok"] == 1 and log["clients_dropped"] == 7
    assert sorted(d["node"] for d in log["dropped"]) == [2, 3, 4, 5, 6, 7, 8]


def test_a_round_with_too_few_valid_replies_fails_clearly():
    nan = {"w": torch.full((2, 3), float("nan")), "b": torch.zeros(3)}
    with pytest.raises(FederationError, match="only 1 valid client updates of 2"):
        _strategy(min_valid_replies=2).aggregate_train(1, [_reply(_request(1), GLOBAL, 5), _reply(_request(2), nan, 5)])


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
    with pytest.raises(ConfigError, match="fedavg or fedprox"):
        FederationConfig(strategy="krum")


def test_the_flower_app_config_in_pyproject_is_a_valid_federation_config():
    from pathlib import Path

    from server.federation.run import FederationConfig

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    config = FederationConfig.from_run_config(pyproject["tool"]["flwr"]["app"]["config"])
    assert config.dataset == "digits" and config.weight_decay == 5e-4 and config.distill_method == ""
    assert pyproject["tool"]["flwr"]["app"]["components"]["serverapp"] == "server.federation.server_app:app"
