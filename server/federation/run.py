"""The federated run on the server: FedAvg rounds, central evaluation, checkpoints, resume.

:func:`run_federation` is what the Flower ServerApp calls. After every round it evaluates the
global model on the real test split, appends to the metrics history, and writes a checkpoint
(global weights + round + history + RNG state) atomically; ``resume`` continues from it for the
remaining rounds. Every ``distill_every`` rounds and after the last one it runs the *server
distillation round* hook: for now it saves the global model where distillers look for it
(``OUT/global-model/``), with the weight decay the clients used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import from_text
from common.datasets import load_dataset
from common.errors import ConfigError
from common.faults import fault_point
from common.fileio import atomic_write_json, remove_temporaries
from common.modelio import save_model
from common.models import build_model
from common.runtime import derive_seed
from common.training import evaluate_model
from edge_client.task import ClientTaskConfig
from server.federation.handoff import collect_rounds
from server.federation.rounds import distill_and_evaluate

log = logging.getLogger("edgedistill.server")
CHECKPOINT_FILE = "federation-checkpoint.pt"
GLOBAL_MODEL_DIR = "global-model"


@dataclass(frozen=True)
class FederationConfig(ClientTaskConfig):
    """The run config of the ServerApp (``[tool.flwr.app.config]``; dashes or underscores).

    It extends what every client is told each round (:class:`ClientTaskConfig`: dataset,
    partition, local training) with the server's own settings.
    """

    num_rounds: int = 3
    strategy: str = "fedavg"  # a name in server.federation.strategy.STRATEGIES
    proximal_mu: float = 0.01  # sent to clients only with strategy fedprox
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    min_valid_replies: int = 1
    max_failed_rounds: int = 3  # consecutive rounds without a new global model before the run stops
    max_update_norm: float = 1e3  # absolute bound on a reply's L2 distance to the global model
    norm_bound: float = 3.0  # relative bound: x the round's median update norm (0: off)
    norm_clip: bool = False  # clip updates past a bound instead of dropping them
    weighting: str = "capped"  # capped | uniform | claimed: how far a device's claimed num-examples counts
    max_examples: int = 0  # cap of the capped weighting (0: the round's median claim)
    byzantine_fraction: float = 0.2  # share of replies krum / multikrum / bulyan / fedtrimmedavg assume hostile
    round_timeout: float = 600.0
    out_dir: str = "runs/federation"
    resume: bool = False
    resume_allow_changes: bool = False  # resume although settings that alter the result changed
    distill_every: int = 0  # server distillation round every K rounds (0: only at the end)
    distill_method: str = ""  # a registry method run in each server distillation round ("": save the model only)
    distill_ipc: str = "10"
    distill_iterations: int = 1000  # at least 1,000 (issue 12): fewer leave DM and DKKT far from converged
    distill_time_limit: float = 3600.0  # seconds; a round's distillation stops early past it
    distill_options: str = ""  # more method options, "name=value,name=value"
    distill_allocation: str = "fixed"  # fixed | adaptive (K-means on the public subset) | federated (device statistics)
    distill_eval_runs: int = 2
    distill_eval_epochs: int = 300
    # hand the rounds to a job service (edgedistill serve) instead of distilling in this process
    distill_service: str = ""  # HOST:PORT ("": distil in-process)
    distill_service_token_file: str = ""
    distill_service_ca: str = ""  # TLS: the service's CA certificate
    distill_service_cert: str = ""  # mutual TLS: this federation's client certificate ...
    distill_service_key: str = ""  # ... and its key
    distill_service_wait: float = 3600.0  # seconds the end of the run waits for outstanding jobs

    def __post_init__(self) -> None:
        from server.federation.strategy import STRATEGIES

        if self.num_rounds < 1:
            raise ConfigError("num-rounds must be >= 1")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if not 0.0 < self.fraction_train <= 1.0 or not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError("fraction-train must lie in (0, 1] and fraction-evaluate in [0, 1]")
        self.screening()  # its own range checks
        if self.distill_allocation not in ("fixed", "adaptive", "federated"):
            raise ConfigError(f"distill-allocation {self.distill_allocation!r}: use fixed, adaptive or federated")
        if self.distill_method:
            self.round_plan()  # unknown methods and options fail before the first round, not after it

    def screening(self):
        """How the strategy screens and weights replies (see server.federation.strategy)."""
        from server.federation.strategy import ScreeningConfig

        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ScreeningConfig) if hasattr(self, f.name)}
        return ScreeningConfig(**shared, sampling_seed=derive_seed("node-sampling", self.seed))

    def round_plan(self):
        """The server distillation round's plan (``distill_*`` keys of the run config)."""
        from server.federation.rounds import RoundPlan
        from server.methods.registry import get_method, parse_options

        get_method(self.distill_method)
        return RoundPlan(
            method=self.distill_method,
            ipc=self.distill_ipc,
            pipc=self.pipc,
            iterations=self.distill_iterations,
            time_limit=self.distill_time_limit,
            options=parse_options(self.distill_method, self.distill_options),
            eval_runs=self.distill_eval_runs,
            eval_epochs=self.distill_eval_epochs,
            seed=self.seed,
            allocation=self.distill_allocation,
            allocation_k_max=self.diversity_k_max,
        )

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederationConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in dict(run_config).items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"unknown run-config key {key!r}; known keys: {', '.join(sorted(fields))}")
            kind = type(fields[name].default)
            try:
                values[name] = from_text(kind, value)
            except ValueError:
                raise ConfigError(f"run-config key {key!r} needs a {kind.__name__}, got {value!r}") from None
        return cls(**values)

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """The run config (dashed keys) that :meth:`from_run_config` reads back to this config."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def client_task(self) -> ClientTaskConfig:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ClientTaskConfig)}
        return ClientTaskConfig(
            **{
                **shared,
                "proximal_mu": self.proximal_mu if self.strategy == "fedprox" else 0.0,
                "diversity_stats": self.diversity_stats or self.distill_allocation == "federated",
            }
        )


@dataclass
class FederationResult:
    history: list[dict]
    final_round: int
    out_dir: Path


def make_strategy(config: FederationConfig, num_classes: int):
    from server.federation.strategy import build_strategy

    task = config.client_task()
    extra = {"proximal_mu": config.proximal_mu} if config.strategy == "fedprox" else {}
    return build_strategy(
        config.strategy,
        config.screening(),
        diversity_shape=(num_classes, task.diversity_k_max) if task.diversity_stats else None,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=min(config.min_train_nodes, config.min_available_nodes),
        min_evaluate_nodes=min(config.min_train_nodes, config.min_available_nodes),
        min_available_nodes=config.min_available_nodes,
        **extra,
    )


# settings a resume may change: they do not alter what the finished rounds computed
RESUME_MAY_CHANGE = frozenset(
    {"num_rounds", "resume", "resume_allow_changes", "out_dir", "data_root", "round_timeout", "min_available_nodes"}
)


def resume_settings(config: FederationConfig) -> dict:
    """The settings a checkpoint records and a resume must repeat."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUME_MAY_CHANGE}


