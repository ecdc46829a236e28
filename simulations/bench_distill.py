"""Benchmark distillation methods under the evaluation protocol, on CPU or GPU.

    python -m simulations.bench_distill --dataset mnist --methods random,herding,dm --ipcs 1,10 \\
        --pipcs 50,all --set dm.iterations=200 --runs 3 --quick --out runs/bench-dm-mnist

For every (pipc, ipc, method) it distills once (seeded), trains ``--runs`` fresh networks on
the result and tests them on the real test split. Prints a markdown table (mean ± std test
accuracy, %) plus seconds per DM iteration and peak memory, and writes ``results.json`` and
``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.datasets import load_dataset
from common.errors import ConfigError
from common.evaluation import PRESETS, evaluate_set
from common.fileio import atomic_write_bytes, atomic_write_json
from common.report import format_accuracy, markdown_table
from common.runtime import peak_memory_mib, resolve_device
from server.methods.registry import coerce_option, distill, make_task


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """The evaluation protocol and run settings every distillation benchmark shares."""
    p.add_argument("--model", default="convnet3", help="evaluation architecture")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="300-epoch protocol (default: 1000)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--methods", default="random,herding,kcenter")
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--pipcs", default="all", help="comma-separated public images per class ('all' = full set)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.OPTION=VALUE",
        help="a method option, e.g. dm.iterations=200 or herding.feature_steps=100 (repeatable)",
    )
    add_protocol_arguments(p)
    p.add_argument("--out", default="runs/bench-distill")
    return p.parse_args(argv)


def method_options(settings: list[str], methods: list[str]) -> dict[str, dict]:
    """``["dm.iterations=200"]`` -> ``{"dm": {"iterations": 200}}``, typed by the method's config."""
    options: dict[str, dict] = {m: {} for m in methods}
    for item in settings:
        try:
            key, value = item.split("=", 1)
            method, name = key.split(".", 1)
        except ValueError:
            raise ConfigError(f"--set {item!r}: use METHOD.OPTION=VALUE, e.g. dm.iterations=200") from None
        options.setdefault(method, {})[name] = coerce_option(method, name, value)
    return options


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    config = PRESETS["quick" if args.quick else "paper"]
    if args.epochs:
        config = replace(config, epochs=args.epochs)
    data = load_dataset(args.dataset, data_root=args.data_root)
    methods = [m for m in args.methods.split(",") if m]
    ipcs = [int(i) for i in args.ipcs.split(",") if i]
    pipcs = [p for p in args.pipcs.split(",") if p]
    options = method_options(args.set, methods)
    results = []
    for pipc in pipcs:
        for ipc in ipcs:
            task = make_task(data, ipc, pipc, seed=args.seed, device=device, dataset_spec=args.dataset)
            for method in methods:
                started = time.perf_counter()
                dset = distill(method, task, options.get(method, {}))
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
                s_per_it = dset.manifest.get("seconds_per_iteration")
                print(
                    f"pipc {pipc:>4} ipc {ipc:>3} {method:>8}: {result}  (distill {distill_s:.1f} s"
                    + (f", {s_per_it:.3f} s/it" if s_per_it else "")
                    + f", eval {result.seconds:.1f} s)",
                    flush=True,
                )
                results.append(
                    {
                        "method": method,
                        "ipc": ipc,
                        "pipc": pipc,
                        "options": options.get(method, {}),
                        "distill_seconds": round(distill_s, 2),
                        "seconds_per_iteration": s_per_it,
                        **result.to_dict(),
                    }
                )
    by_key = {(r["method"], r["pipc"], r["ipc"]): r for r in results}
    rows = [
        [m, p] + [format_accuracy(by_key[m, p, i]["mean"], by_key[m, p, i]["std"]) for i in ipcs]
        for p in pipcs
        for m in methods
    ]
    table = markdown_table(["method", "pipc"] + [f"ipc {i}" for i in ipcs], rows)
    timing = [r for r in results if r["seconds_per_iteration"]]
    notes = [
        f"{r['method']} pipc {r['pipc']} ipc {r['ipc']}: {r['seconds_per_iteration']:.3f} s/iteration" for r in timing
    ]
    peak = peak_memory_mib(device)
    header = (
        f"{args.dataset}, {args.model} evaluation, {config.epochs}-epoch protocol, {args.runs} runs, "
        f"device {device.type}; options {options}"
    )
    text = f"{header}\n\n{table}\n\n" + "\n".join(notes) + f"\npeak memory: {peak:.0f} MiB\n"
    print("\n" + text)
    out = Path(args.out)
    atomic_write_json(
        out / "results.json",
        {
            "dataset": args.dataset,
            "model": args.model,
            "epochs": config.epochs,
            "runs": args.runs,
            "device": str(device),
            "peak_memory_mib": round(peak, 1),
            "options": options,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "results": results,
        },
    )
    atomic_write_bytes(out / "table.md", text.encode())
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
