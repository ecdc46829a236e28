"""Robust aggregation: FedAvg / FedProx that drop malformed or hostile client updates.

A reply is dropped, with a warning naming the node, when it carries an error (drop-out,
timeout, crash), carries other records than ``arrays`` + ``metrics`` (+ ``diversity`` when the
server asked for class statistics, which must then parse as :func:`common.diversity.from_record`
says), has arrays whose names / shapes / dtypes differ from the
global model's, contains NaN or Inf, claims a non-positive or non-finite example count, or
moves the model further than ``max_update_norm`` (L2 norm of reply - global). The round then
aggregates the rest; with fewer than ``min_valid_replies`` left it fails with a clear error
instead of producing a corrupted model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from common import diversity
from common.errors import EdgeDistillError

log = logging.getLogger("edgedistill.server")


class FederationError(EdgeDistillError):
    """A round cannot produce a trustworthy global model."""


def inspect_reply(
    msg: Message, reference: dict[str, np.ndarray], max_update_norm: float, with_diversity: bool = False
) -> str | None:
    """Why this training reply must be dropped, or None if it is acceptable."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    expected = {"arrays", "metrics"} | ({diversity.RECORD_NAME} if with_diversity else set())
    if set(content.keys()) != expected or "arrays" not in content.array_records:
        return f"reply records {sorted(content.keys())}, expected {sorted(expected)}"
    if any(name not in content.metric_records for name in expected - {"arrays"}):
        return "reply records have the wrong types"
    metrics = content.metric_records["metrics"]
    examples = metrics.get("num-examples")
    if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        return f"invalid num-examples {examples!r}"
    arrays = content.array_records["arrays"]
    if set(arrays.keys()) != set(reference):
        return f"array names differ from the global model's ({len(arrays)} vs {len(reference)})"
    squared = 0.0
    for name, ref in reference.items():
        try:
            value = arrays[name].numpy()
        except Exception as exc:  # undecodable bytes from a hostile client
            return f"array {name!r} cannot be decoded ({type(exc).__name__})"
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return f"array {name!r} is {value.dtype}{list(value.shape)}, expected {ref.dtype}{list(ref.shape)}"
        if not np.isfinite(value).all():
            return f"array {name!r} contains NaN or Inf"
        squared += float(np.sum((value.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = math.sqrt(squared)
    if norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:.3g}"
    return None


def _reply_order_key(msg: Message) -> tuple[float, float]:
    arrays = msg.content.array_records["arrays"]
    checksum = sum(float(np.sum(a.numpy(), dtype=np.float64)) for a in arrays.values())
    return (float(msg.content.metric_records["metrics"]["num-examples"]), checksum)


class RobustAggregationMixin:
    """Validates training replies before the parent strategy aggregates them."""

    def __init__(
        self,
        *args,
        max_update_norm: float = 1e3,
        min_valid_replies: int = 1,
        diversity_shape: tuple[int, int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_update_norm = max_update_norm
        self.min_valid_replies = min_valid_replies
        self.diversity_shape = diversity_shape  # (classes, k_max) when devices send class statistics
        self.latest_diversity: list[diversity.ClassStatistics] | None = None  # merged, last round
        self._reference: dict[str, np.ndarray] = {}
        self.round_log: dict[int, dict] = {}

    def set_reference(self, arrays: ArrayRecord) -> None:
        """The global model the next replies are checked against."""
        self._reference = {name: array.numpy() for name, array in arrays.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.set_reference(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid, dropped, device_stats = [], [], []
        for msg in replies:
            problem = inspect_reply(msg, self._reference, self.max_update_norm, self.diversity_shape is not None)
            if problem is None and self.diversity_shape is not None:
                problem, stats = self._class_statistics(msg)
                device_stats.append(stats)
            if problem is None:
                valid.append(msg)
            else:
                node = msg.metadata.src_node_id
                dropped.append({"node": node, "reason": problem})
                log.warning("round %d: dropping the reply of node %s: %s", server_round, node, problem)
        self.round_log[server_round] = {"clients_ok": len(valid), "clients_dropped": len(dropped), "dropped": dropped}
        if len(valid) < self.min_valid_replies:
            raise FederationError(
                f"round {server_round}: only {len(valid)} valid client updates of {len(replies)} "
                f"(min-valid-replies is {self.min_valid_replies}); the global model was not updated. "
                "Check the clients' logs, or lower min-valid-replies"
            )
        if self.diversity_shape is not None:
            stats = [s for s in device_stats if s is not None]
            self.latest_diversity = diversity.merge(stats)
            self.round_log[server_round]["diversity_devices"] = len(stats)
        # replies arrive in any order; a fixed order makes the float sums, and so runs, repeatable
        valid.sort(key=_reply_order_key)
        return super().aggregate_train(server_round, valid)

    def _class_statistics(self, msg: Message) -> tuple[str | None, list[diversity.ClassStatistics] | None]:
        """Parse (and take out of the reply, so Flower sees only its own records) the class statistics."""
        classes, k_max = self.diversity_shape
        examples = int(msg.content.metric_records["metrics"]["num-examples"])
        try:
            stats = diversity.from_record(msg.content[diversity.RECORD_NAME], classes, k_max, examples)
        except ValueError as exc:
            return str(exc), None
        del msg.content[diversity.RECORD_NAME]
        return None, stats


class RobustFedAvg(RobustAggregationMixin, FedAvg):
    """FedAvg with reply validation."""


class RobustFedProx(RobustAggregationMixin, FedProx):
    """FedProx (clients add mu/2 ||w - w_global||^2) with reply validation."""
