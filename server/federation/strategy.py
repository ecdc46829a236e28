"""Screened aggregation: every Flower strategy behind one reply schema a device cannot break.

Flower's strategies trust their replies: a reply with an extra record, a metric of another type
or a huge example count raises inside aggregation (ending the ServerApp) or takes over the
average. Here each strategy (:data:`STRATEGIES`: FedAvg, FedProx and Flower's Byzantine-robust
Krum, MultiKrum, Bulyan, FedMedian, FedTrimmedAvg) is subclassed with :class:`ScreenedStrategy`,
which runs before Flower sees a reply:

1. **Schema** (:func:`screen_train_reply`, :func:`screen_evaluate_reply`): exactly the records,
   array names / shapes / dtypes and metric keys / types of :mod:`common.replies`; finite values;
   anything else, and error replies, are dropped with one warning naming the node and the reason.
2. **Update norm**: dropped (or, with ``norm_clip``, clipped) when the L2 distance to the global
   model exceeds ``max_update_norm`` or ``norm_bound`` x the round's median distance.
3. **Weight**: the claimed ``num-examples`` is replaced by the weight the server grants
   (``weighting``: ``capped`` at ``max_examples`` or the round's median claim, ``uniform``, or
   ``claimed``), so one device cannot buy the average.
4. **Aggregation** by the Flower parent on canonical replies; the result is cast back to the
   global model's dtypes and checked finite.

A round with fewer than ``min_valid_replies`` usable replies, or whose aggregation fails, keeps
the previous global model (Flower's convention) and the federation goes on; only
``max_failed_rounds`` consecutive failed rounds stop it. Node sampling uses a seeded RNG whose
state the federation checkpoints (:meth:`ScreenedStrategy.state` / :meth:`restore`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum

from common import diversity, replies
from common.errors import ConfigError, EdgeDistillError
from common.faults import fault_point

log = logging.getLogger("edgedistill.server")
WEIGHTINGS = ("capped", "uniform", "claimed")


class FederationError(EdgeDistillError):
    """The federation cannot go on producing a trustworthy global model."""


@dataclass(frozen=True)
class ScreeningConfig:
    """How replies are screened and weighted (run-config keys of the same names, with dashes)."""

    max_update_norm: float = 1e3  # absolute bound on ||reply - global||_2
    norm_bound: float = 3.0  # relative bound: x the round's median update norm (0: off); needs >= 3 replies
    norm_clip: bool = False  # clip updates past a bound to it instead of dropping them
    weighting: str = "capped"  # capped | uniform | claimed (num-examples as sent)
    max_examples: int = 0  # cap of the "capped" weighting (0: the round's median claim)
    min_valid_replies: int = 1
    max_failed_rounds: int = 3  # consecutive rounds without a new model before the federation stops
    byzantine_fraction: float = 0.2  # share of replies Krum / MultiKrum / Bulyan / FedTrimmedAvg assume hostile
    sampling_seed: int = 0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting {self.weighting!r}: use {', '.join(WEIGHTINGS)}")
        if self.max_update_norm <= 0 or self.norm_bound < 0 or self.max_examples < 0:
            raise ConfigError("max-update-norm must be > 0, norm-bound and max-examples >= 0")
        if self.min_valid_replies < 1 or self.max_failed_rounds < 1:
            raise ConfigError("min-valid-replies and max-failed-rounds must be >= 1")
        if not 0.0 <= self.byzantine_fraction < 0.5:
            raise ConfigError(f"byzantine-fraction {self.byzantine_fraction} must lie in [0, 0.5)")


@dataclass
class TrainReply:
    """A training reply that passed the schema, in plain numbers."""

    msg: Message
    node: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float | int]
    norm: float  # L2 distance to the global model
    stats: list[diversity.ClassStatistics] | None = None


def _node(msg: Message) -> int:
    try:
        return int(msg.metadata.src_node_id)
    except Exception:
        return -1


def _check_records(content: RecordDict, arrays: set[str], metrics: set[str]) -> None:
    names = set(content.keys())
    if names != arrays | metrics:
        raise ValueError(f"reply records {sorted(names)}, expected {sorted(arrays | metrics)}")
    if set(content.array_records) != arrays or set(content.metric_records) != metrics:
        raise ValueError("reply records have the wrong types")


def screen_train_reply(
    msg: Message,
    reference: dict[str, np.ndarray],
    diversity_shape: tuple[int, int] | None = None,
) -> TrainReply:
    """Parse a training reply against the schema; ``ValueError`` says why it must be dropped."""
    if msg.has_error():
        raise ValueError(f"client error: {msg.error.reason}")
    content = msg.content
    extra = {diversity.RECORD_NAME} if diversity_shape is not None else set()
    _check_records(content, {replies.ARRAYS}, {replies.METRICS} | extra)
    metrics = replies.parse_metrics(content.metric_records[replies.METRICS], replies.TRAIN_METRICS)
    record = content.array_records[replies.ARRAYS]
    if set(record.keys()) != set(reference):
        raise ValueError(f"array names differ from the global model's ({len(record)} vs {len(reference)})")
    arrays, squared = {}, 0.0
    for name, ref in reference.items():
        try:
            value = record[name].numpy()
        except Exception as exc:  # undecodable bytes from a hostile client
            raise ValueError(f"array {name!r} cannot be decoded ({type(exc).__name__})") from None
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise ValueError(
                f"array {name!r} is {value.dtype}{list(value.shape)}, expected {ref.dtype}{list(ref.shape)}"
            )
        if not np.isfinite(value).all():
            raise ValueError(f"array {name!r} contains NaN or Inf")
        arrays[name] = value
        squared += float(np.sum((value.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = math.sqrt(squared)
    if not math.isfinite(norm):
        raise ValueError("update norm overflows")
    stats = None
    if diversity_shape is not None:
        classes, k_max = diversity_shape
        stats = diversity.from_record(content[diversity.RECORD_NAME], classes, k_max, int(metrics[replies.EXAMPLES]))
    return TrainReply(msg, _node(msg), arrays, metrics, norm, stats)


def screen_evaluate_reply(msg: Message) -> dict[str, float | int]:
    """An evaluation reply's metrics; ``ValueError`` says why it must be dropped."""
    if msg.has_error():
        raise ValueError(f"client error: {msg.error.reason}")
    _check_records(msg.content, set(), {replies.METRICS})
    return replies.parse_metrics(msg.content.metric_records[replies.METRICS], replies.EVAL_METRICS)


