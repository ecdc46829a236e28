"""Hostile devices against every screened strategy: final global accuracy per attack and share.

    python -m simulations.bench_byzantine --dataset mnist --data-root ../shared/data --clients 20 \\
        --rounds 5 --client-examples 300 --attacks sign-flip,shift,label-flip,inflated \\
        --fractions 0,0.1,0.2,0.3 --strategies fedavg,fedprox,krum,multikrum,bulyan,fedmedian,fedtrimmedavg \\
        --out runs/bench-byzantine

The federation runs in-process (no Ray) so that dozens of cells fit on a CPU: each round the
server's screened strategy (:mod:`server.federation.strategy`, default screening as in
``pyproject.toml``) receives real Flower reply Messages, built by the ClientApp's ``train_reply``,
from every device. Honest devices train their partition (``--client-examples`` images each) with
the run config's local training; the first ``fraction x clients`` devices attack:

- ``sign-flip``: train honestly, send ``global - 10 x update``;
- ``shift``: train honestly, add a constant to every float weight, scaled so the update norm is
  2.5x its honest norm (inside the default relative bound of 3x the median);
- ``label-flip``: train on labels ``C - 1 - y``;
- ``inflated``: label-flip training, and claim 10^9 examples.

``--norm-bound 0`` turns the relative norm bound off, to see what the aggregation rule alone does.

The final global model is tested on the real test split. Every finished cell is stored in
``--out/cells.json`` (a crashed run continues); the table goes to ``--out/table.md``
(``table-norm-bound-B.md`` with ``--norm-bound B``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from common.fileio import atomic_write_bytes
from common.models import build_model
from common.report import Cells, markdown_table
from common.runtime import derive_seed, make_generator
from common.training import evaluate_model, train_local

ATTACKS = ("sign-flip", "shift", "label-flip", "inflated")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default="")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--client-examples", type=int, default=300, help="private images per device (0: its partition)")
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "shards"])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--fractions", default="0,0.1,0.2,0.3")
    p.add_argument("--strategies", default="fedavg,fedprox,krum,multikrum,bulyan,fedmedian,fedtrimmedavg")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--norm-bound", type=float, default=3.0, help="relative norm bound of the screening (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-byzantine")
    p.add_argument("--report", action="store_true", help="only print the table of the cells finished so far")
    return p.parse_args(argv)


def _play_the_server() -> None:
    """Flower stamps every new Message with the running task's identity; this process is the server."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class Fleet:
    """The devices' private data (partitions of the training split) and their local training."""

    def __init__(self, args: argparse.Namespace) -> None:
        from edge_client.task import node_data
        from server.federation.run import FederationConfig

        self.args = args
        self.config = FederationConfig(
            dataset=args.dataset,
            data_root=args.data_root,
            partition=args.partition,
            alpha=args.alpha,
            lr=args.lr,
            local_epochs=args.local_epochs,
            seed=args.seed,
            norm_bound=args.norm_bound,
        )
        self.task = self.config.client_task()
        self.nodes = []
        for pid in range(args.clients):
            data = node_data({"partition-id": pid, "num-partitions": args.clients}, self.task)
            keep = len(data.train) if args.client_examples <= 0 else min(args.client_examples, len(data.train))
            order = torch.randperm(len(data.train), generator=make_generator(derive_seed("bench", args.seed, pid)))
            self.nodes.append(data.train.subset(order[:keep]))
            self.dataset = data.dataset
        self.info = self.dataset.info

    def model(self) -> torch.nn.Module:
        return build_model(self.config.model, self.info.channels, self.info.num_classes, self.info.image_size)

    def train(self, pid: int, state: dict, server_round: int, flip_labels: bool, mu: float = 0.0) -> tuple[dict, dict]:
        model = self.model()
        model.load_state_dict(state)
        split = self.nodes[pid]
        labels = (self.info.num_classes - 1 - split.labels) if flip_labels else split.labels
        torch.manual_seed(derive_seed("client-torch", self.args.seed, server_round, pid))
        generator = make_generator(derive_seed("client", self.args.seed, server_round, pid))
        config = dataclasses.replace(self.task.local_train(), proximal_mu=mu)  # FedProx: mu/2 ||w - w_global||^2
        metrics = train_local(model, split.images, labels, config, generator)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


def attacked(attack: str, honest: dict, global_state: dict) -> dict:
    """What an attacker sends instead of its honest model (sign-flip, shift)."""
    out = {}
    update_sq = sum(
        float(((honest[k] - global_state[k]).double() ** 2).sum()) for k in honest if honest[k].is_floating_point()
    )
    floats = sum(v.numel() for v in honest.values() if v.is_floating_point())
    shift = 2.5 * np.sqrt(update_sq) / np.sqrt(floats)  # the norm of shift x ones is 2.5x the honest update's
    for name, value in honest.items():
        if not value.is_floating_point():
            out[name] = value
        elif attack == "sign-flip":
            out[name] = global_state[name] - 10.0 * (value - global_state[name])
        else:  # shift
            out[name] = value + shift
    return out


