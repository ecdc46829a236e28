"""Benchmark the server distillation methods against a federated global model.

    python -m simulations.bench_dkkt --dataset mnist --data-root ../shared/data --clients 10 --alpha 0.5 \\
        --rounds 2 --ipcs 1,10 --pipcs 10,50 --iterations 100 --runs 3 --quick --out runs/bench-dkkt-mnist

Three phases, each resumable (finished cells are kept in ``--out`` and skipped on a rerun):

1. **federation**: a simulated fleet (``--clients``, Dirichlet(``--alpha``) label skew, the
   largest pipc carved out as the server's public subset) trains the global model; or pass
   ``--global-model DIR``.
2. **sweep** (model selection without the test split): at ``--sweep-ipc`` / ``--sweep-pipc``
   the public subset is split into images the method may see and ``--val-per-class`` held-out
   validation images; every ``w_kkt`` x ``lambda`` scale is distilled and scored on them.
3. **table**: random / herding / dm / dsv / dm+dkkt / dsv-dm-avg for every ipc x pipc, with
   dm+dkkt at the w_kkt and lambda scale the validation chose (``dm+dkkt@1``: w_kkt fixed at 1,
   for reference), tested on the real test split.

Writes ``sweep.json``, ``results.json`` and ``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.commands import eval_config_from_args
from common.datasets import Split, load_dataset
from common.evaluation import evaluate_set
from common.fileio import atomic_write_bytes, atomic_write_json
from common.report import Cells, format_accuracy, markdown_table
from common.runtime import derive_seed, make_generator, peak_memory_mib, resolve_device
from server.federation.rounds import RoundPlan, method_options
from server.methods.dkkt import lambda_from_weight_decay
from server.methods.registry import distill, make_task

METHODS = "random,herding,dm,dsv,dm+dkkt,dm+dkkt@1,dsv-dm-avg"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--global-model", default="", help="skip the federation and use this model directory")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--ipcs", default="1,10")
    p.add_argument("--pipcs", default="10,50")
    p.add_argument("--iterations", type=int, default=1000, help="iterations of every pixel-optimising method")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="a DKKT option for all methods")
    p.add_argument("--sweep-w", default="0,0.1,1,10", help="w_kkt values of the sweep")
    p.add_argument(
        "--sweep-lambda",
        default="0.1,10",
        help="multiples of the weight-decay rule's lambda, tried at --sweep-lambda-w",
    )
    p.add_argument("--sweep-lambda-w", type=float, default=1.0, help="the w_kkt at which the lambda scales are swept")
    p.add_argument("--sweep-ipcs", default="1,10", help="ipc values swept (each table ipc uses the nearest)")
    p.add_argument("--sweep-pipc", type=int, default=50)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sweep-runs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="300-epoch protocol (default: 1000)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench-dkkt")
    p.add_argument("--stop-after", choices=["federation", "sweep"], default=None, help="run only the first phase(s)")
    p.add_argument("--report", action="store_true", help="only print the tables of the cells finished so far")
    return p.parse_args(argv)


def federate(args, out: Path) -> Path:
    """Phase 1: the global model of a simulated Dirichlet fleet (reused if already there)."""
    from server.federation.run import GLOBAL_MODEL_DIR, FederationConfig
    from simulations.simulate import run_simulated_fleet

    model_dir = out / "federation" / GLOBAL_MODEL_DIR
    meta = model_dir / "model.json"
    if meta.exists() and json.loads(meta.read_text()).get("round") == args.rounds:
        return model_dir
    config = FederationConfig(
        dataset=args.dataset,
        data_root=args.data_root or "",
        num_rounds=args.rounds,
        min_train_nodes=args.clients,
        min_available_nodes=args.clients,
        partition="dirichlet",
        alpha=args.alpha,
        pipc=str(max(int(p) for p in args.pipcs.split(","))),
        local_epochs=args.local_epochs,
        seed=args.seed,
        out_dir=str(out / "federation"),
        resume=(out / "federation" / "federation-checkpoint.pt").exists(),
    )
    history = run_simulated_fleet(
        config,
        args.clients,
        echo=lambda line: line.startswith("round ") and print(f"federation {line}", flush=True),
    )
    print(f"global model after {history[-1]['round']} rounds: {100 * history[-1]['accuracy']:.2f} %")
    return model_dir


def validation_split(task, per_class: int, seed: int):
    """Hold ``per_class`` public images per class out of the task: (task without them, validation split)."""
    keep, held = [], []
    for c in task.counts:
        members = task.real_of_class(c)
        order = members[torch.randperm(len(members), generator=make_generator(derive_seed("val", seed, c)))]
        held.append(order[:per_class])
        keep.append(order[per_class:])
    keep, held = torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values
    trimmed = replace(
        task, real=task.real.subset(keep), real_indices=task.real_indices[keep], pipc=task.pipc - per_class
    )
    return trimmed, Split(task.real.images[held], task.real.labels[held])


def run_cell(data, task, method, options, test: Split, args, config, device) -> dict:
    started = time.perf_counter()
    dset = distill(method, task, options)
    distill_s = time.perf_counter() - started
    result = evaluate_set(
        dset.images, dset.labels, test, data.info, runs=args.runs_now, config=config, seed=args.seed, device=device
    )
    return {
        "mean": result.mean,
        "std": result.std,
        "accuracies": result.accuracies,
        "distill_seconds": round(distill_s, 2),
        "seconds_per_iteration": dset.manifest.get("seconds_per_iteration"),
        "lambda_init": dset.manifest.get("lambda_init"),
        "kkt_primal_accuracy": dset.manifest.get("kkt_primal_accuracy"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    config = eval_config_from_args(args)
    data = load_dataset(args.dataset, data_root=args.data_root)
    global_model = Path(args.global_model) if args.global_model else federate(args, out)
    model_meta = json.loads((global_model / "model.json").read_text())
    if args.stop_after == "federation":
        return 0
    extra = {}
    for item in args.set:
        key, value = item.split("=", 1)
        extra[key] = value
    budget = RoundPlan(method="dm+dkkt", iterations=args.iterations, time_limit=0.0, seed=args.seed)

    def options_for(method: str, **more) -> dict:
        return {**method_options(replace(budget, method=method, options=extra), global_model), **more}

    if args.report:
        return report(args, Cells(out / "sweep.json"), Cells(out / "cells.json"), model_meta, config, device)

    # phase 2: sweep on validation images carved from the public subset, per ipc
    sweep = Cells(out / "sweep.json")
    args.runs_now = args.sweep_runs
    ws = [float(w) for w in args.sweep_w.split(",")]
    scales = [float(s) for s in args.sweep_lambda.split(",")]
    grid = [(w, 1.0) for w in ws] + [(args.sweep_lambda_w, s) for s in scales if s != 1.0]
    best: dict[int, dict] = {}
    for ipc in [int(i) for i in args.sweep_ipcs.split(",")]:
        task = make_task(data, ipc, args.sweep_pipc, seed=args.seed, device=device, progress=False)
        trimmed, val = validation_split(task, args.val_per_class, args.seed)
        lambda_rule = lambda_from_weight_decay(sum(task.counts.values()), model_meta["weight_decay"])
        for w, scale in grid:
            key = {"ipc": ipc, "w_kkt": w, "lambda_scale": scale}
            if sweep.get(key) is None:
                opts = options_for("dm+dkkt", w_kkt=w, lambda_init=scale * lambda_rule)
                cell = {**key, **run_cell(data, trimmed, "dm+dkkt", opts, val, args, config, device)}
                sweep.add(cell)
                print(
                    f"sweep ipc {ipc} w_kkt {w:g} lambda x{scale:g}: val {format_accuracy(cell['mean'], cell['std'])}"
                )
        best[ipc] = choose(sweep)[ipc]
        print(f"validation chose for ipc {ipc}: w_kkt {best[ipc]['w_kkt']:g}, lambda x{best[ipc]['lambda_scale']:g}")
    if args.stop_after == "sweep":
        return 0

    # phase 3: the table on the real test split
    cells = Cells(out / "cells.json")
    args.runs_now = args.runs
    methods = [m for m in args.methods.split(",") if m]
    ipcs, pipcs = [int(i) for i in args.ipcs.split(",")], [int(p) for p in args.pipcs.split(",")]
    for pipc in pipcs:
        for ipc in ipcs:
            task = make_task(data, ipc, pipc, seed=args.seed, device=device, progress=False)
            m_images = sum(task.counts.values())
            for method in methods:
                key = {"method": method, "ipc": ipc, "pipc": pipc}
                if cells.get(key) is not None:
                    continue
                base_method, _, fixed_w = method.partition("@")  # dm+dkkt@1: w_kkt fixed at 1, not chosen
                more = {}
                if base_method == "dm+dkkt":
                    chosen = best[min(best, key=lambda i: abs(i - ipc))]
                    more = {
                        "w_kkt": float(fixed_w) if fixed_w else chosen["w_kkt"],
                        "lambda_init": (1.0 if fixed_w else chosen["lambda_scale"])
                        * lambda_from_weight_decay(m_images, model_meta["weight_decay"]),
                    }
                same_as_dm = cells.get({"method": "dm", "ipc": ipc, "pipc": pipc})
                chosen_cell = cells.get({"method": "dm+dkkt", "ipc": ipc, "pipc": pipc})
                if base_method == "dm+dkkt" and more["w_kkt"] == 0 and same_as_dm is not None:
                    # w_kkt 0 is exactly dm (tested): reuse its cell instead of recomputing it
                    cell = {**same_as_dm, **key, "note": "w_kkt 0 chosen: identical to dm"}
                elif fixed_w and chosen_cell is not None and chosen_cell.get("options") == more:
                    cell = {**chosen_cell, **key, "note": "same options as the validation choice"}
                else:
                    cell = {
                        **key,
                        **run_cell(
                            data, task, base_method, options_for(base_method, **more), data.test, args, config, device
                        ),
                    }
                cells.add({**cell, "options": cell.get("options", more)})
                print(
                    f"pipc {pipc:>3} ipc {ipc:>3} {method:>10}: {format_accuracy(cell['mean'], cell['std'])}",
                    flush=True,
                )

    return report(args, sweep, cells, model_meta, config, device)


def choose(sweep: Cells) -> dict[int, dict]:
    """Per swept ipc, the validation-best cell (ties go to the smaller w_kkt)."""
    best: dict[int, dict] = {}
    for cell in sweep.done:
        current = best.get(cell["ipc"])
        if current is None or (round(cell["mean"], 6), -cell["w_kkt"]) > (round(current["mean"], 6), -current["w_kkt"]):
            best[cell["ipc"]] = cell
    return best


def report(args, sweep: Cells, cells: Cells, model_meta: dict, config, device) -> int:
    """Print and write the method table and the sweep (cells not finished yet show as 'not run')."""
    out = Path(args.out)
    methods = [m for m in args.methods.split(",") if m]
    ipcs, pipcs = [int(i) for i in args.ipcs.split(",")], [int(p) for p in args.pipcs.split(",")]
    by_key = {(c["method"], c["pipc"], c["ipc"]): c for c in cells.done}

    def cell_text(m: str, p: int, i: int) -> str:
        cell = by_key.get((m, p, i))
        return format_accuracy(cell["mean"], cell["std"]) if cell else "not run"

    rows = [[m, p] + [cell_text(m, p, i) for i in ipcs] for p in pipcs for m in methods]
    sweep_rows = [
        [c["ipc"], f"{c['w_kkt']:g}", f"x{c['lambda_scale']:g}", format_accuracy(c["mean"], c["std"])]
        + [c["seconds_per_iteration"]]
        for c in sweep.done
    ]
    best = choose(sweep)
    chosen_text = ", ".join(f"ipc {i}: w_kkt {b['w_kkt']:g}, lambda x{b['lambda_scale']:g}" for i, b in best.items())
    accuracy = model_meta.get("accuracy", model_meta.get("test_accuracy", float("nan")))
    source = (
        f"{args.global_model}"
        if args.global_model
        else f"{model_meta.get('round')} FedAvg rounds, {args.clients} clients, Dirichlet({args.alpha})"
    )
    header = (
        f"{args.dataset}; global model: {source}, test accuracy {100 * accuracy:.2f} %; "
        f"{args.iterations} iterations per method; ConvNet-3, {config.epochs}-epoch protocol, {args.runs} runs; "
        f"device {device.type}; DKKT options {args.set or 'defaults'}"
    )
    text = (
        f"{header}\n\n{markdown_table(['method', 'pipc'] + [f'ipc {i}' for i in ipcs], rows)}\n\n"
        f"Sweep (dm+dkkt, pipc {args.sweep_pipc}: {args.sweep_pipc - args.val_per_class} public images per class seen, "
        f"scored on {args.val_per_class} held-out public images per class; {args.sweep_runs} runs):\n\n"
        f"{markdown_table(['ipc', 'w_kkt', 'lambda', 'validation acc %', 's/iteration'], sweep_rows)}\n\n"
        f"chosen on validation: {chosen_text}; "
        f"peak memory {peak_memory_mib(device):.0f} MiB\n"
    )
    print("\n" + text)
    atomic_write_json(out / "results.json", {"header": header, "cells": cells.done, "sweep": sweep.done})
    atomic_write_bytes(out / "table.md", text.encode())
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