def granted_weights(claims: list[int], weighting: str, max_examples: int = 0) -> list[int]:
    """The aggregation weight of each reply from its claimed example count."""
    if weighting == "uniform":
        return [1] * len(claims)
    if weighting == "claimed":
        return list(claims)
    if not claims:
        return []
    cap = max_examples if max_examples > 0 else max(1, int(np.median(claims)))
    return [min(claim, cap) for claim in claims]


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, ValueError) else f"unreadable reply ({type(exc).__name__}: {exc})"


class ScreenedStrategy:
    """Mixin placed before a Flower strategy: schema, norm bound, weighting, drop-outs, seeded sampling."""

    def __init__(
        self,
        *args,
        screening: ScreeningConfig | None = None,
        diversity_shape: tuple[int, int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.screening = screening or ScreeningConfig()
        self.diversity_shape = diversity_shape  # (classes, k_max) when devices send class statistics
        self.latest_diversity: list[diversity.ClassStatistics] | None = None  # merged, last good round
        self.round_log: dict[int, dict] = {}
        self.failed_streak = 0
        self.node_drops: Counter[str] = Counter()
        self._rng = random.Random(self.screening.sampling_seed)
        self._reference: dict[str, np.ndarray] = {}

    # --- state the federation checkpoints -------------------------------------------------
    def state(self) -> dict:
        """What a resumed run needs to continue exactly (plain types, for ``torch.load(weights_only=True)``)."""
        stats = None
        if self.latest_diversity is not None:
            stats = [(s.n, list(s.inertia), list(s.silhouette)) for s in self.latest_diversity]
        return {
            "failed_streak": self.failed_streak,
            "node_drops": dict(self.node_drops),
            "rng": self._rng.getstate(),
            "diversity": stats,
        }

    def restore(self, state: dict) -> None:
        self.failed_streak = int(state["failed_streak"])
        self.node_drops = Counter(state["node_drops"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        if state.get("diversity") is not None:
            self.latest_diversity = [diversity.ClassStatistics(n, tuple(i), tuple(s)) for n, i, s in state["diversity"]]

    # --- sampling ---------------------------------------------------------------------------
    def set_reference(self, arrays: ArrayRecord) -> None:
        """The global model the next replies are checked against."""
        self._reference = {name: array.numpy() for name, array in arrays.items()}

    def _sample(self, grid: Grid, fraction: float, min_nodes: int) -> list[int]:
        """Seeded sample of the connected nodes (sorted ids, so the same fleet gives the same draw)."""
        wanted = max(self.min_available_nodes, min_nodes)
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            log.info("waiting for nodes: %d connected, %d needed", len(nodes), wanted)
            time.sleep(1)
        size = min(len(nodes), max(int(len(nodes) * fraction), min_nodes))
        return nodes if size == len(nodes) else sorted(self._rng.sample(nodes, size))

    def _messages(self, server_round: int, arrays, config, grid, fraction, min_nodes, kind) -> list[Message]:
        if fraction == 0.0:
            return []
        nodes = self._sample(grid, fraction, min_nodes)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, nodes, kind))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.set_reference(arrays)
        messages = self._messages(
            server_round, arrays, config, grid, self.fraction_train, self.min_train_nodes, MessageType.TRAIN
        )
        fault_point("round-start")
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self._messages(
            server_round, arrays, config, grid, self.fraction_evaluate, self.min_evaluate_nodes, MessageType.EVALUATE
        )

    # --- training replies -------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies_in: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        entry = self.round_log.setdefault(server_round, {})
        entry.update(clients_ok=0, clients_dropped=0, dropped=[])
        try:
            received = list(replies_in)
        except Exception as exc:
            return self._round_failed(server_round, f"replies unreadable ({type(exc).__name__})")
        accepted = []
        for msg in received:
            try:
                accepted.append(screen_train_reply(msg, self._reference, self.diversity_shape))
            except Exception as exc:
                self._drop(server_round, _node(msg), _reason(exc))
        accepted = self._bound_norms(server_round, accepted)
        entry.update(clients_ok=len(accepted))
        if len(accepted) < self.screening.min_valid_replies:
            return self._round_failed(
                server_round,
                f"only {len(accepted)} valid client updates of {len(received)} "
                f"(min-valid-replies is {self.screening.min_valid_replies})",
            )
        weights = granted_weights(
            [int(r.metrics[replies.EXAMPLES]) for r in accepted], self.screening.weighting, self.screening.max_examples
        )
        # replies arrive in any order; a fixed order makes the float sums, and so runs, repeatable
        ordered = sorted(zip(accepted, weights), key=lambda pair: (pair[1], _checksum(pair[0].arrays)))
        canonical = [self._canonical_train(reply, weight) for reply, weight in ordered]
        self._tune_for(len(canonical))
        fault_point("aggregation")
        try:
            arrays, metrics = super().aggregate_train(server_round, canonical)
            arrays = self._as_reference(arrays)
        except Exception as exc:
            return self._round_failed(server_round, f"aggregation failed ({type(exc).__name__}: {exc})")
        if arrays is None:
            return self._round_failed(server_round, f"{type(self).__name__} produced no model from {len(canonical)}")
        self.failed_streak = 0
        if self.diversity_shape is not None:
            stats = [r.stats for r in accepted if r.stats is not None]
            self.latest_diversity = diversity.merge(stats)
            entry["diversity_devices"] = len(stats)
        return arrays, metrics

    def _drop(self, server_round: int, node: int, reason: str) -> None:
        entry = self.round_log[server_round]
        entry["clients_dropped"] += 1
        entry["dropped"].append({"node": node, "reason": reason})
        self.node_drops[str(node)] += 1
        log.warning("round %d: dropping the reply of node %s: %s", server_round, node, reason)

    def _bound_norms(self, server_round: int, accepted: list[TrainReply]) -> list[TrainReply]:
        """Drop or clip updates past the absolute bound or ``norm_bound`` x the median norm."""
        screening = self.screening
        bound = screening.max_update_norm
        if screening.norm_bound > 0 and len(accepted) >= 3:
            bound = min(bound, screening.norm_bound * float(np.median([r.norm for r in accepted])))
        kept = []
        for reply in accepted:
            if reply.norm <= bound:
                kept.append(reply)
            elif screening.norm_clip:
                self._clip(reply, bound)
                kept.append(reply)
            else:
                self._drop(server_round, reply.node, f"update norm {reply.norm:.3g} exceeds the bound {bound:.3g}")
        return kept

    def _clip(self, reply: TrainReply, bound: float) -> None:
        scale = bound / reply.norm
        for name, value in reply.arrays.items():
            ref = self._reference[name]
            if np.issubdtype(ref.dtype, np.floating):
                reply.arrays[name] = (ref + (value - ref) * scale).astype(ref.dtype)
        reply.norm = bound

    def _canonical_train(self, reply: TrainReply, weight: int) -> Message:
        """The reply rebuilt with exactly Flower's expected records and the granted weight."""
        metrics = {k: v for k, v in reply.metrics.items() if k != replies.EXAMPLES}
        reply.msg.content = RecordDict(
            {
                replies.ARRAYS: ArrayRecord({k: Array(np.array(v, order="C")) for k, v in reply.arrays.items()}),
                replies.METRICS: MetricRecord({**metrics, replies.EXAMPLES: int(weight)}),
            }
        )
        return reply.msg

    def _tune_for(self, count: int) -> None:
        """Byzantine strategies: assume ``byzantine_fraction`` of this round's replies hostile."""
        hostile = int(self.screening.byzantine_fraction * count)
        if isinstance(self, Bulyan):
            hostile = min(hostile, max(0, (count - 3) // 4))  # Bulyan needs n >= 4f + 3
        if hasattr(self, "num_malicious_nodes"):
            self.num_malicious_nodes = hostile
        if isinstance(self, MultiKrum) and not isinstance(self, (Krum, Bulyan)):
            self.num_nodes_to_select = count - hostile  # MultiKrum's usual m = n - f
        if isinstance(self, FedTrimmedAvg):
            self.beta = self.screening.byzantine_fraction

    def _as_reference(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The aggregate in the global model's dtypes (integer buffers rounded); finite or an error."""
        if arrays is None:
            return None
        out = {}
        for name, ref in self._reference.items():
            value = arrays[name].numpy()
            if np.issubdtype(ref.dtype, np.integer):
                value = np.rint(value)
            if not np.isfinite(value).all():
                raise FloatingPointError(f"aggregate of {name!r} is not finite")
            out[name] = Array(np.array(value, dtype=ref.dtype, order="C"))
        return ArrayRecord(out)

    def _round_failed(self, server_round: int, reason: str) -> tuple[None, None]:
        """Keep the previous global model; stop after ``max_failed_rounds`` in a row."""
        self.failed_streak += 1
        self.round_log.setdefault(server_round, {})["failed"] = reason
        allowed = self.screening.max_failed_rounds
        if self.failed_streak >= allowed:
            raise FederationError(
                f"round {server_round}: {reason}; {self.failed_streak} consecutive rounds without a new global "
                f"model (max-failed-rounds is {allowed}). Check the devices' logs, then continue with resume"
            )
        log.warning(
            "round %d keeps the previous global model: %s (%d of %d consecutive failures allowed)",
            server_round,
            reason,
            self.failed_streak,
            allowed - 1,
        )
        return None, None

    # --- evaluation replies -----------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies_in: Iterable[Message]) -> MetricRecord | None:
        entry = self.round_log.setdefault(server_round, {})
        kept, parsed = [], []
        dropped = 0
        for msg in list(replies_in):
            try:
                parsed.append(screen_evaluate_reply(msg))
                kept.append(msg)
            except Exception as exc:
                dropped += 1
                log.warning(
                    "round %d: dropping the evaluation reply of node %s: %s", server_round, _node(msg), _reason(exc)
                )
        entry["eval_dropped"] = dropped
        if not kept:
            return None
        weights = granted_weights(
            [int(m[replies.EXAMPLES]) for m in parsed], self.screening.weighting, self.screening.max_examples
        )
        for msg, metrics, weight in zip(kept, parsed, weights):
            msg.content = RecordDict({replies.METRICS: MetricRecord({**metrics, replies.EXAMPLES: int(weight)})})
        try:
            return super().aggregate_evaluate(server_round, kept)
        except Exception as exc:
            log.warning("round %d: evaluation replies not aggregated (%s)", server_round, exc)
            return None


def _checksum(arrays: dict[str, np.ndarray]) -> float:
    return sum(float(np.sum(a, dtype=np.float64)) for a in arrays.values())


class ScreenedFedAvg(ScreenedStrategy, FedAvg):
    """FedAvg: the example-weighted mean (efficient; trusts every screened reply)."""


class ScreenedFedProx(ScreenedStrategy, FedProx):
    """FedProx: FedAvg whose clients add mu/2 ||w - w_global||^2 (heterogeneous devices)."""


class ScreenedKrum(ScreenedStrategy, Krum):
    """Krum: the one reply closest to its n - f - 2 nearest neighbours."""


class ScreenedMultiKrum(ScreenedStrategy, MultiKrum):
    """MultiKrum: the mean of the replies Krum ranks best."""


class ScreenedBulyan(ScreenedStrategy, Bulyan):
    """Bulyan: MultiKrum selection, then a coordinate-wise trimmed mean around the median."""


class ScreenedFedMedian(ScreenedStrategy, FedMedian):
    """FedMedian: the coordinate-wise median."""


class ScreenedFedTrimmedAvg(ScreenedStrategy, FedTrimmedAvg):
    """FedTrimmedAvg: the coordinate-wise mean without the byzantine-fraction tails."""


STRATEGIES: dict[str, type[ScreenedStrategy]] = {
    "fedavg": ScreenedFedAvg,
    "fedprox": ScreenedFedProx,
    "krum": ScreenedKrum,
    "multikrum": ScreenedMultiKrum,
    "bulyan": ScreenedBulyan,
    "fedmedian": ScreenedFedMedian,
    "fedtrimmedavg": ScreenedFedTrimmedAvg,
}


def build_strategy(name: str, screening: ScreeningConfig | None = None, **flower_options) -> ScreenedStrategy:
    """The screened strategy ``name`` (see :data:`STRATEGIES`) with Flower's own options."""
    if name not in STRATEGIES:
        raise ConfigError(f"strategy {name!r}: use one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](screening=screening, **flower_options)