def check_resume_settings(saved: dict | None, config: FederationConfig, ckpt: Path) -> None:
    """Refuse to resume with settings that alter the result, unless ``resume-allow-changes``."""
    if config.resume_allow_changes:
        return
    if saved is None:
        raise ConfigError(f"{ckpt} records no settings (older version); set resume-allow-changes=true to resume it")
    now = resume_settings(config)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        shown = ", ".join(f"{k.replace('_', '-')} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        raise ConfigError(
            f"resume: settings differ from the interrupted run's: {shown}{more}; use the same settings, "
            "or set resume-allow-changes=true to go on with the new ones"
        )


def check_resume(config: FederationConfig) -> dict | None:
    """The checkpoint a resume continues from (None when not resuming), after checking its settings."""
    if not config.resume:
        return None
    ckpt = Path(config.out_dir) / CHECKPOINT_FILE
    if not ckpt.exists():
        raise ConfigError(f"resume: no checkpoint at {ckpt}; run without resume to start fresh")
    state = load_checkpoint(ckpt, {})
    check_resume_settings(state.get("settings"), config, ckpt)
    return state


def run_federation(
    grid: Grid,
    config: FederationConfig,
    on_round: Callable[[dict], None] | None = None,
) -> FederationResult:
    """Run (or resume) the federation; every round's state is checkpointed before the next starts.

    A checkpoint written before a server distillation round names it ``pending_distillation``,
    so a run killed during distillation runs that round's distillation first when resumed.
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if removed := remove_temporaries(out):
        log.info("removed leftovers of an interrupted run: %s", ", ".join(removed))
    data = load_dataset(config.dataset, data_root=config.data_root or None)
    info = data.info
    torch.manual_seed(derive_seed("global-init", config.seed))
    model = build_model(config.model, info.channels, info.num_classes, info.image_size)
    strategy = make_strategy(config, info.num_classes)
    ckpt = out / CHECKPOINT_FILE
    done, history, pending = 0, [], None
    state = check_resume(config)
    if state is not None:
        model.load_state_dict(state["global_state"])
        done, history = int(state["round"]), list(state["history"])
        torch.set_rng_state(state["torch_rng"])
        strategy.restore(state["strategy"])
        pending = state.get("pending_distillation")
        log.info("resuming after round %d of %d", done, config.num_rounds)

    def checkpoint(server_round: int, pending_round: int | None = None) -> None:
        state = {
            "settings": resume_settings(config),
            "global_state": model.state_dict(),
            "round": server_round,
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "strategy": strategy.state(),
            "pending_distillation": pending_round,
        }
        save_checkpoint(ckpt, state)

    def distillation_round(server_round: int) -> None:
        record = next(h for h in history if h["round"] == server_round)
        record.update(
            server_distillation_round(
                model, data, config, server_round, out, record["accuracy"], strategy.latest_diversity
            )
        )
        checkpoint(server_round)  # now with the distillation metrics in the history, nothing pending

    if pending is not None:
        log.info("running the server distillation round of round %d, interrupted before", pending)
        distillation_round(int(pending))
        write_metrics(out, history, config, strategy)
    remaining = config.num_rounds - done
    if remaining <= 0:
        finish_handoff(config, data, history, out, strategy, lambda: checkpoint(done))
        return FederationResult(history, done, out)
    started = time.perf_counter()

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if local_round == 0 and done > 0:
            return None  # round 0 was evaluated by the interrupted run
        server_round = done + local_round
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate_model(model, data.test.images, data.test.labels)
        record = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "seconds": round(time.perf_counter() - started, 2),
            **{k: v for k, v in strategy.round_log.get(local_round, {}).items() if k != "dropped"},
        }
        history.append(record)
        if local_round > 0:
            last = server_round == config.num_rounds
            due = last or bool(config.distill_every and server_round % config.distill_every == 0)
            checkpoint(server_round, pending_round=server_round if due else None)
            if due:
                distillation_round(server_round)
        if config.distill_service:
            collect_rounds(config, data, history, out)  # jobs of earlier rounds that have finished
        write_metrics(out, history, config, strategy)
        if on_round is not None:
            on_round(record)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=remaining,
        timeout=config.round_timeout,
        train_config=ConfigRecord({**config.client_task().to_record(), "round-offset": done}),
        evaluate_config=ConfigRecord(config.client_task().to_record()),
        evaluate_fn=evaluate_fn,
    )
    finish_handoff(config, data, history, out, strategy, lambda: checkpoint(config.num_rounds))
    return FederationResult(history, config.num_rounds, out)


def finish_handoff(config: FederationConfig, data, history: list[dict], out: Path, strategy, save) -> None:
    """At the end of a run that handed rounds to a job service: wait for them, then record the results."""
    if not config.distill_service:
        return
    log.info("waiting up to %.0f s for the job service's outstanding rounds", config.distill_service_wait)
    if collect_rounds(config, data, history, out, wait_seconds=config.distill_service_wait):
        save()
        write_metrics(out, history, config, strategy)


def server_distillation_round(
    model, data, config: FederationConfig, server_round: int, out: Path, accuracy: float, device_statistics=None
) -> dict:
    """The hook after aggregation: save the global model; with ``distill_method``, distill and evaluate.

    ``device_statistics``: the devices' merged class statistics of this round, for the
    ``federated`` allocation (computed with the global model the devices received this round).

    Returns the round's distillation metrics for the history (empty when only the model is saved).
    """
    target = out / GLOBAL_MODEL_DIR
    digest = save_model(
        target,
        model,
        data.info,
        {
            "round": server_round,
            "accuracy": accuracy,
            "weight_decay": config.weight_decay,
            "optimizer": config.optimizer,
            "dataset_spec": config.dataset,
            "local_epochs": config.local_epochs,
        },
    )
    fault_point("distillation")
    if not config.distill_method:
        return {}
    if config.distill_service:
        from server.federation.handoff import submit_round

        return submit_round(config, data, target, server_round, out, device_statistics)
    plan = config.round_plan()
    log.info(
        "server distillation round after round %d: %s, ipc %s, pipc %s", server_round, plan.method, plan.ipc, plan.pipc
    )
    artifact = out / "distilled" / f"round-{server_round:04d}-{plan.method}"
    labels = {"round": server_round, "global_model_accuracy": accuracy, "federation_out": str(out)}
    result = distill_and_evaluate(
        data, plan, artifact, global_model=target, labels=labels, device_statistics=device_statistics
    )
    assert result["global_model_sha256"] == digest
    return {
        "distill_method": plan.method,
        "distilled_accuracy": result["accuracy"],
        "distilled_accuracy_std": result["accuracy_std"],
        "distill_seconds": result["distill_seconds"],
        "distilled_artifact": result["artifact"],
        "distill_stopped_early": result["stopped_early"],
        "distill_counts": result["counts"],
    }


def write_metrics(out: Path, history: list[dict], config: FederationConfig, strategy=None) -> None:
    """``metrics.json``: the config, the per-round history and each node's count of dropped replies."""
    drops = dict(sorted(strategy.node_drops.items())) if strategy is not None else {}
    payload = {"config": dataclasses.asdict(config), "history": history, "node_drops": drops}
    atomic_write_json(out / "metrics.json", payload)
    plot_history(out / "accuracy.png", history)


def plot_history(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.visualize import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["round"] for h in history], [100 * h["accuracy"] for h in history], marker="o", label="global model")
    distilled = [h for h in history if "distilled_accuracy" in h]
    if distilled:
        ax.plot(
            [h["round"] for h in distilled],
            [100 * h["distilled_accuracy"] for h in distilled],
            marker="s",
            label=f"distilled set ({distilled[-1]['distill_method']})",
        )
        ax.legend()
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def load_history(out: Path) -> list[dict]:
    return json.loads((Path(out) / "metrics.json").read_text())["history"]