def run_cell(fleet: Fleet, strategy_name: str, attack: str, fraction: float) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from edge_client.client_app import train_reply
    from server.federation.strategy import build_strategy

    args = fleet.args
    attackers = int(round(fraction * args.clients))
    extra = {"proximal_mu": fleet.config.proximal_mu} if strategy_name == "fedprox" else {}
    strategy = build_strategy(
        strategy_name, fleet.config.screening(), min_train_nodes=1, min_available_nodes=1, **extra
    )
    torch.manual_seed(derive_seed("global-init", args.seed))
    model = fleet.model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    for server_round in range(1, args.rounds + 1):
        arrays = ArrayRecord(state)
        strategy.set_reference(arrays)
        replies_in = []
        for pid in range(args.clients):
            hostile = pid < attackers
            flip = hostile and attack in ("label-flip", "inflated")
            trained, metrics = fleet.train(pid, state, server_round, flip, extra.get("proximal_mu", 0.0))
            if hostile and attack in ("sign-flip", "shift"):
                trained = attacked(attack, trained, state)
            claimed = 10**9 if hostile and attack == "inflated" else len(fleet.nodes[pid])
            request = Message(
                content=RecordDict({"arrays": arrays, "config": ConfigRecord()}),
                dst_node_id=pid + 1,
                message_type=MessageType.TRAIN,
            )
            replies_in.append(Message(content=train_reply(trained, metrics, claimed), reply_to=request))
        new, _ = strategy.aggregate_train(server_round, replies_in)
        if new is not None:
            state = new.to_torch_state_dict()
    model.load_state_dict(state)
    _, accuracy = evaluate_model(model, fleet.dataset.test.images, fleet.dataset.test.labels)
    dropped = sum(entry.get("clients_dropped", 0) for entry in strategy.round_log.values())
    return {
        "accuracy": accuracy,
        "dropped_replies": dropped,
        "attackers": attackers,
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(cells: list[dict], strategies: list[str]) -> str:
    columns = sorted({(c["attack"], c["fraction"]) for c in cells}, key=lambda t: (t[1] > 0, t[0], t[1]))
    headers = ["strategy"] + ["clean" if f == 0 else f"{a} {int(round(100 * f))} %" for a, f in columns]
    rows = []
    for name in strategies:
        row = [name]
        for attack, fraction in columns:
            cell = next(
                (c for c in cells if (c["strategy"], c["attack"], c["fraction"]) == (name, attack, fraction)), None
            )
            row.append(f"{100 * cell['accuracy']:.2f}" if cell else "-")
        rows.append(row)
    return markdown_table(headers, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    _play_the_server()
    out = Path(args.out)
    cells = Cells(out / "cells.json")
    fleet = None if args.report else Fleet(args)
    strategies = [s for s in args.strategies.split(",") if s]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    plan = [("none", 0.0)] if 0.0 in fractions else []
    plan += [(a, f) for f in fractions if f > 0 for a in args.attacks.split(",") if a]
    setup = {
        "dataset": args.dataset,
        "clients": args.clients,
        "rounds": args.rounds,
        "client_examples": args.client_examples,
        "partition": args.partition,
        "seed": args.seed,
    }
    if args.norm_bound != 3.0:  # cells of the default screening carry no key for it
        setup["norm_bound"] = args.norm_bound
    for attack, fraction in plan:
        for name in strategies:
            key = {**setup, "strategy": name, "attack": attack, "fraction": fraction}
            if cells.get(key) is None and fleet is not None:
                result = run_cell(fleet, name, attack, fraction)
                cells.add({**key, **result})
                print(
                    f"{name:>13} {attack:>10} {int(round(100 * fraction)):>3} %: {100 * result['accuracy']:.2f} % "
                    f"({result['dropped_replies']} replies dropped, {result['seconds']} s)",
                    flush=True,
                )
    mine = [c for c in cells.done if all(c.get(k) == v for k, v in setup.items())]
    if "norm_bound" not in setup:
        mine = [c for c in mine if "norm_bound" not in c]
    text = (
        f"{args.dataset}, {args.clients} devices ({args.partition}, {args.client_examples} images each), "
        f"{args.rounds} rounds, relative norm bound {args.norm_bound:g} x median; final global test accuracy %"
        f"\n\n{table(mine, strategies)}\n"
    )
    print("\n" + text)
    if not args.report:
        name = "table.md" if "norm_bound" not in setup else f"table-norm-bound-{args.norm_bound:g}.md"
        atomic_write_bytes(out / name, text.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
