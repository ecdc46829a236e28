"""Hostile replies against the screened strategies, with real Flower records and Flower's own aggregation.

Every case adds one hostile reply to three honest ones; the round must complete, and the global
model must be finite and equal to the aggregate of the replies that ought to count.
"""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common.errors import ConfigError
from server.federation.strategy import (
    STRATEGIES,
    FederationError,
    ScreeningConfig,
    build_strategy,
    granted_weights,
)

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32), "steps": np.zeros((), np.int64)}
pytestmark = pytest.mark.usefixtures("server_task_identity")  # tests play the server (conftest)
HONEST = [0.5, 0.7, 0.6]  # every float entry of honest node i's reply
EXAMPLES = 100


def _state(value: float, steps: int = 4, **overrides) -> dict[str, np.ndarray]:
    state = {
        "w": np.full((2, 3), value, np.float32),
        "b": np.full(3, value, np.float32),
        "steps": np.array(steps, np.int64),
    }
    return {**state, **overrides}


def _request(node: int, kind: str = MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), "config": ConfigRecord()})
    return Message(content=content, dst_node_id=node, message_type=kind)


def _metrics(examples=EXAMPLES, **overrides) -> dict:
    return {"train-loss": 0.3, "train-accuracy": 0.9, "num-examples": examples, **overrides}


def _reply(node: int, state=None, metrics=None, records=None) -> Message:
    content = {
        "arrays": ArrayRecord({k: Array(v) for k, v in (state or _state(0.5)).items()}),
        "metrics": MetricRecord(metrics if metrics is not None else _metrics()),
    }
    content = records if records is not None else content
    return Message(content=RecordDict(content), reply_to=_request(node))


def _honest() -> list[Message]:
    return [_reply(i + 1, _state(v)) for i, v in enumerate(HONEST)]


def _strategy(name="fedavg", **screening) -> object:
    strategy = build_strategy(name, ScreeningConfig(**screening), min_train_nodes=1, min_available_nodes=1)
    strategy.set_reference(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    return strategy


def _garbled_array() -> Array:
    return Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"not an npy payload")


HOSTILE = {
    "error reply": lambda: Message(Error(code=0, reason="device crashed"), reply_to=_request(9)),
    "extra metric record": lambda: _reply(9, records={**_records(), "spy": MetricRecord({"x": 1.0})}),
    "extra config record": lambda: _reply(9, records={**_records(), "note": ConfigRecord({"a": "b"})}),
    "metrics missing": lambda: _reply(9, records={"arrays": _records()["arrays"]}),
    "arrays renamed": lambda: _reply(9, records={"weights": _records()["arrays"], "metrics": _records()["metrics"]}),
    "metrics as a config record": lambda: _reply(
        9, records={"arrays": _records()["arrays"], "metrics": ConfigRecord({"num-examples": 5})}
    ),
    "array missing": lambda: _reply(9, {k: v for k, v in _state(0.5).items() if k != "b"}),
    "array extra": lambda: _reply(9, _state(0.5, extra=np.zeros(2, np.float32))),
    "array renamed": lambda: _reply(9, {("bias" if k == "b" else k): v for k, v in _state(0.5).items()}),
    "wrong shape": lambda: _reply(9, _state(0.5, w=np.zeros((3, 2), np.float32))),
    "wrong dtype": lambda: _reply(9, _state(0.5, w=np.zeros((2, 3), np.float64))),
    "float buffer for an int one": lambda: _reply(9, {**_state(0.5), "steps": np.array(4.0, np.float32)}),
    "NaN": lambda: _reply(9, _state(float("nan"))),
    "Inf": lambda: _reply(9, _state(float("inf"))),
    "undecodable array": lambda: _reply(
        9, records={**_records(), "arrays": ArrayRecord({**_arrays(), "w": _garbled_array()})}
    ),
    "extra metric key": lambda: _reply(9, metrics=_metrics(spy=1.0)),
    "metric key missing": lambda: _reply(9, metrics={"train-loss": 0.3, "num-examples": EXAMPLES}),
    "metric of another type": lambda: _reply(9, metrics=_metrics(**{"train-loss": [0.3, 0.2]})),
    "accuracy out of range": lambda: _reply(9, metrics=_metrics(**{"train-accuracy": 7.0})),
    "non-finite loss": lambda: _reply(9, metrics=_metrics(**{"train-loss": float("inf")})),
    "num-examples negative": lambda: _reply(9, metrics=_metrics(-5)),
    "num-examples zero": lambda: _reply(9, metrics=_metrics(0)),
    "num-examples float": lambda: _reply(9, metrics=_metrics(100.0)),
    "num-examples 1e308": lambda: _reply(9, metrics=_metrics(1e308)),
    "num-examples 2**64": lambda: _reply(9, metrics=_metrics(2**64)),
    "sign flip x10": lambda: _reply(9, _state(-6.0)),
    "huge update": lambda: _reply(9, _state(1e6)),
}


