"""Benchmark: coreset baselines (random / herding / k-center) under the evaluation protocol.

    python -m simulations.bench_coresets --dataset mnist --ipcs 1,10,50 --runs 3 --quick --out runs/bench-coresets

Prints a markdown table (mean ± std test accuracy over the evaluation runs, %) and writes
``results.json`` and ``table.md`` into ``--out``. The same script runs on CPU or ``--device cuda``.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.datasets import load_dataset
from common.evaluation import PRESETS, evaluate_set
from common.fileio import atomic_write_bytes, atomic_write_json
from common.report import format_accuracy, markdown_table
from common.runtime import resolve_device
from server.registry import distill, make_task


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--methods", default="random,herding,kcenter")
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--pipc", default="all")
    p.add_argument("--model", default="convnet3")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="300-epoch protocol (default: 1000)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--feature-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", default="runs/bench-coresets")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    config = PRESETS["quick" if args.quick else "paper"]
    if args.epochs:
        config = replace(config, epochs=args.epochs)
    data = load_dataset(args.dataset, data_root=args.data_root)
    methods = [m for m in args.methods.split(",") if m]
    ipcs = [int(i) for i in args.ipcs.split(",") if i]
    results = []
    for ipc in ipcs:
        task = make_task(data, ipc, args.pipc, seed=args.seed, device=device, dataset_spec=args.dataset)
        for method in methods:
            options = {} if method == "random" else {"feature_steps": args.feature_steps}
            started = time.perf_counter()
            dset = distill(method, task, options)
            distill_s = time.perf_counter() - started
            result = evaluate_set(
                dset.images,
                dset.labels,
                data.test,
                data.info,
                arch=args.model,
                runs=args.runs,
                config=config,
                seed=args.seed,
                device=device,
                workers=args.workers,
            )
            print(
                f"ipc {ipc:>3} {method:>8}: {result}  (select {distill_s:.1f} s, eval {result.seconds:.1f} s)",
                flush=True,
            )
            results.append(
                {
                    "method": method,
                    "ipc": ipc,
                    "pipc": args.pipc,
                    "distill_seconds": round(distill_s, 2),
                    **result.to_dict(),
                }
            )
    by_key = {(r["method"], r["ipc"]): r for r in results}
    rows = [[m] + [format_accuracy(by_key[m, i]["mean"], by_key[m, i]["std"]) for i in ipcs] for m in methods]
    table = markdown_table(["method"] + [f"ipc {i}" for i in ipcs], rows)
    header = (
        f"{args.dataset}, {args.model}, {config.epochs}-epoch protocol, {args.runs} runs, pipc {args.pipc}, "
        f"device {device.type}"
    )
    print(f"\n{header}\n\n{table}")
    out = Path(args.out)
    atomic_write_json(
        out / "results.json",
        {
            "benchmark": "coresets",
            "dataset": args.dataset,
            "model": args.model,
            "epochs": config.epochs,
            "runs": args.runs,
            "pipc": args.pipc,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "results": results,
        },
    )
    atomic_write_bytes(out / "table.md", f"{header}\n\n{table}\n".encode())
    print(f"\nwrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