def _arrays() -> dict[str, Array]:
    return {k: Array(v) for k, v in _state(0.5).items()}


def _records() -> dict:
    return {"arrays": ArrayRecord(_arrays()), "metrics": MetricRecord(_metrics())}


def _aggregate(strategy, replies) -> dict[str, np.ndarray]:
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return {k: v.numpy() for k, v in arrays.items()}


def _assert_model(out: dict, value: float) -> None:
    assert all(np.isfinite(v).all() for v in out.values())
    assert np.allclose(out["w"], value, atol=1e-6) and np.allclose(out["b"], value, atol=1e-6)
    assert out["steps"].dtype == np.int64 and int(out["steps"]) == 4  # integer buffers stay integers


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_reply_is_dropped_and_the_model_is_the_honest_average(case):
    strategy = _strategy()
    out = _aggregate(strategy, [*_honest(), HOSTILE[case]()])
    _assert_model(out, np.mean(HONEST))
    log = strategy.round_log[1]
    assert log["clients_ok"] == 3 and [d["node"] for d in log["dropped"]] == [9]
    assert strategy.node_drops == {"9": 1}


def test_every_hostile_reply_at_once_leaves_only_the_honest_average():
    for name in STRATEGIES:
        if name == "krum":
            continue  # Krum keeps one reply; checked below
        strategy = _strategy(name)
        out = _aggregate(strategy, [*_honest(), *(make() for make in HOSTILE.values())])
        expected = np.median(HONEST) if name == "fedmedian" else np.mean(HONEST)
        _assert_model(out, expected)
        assert strategy.round_log[1]["clients_dropped"] == len(HOSTILE)


def test_an_inflated_example_count_buys_no_more_than_the_median_claim():
    inflated = _reply(4, _state(HONEST[0]), _metrics(10**9))  # honest weights, a lie about its data
    out = _aggregate(_strategy(), [*_honest(), inflated])
    _assert_model(out, (2 * HONEST[0] + HONEST[1] + HONEST[2]) / 4)  # weight capped at the median claim (100)
    claimed = _aggregate(_strategy(weighting="claimed"), [*_honest(), _reply(4, _state(HONEST[0]), _metrics(10**9))])
    assert abs(float(claimed["w"][0, 0]) - HONEST[0]) < 1e-5  # as Flower's FedAvg would: the liar owns the mean
    uniform = _aggregate(_strategy(weighting="uniform"), [_reply(1, _state(0.2), _metrics(1)), _reply(2, _state(0.4))])
    _assert_model(uniform, 0.3)


def test_granted_weights():
    assert granted_weights([10, 30, 10**12], "capped") == [10, 30, 30]
    assert granted_weights([10, 30, 10**12], "capped", max_examples=20) == [10, 20, 20]
    assert granted_weights([10, 30], "uniform") == [1, 1]
    assert granted_weights([10, 2**40, 2**40], "claimed") == [10, 2**40, 2**40]  # sums stay finite: ints


def test_clipping_keeps_an_oversized_update_at_the_bound():
    strategy = _strategy(norm_clip=True, norm_bound=2.0)
    out = _aggregate(strategy, [*_honest(), _reply(4, _state(60.0))])  # ~100x the honest updates' norm

    def norm(value: float) -> float:  # ||reply - global||: 9 float entries of `value`, the int buffer at 4
        return float(np.sqrt(9 * value**2 + 4**2))

    bound = 2.0 * np.median([norm(v) for v in [*HONEST, 60.0]])
    clipped = 60.0 * bound / norm(60.0)  # float entries shrink along the update; integer buffers stay
    expected = (sum(HONEST) + clipped) / 4
    assert np.allclose(out["w"], expected, atol=1e-5) and int(out["steps"]) == 4
    assert strategy.round_log[1]["clients_dropped"] == 0


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_resists_a_sign_flipping_minority(name):
    honest = [_reply(i + 1, _state(0.5 + 0.01 * i, steps=0)) for i in range(8)]
    attackers = [_reply(20 + i, _state(-5.0 * (1 + i), steps=0)) for i in range(2)]  # sign flip x10, x20
    # without the relative norm bound the attack reaches aggregation, where only robust rules resist it
    strategy = _strategy(name, norm_bound=0.0)
    out = _aggregate(strategy, [*honest, *attackers])
    values = out["w"]

    def fresh():
        return [_reply(i + 1, _state(0.5 + 0.01 * i, steps=0)) for i in range(8)] + [
            _reply(20 + i, _state(-5.0 * (1 + i), steps=0)) for i in range(2)
        ]

    if name in ("fedavg", "fedprox"):
        assert values.mean() < 0.3  # the mean is dragged towards the attackers
        bounded = _aggregate(_strategy(name), fresh())  # default: relative norm bound 3x median
        assert 0.5 <= bounded["w"].mean() <= 0.58
    else:
        assert 0.5 <= values.mean() <= 0.58, f"{name} let the attackers in: {values.mean()}"


def test_a_round_without_enough_valid_replies_keeps_the_model_until_too_many_fail():
    strategy = _strategy(min_valid_replies=2, max_failed_rounds=2)
    one_good = [_reply(1, _state(0.5)), _reply(2, _state(float("nan")))]
    assert strategy.aggregate_train(1, one_good) == (None, None)  # Flower keeps the previous model
    assert "only 1 valid client updates of 2" in strategy.round_log[1]["failed"]
    strategy.set_reference(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    _aggregate(strategy, [*_honest()][:2])  # a good round resets the count
    assert strategy.failed_streak == 0
    assert strategy.aggregate_train(3, []) == (None, None)
    with pytest.raises(FederationError, match="2 consecutive rounds without a new global model"):
        strategy.aggregate_train(4, [Message(Error(code=0, reason="offline"), reply_to=_request(1))])


def _eval_reply(node: int, metrics=None, records=None) -> Message:
    metrics = metrics if metrics is not None else {"eval-loss": 0.5, "eval-accuracy": 0.8, "num-examples": 10}
    content = records if records is not None else {"metrics": MetricRecord(metrics)}
    return Message(content=RecordDict(content), reply_to=_request(node, MessageType.EVALUATE))


def test_evaluation_replies_are_screened_too():
    strategy = _strategy()
    honest = [
        _eval_reply(1, {"eval-loss": 0.4, "eval-accuracy": 0.8, "num-examples": 10}),
        _eval_reply(2, {"eval-loss": 0.6, "eval-accuracy": 0.6, "num-examples": 10}),
    ]
    hostile = [
        _eval_reply(3, {"eval-loss": 0.5, "eval-accuracy": 0.7, "num-examples": 10, "spy": 1.0}),
        _eval_reply(4, {"eval-loss": [0.5], "eval-accuracy": 0.7, "num-examples": 10}),
        _eval_reply(5, {"eval-loss": 0.5, "eval-accuracy": 0.0, "num-examples": 10**9}),  # capped, kept
        _eval_reply(6, records={"metrics": MetricRecord({"eval-loss": 0.5}), "x": ConfigRecord({"a": 1})}),
        _eval_reply(7, {"eval-loss": float("nan"), "eval-accuracy": 0.7, "num-examples": 10}),
        Message(Error(code=0, reason="timeout"), reply_to=_request(8, MessageType.EVALUATE)),
    ]
    metrics = strategy.aggregate_evaluate(1, [*honest, *hostile])
    assert metrics["eval-accuracy"] == pytest.approx((0.8 + 0.6 + 0.0) / 3)
    assert strategy.round_log[1]["eval_dropped"] == 5
    assert strategy.aggregate_evaluate(2, hostile[:2]) is None


def test_screening_settings_are_checked():
    with pytest.raises(ConfigError, match="weighting 'votes'"):
        ScreeningConfig(weighting="votes")
    with pytest.raises(ConfigError, match="byzantine-fraction"):
        ScreeningConfig(byzantine_fraction=0.5)
    with pytest.raises(ConfigError, match="strategy 'krum2'"):
        build_strategy("krum2")


def test_sampling_is_seeded_and_resumes_from_its_state():
    class Fleet:
        def get_node_ids(self):
            return [50, 10, 40, 30, 20, 60]

    def draws(strategy, rounds):
        return [
            [m.metadata.dst_node_id for m in strategy.configure_train(r, ArrayRecord(), ConfigRecord(), Fleet())]
            for r in rounds
        ]

    def make():
        return build_strategy(
            "fedavg", ScreeningConfig(sampling_seed=7), fraction_train=0.5, min_train_nodes=1, min_available_nodes=1
        )

    first = make()
    full = draws(first, range(1, 5))
    assert all(len(d) == 3 for d in full) and len({tuple(d) for d in full}) > 1
    resumed, again = make(), make()
    assert draws(again, range(1, 5)) == full
    draws(resumed, range(1, 3))
    state = resumed.state()
    fresh = make()
    fresh.restore(state)
    assert draws(fresh, range(3, 5)) == full[2:]


def test_bench_byzantine_drops_every_sign_flipping_reply_and_resumes_from_its_cells(tmp_path, capsys):
    import json

    from simulations.bench_byzantine import main

    args = ["--dataset", "digits", "--clients", "5", "--rounds", "2", "--client-examples", "60"]
    args += ["--attacks", "sign-flip", "--fractions", "0,0.2", "--strategies", "fedavg", "--out", str(tmp_path)]
    assert main(args) == 0
    cells = json.loads((tmp_path / "cells.json").read_text())["cells"]
    clean, attacked = sorted(cells, key=lambda c: c["fraction"])
    assert clean["dropped_replies"] == 0 and attacked["attackers"] == 1
    assert attacked["dropped_replies"] == 2  # the attacker's reply, in each of the 2 rounds
    assert "| fedavg   |" in (tmp_path / "table.md").read_text()
    capsys.readouterr()
    assert main(args) == 0  # every cell is on disk: nothing runs again
    assert "%:" not in capsys.readouterr().out
