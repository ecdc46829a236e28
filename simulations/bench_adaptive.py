"""Fixed vs class-adaptive images per class at the same total budget, per method and dataset.

    python -m simulations.bench_adaptive --datasets mnist,fashion-mnist,cifar10 --data-root ../shared/data \\
        --methods random,dm,generator --ipc 10 --pipc 50 --criteria silhouette,elbow --runs 3 --quick \\
        --set dm.iterations=200 --set generator.stage1_steps=600 --out runs/bench-adaptive

Per dataset it draws the server's public subset (pipc per class), embeds it once (a ConvNet
trained on those images, or ``--allocation-model``), and allocates the budget ipc x C with each
criterion. Each method then runs with the fixed and with every adaptive allocation; the generator
is trained once per dataset and sampled at each allocation's counts (its training does not
depend on the counts). An adaptive allocation whose counts equal the fixed ones reuses the fixed
cell (marked ``= fixed``). Every finished cell is stored in ``--out/cells.json``, so a crashed
run continues where it stopped. Prints the table (mean ± std test accuracy, %) and the counts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common.commands import eval_config_from_args
from common.datasets import load_dataset
from common.evaluation import evaluate_set
from common.fileio import atomic_write_bytes
from common.report import Cells, format_accuracy, markdown_table
from common.runtime import resolve_device
from server.methods.allocation import AllocationConfig, allocation_of_features, class_embeddings, with_allocation
from server.methods.registry import distill, make_task
from simulations.bench_distill import add_protocol_arguments, method_options


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--methods", default="random,dm,generator")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--pipc", default="50")
    p.add_argument("--criteria", default="silhouette,elbow", help="adaptive allocations to compare with fixed")
    p.add_argument("--k-max", type=int, default=AllocationConfig.k_max)
    p.add_argument("--allocation-model", default="", help="model directory to embed with (default: trained here)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE", help="a method option")
    add_protocol_arguments(p)
    p.add_argument("--out", default="runs/bench-adaptive")
    return p.parse_args(argv)


class GeneratorCache:
    """One trained generator per dataset, sampled at each allocation's counts."""

    def __init__(self, options: dict) -> None:
        self.options, self.trainer, self.dataset = options, None, None

    def images(self, dataset: str, task):
        from server.methods.gan import sample
        from server.methods.generator import GeneratorConfig, train_generator

        if self.dataset != dataset:
            self.trainer, self.dataset = train_generator(task, GeneratorConfig(**self.options)), dataset
        return sample(self.trainer.gen, task.counts, task.seed, task.info, task.device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    config = eval_config_from_args(args)
    out = Path(args.out)
    cells = Cells(out / "cells.json")
    methods = [m for m in args.methods.split(",") if m]
    options = method_options(args.set, methods)
    criteria = [c for c in args.criteria.split(",") if c]
    generators = GeneratorCache(options.get("generator", {}))
    for dataset in [d for d in args.datasets.split(",") if d]:
        data = load_dataset(dataset, data_root=args.data_root)
        fixed = make_task(
            data, args.ipc, args.pipc, seed=args.seed, device=device, dataset_spec=dataset, progress=False
        )
        features, described = None, ""
        tasks = {"fixed": fixed}
        for criterion in criteria:
            allocation_config = AllocationConfig(criterion, args.k_max, model=args.allocation_model, seed=args.seed)
            if features is None:
                features, described = class_embeddings(fixed, allocation_config)
            allocation = allocation_of_features(fixed, features, allocation_config, described)
            tasks[f"adaptive-{criterion}"] = with_allocation(fixed, allocation)
        for method in methods:
            for label, task in tasks.items():
                key = {
                    "dataset": dataset,
                    "method": method,
                    "allocation": label,
                    "ipc": args.ipc,
                    "pipc": args.pipc,
                    "epochs": config.epochs,
                    "runs": args.runs,
                }
                if cells.get(key):
                    continue
                counts = [task.counts[c] for c in range(data.info.num_classes)]
                twin = cells.get({**key, "allocation": "fixed"})
                if label != "fixed" and twin and twin["counts"] == counts:
                    cells.add({**twin, **key, "same_as_fixed": True})
                    continue
                started = time.perf_counter()
                if method == "generator":
                    images, labels = generators.images(dataset, task)
                else:
                    dset = distill(method, task, options.get(method, {}))
                    images, labels = dset.images, dset.labels
                distill_s = time.perf_counter() - started
                result = evaluate_set(
                    images,
                    labels,
                    data.test,
                    data.info,
                    arch=args.model,
                    runs=args.runs,
                    config=config,
                    seed=args.seed,
                    device=device,
                    workers=args.workers,
                )
                print(f"{dataset} {method} {label}: {result} counts {counts} (distill {distill_s:.0f} s)", flush=True)
                cells.add(
                    {
                        **key,
                        "counts": counts,
                        "chosen_k": (task.allocation or {}).get("chosen_k"),
                        "embedding_model": (task.allocation or {}).get("embedding_model"),
                        "distill_seconds": round(distill_s, 1),
                        **result.to_dict(),
                    }
                )
    text = report(cells, args, config.epochs, options)
    print("\n" + text)
    atomic_write_bytes(out / "table.md", text.encode())
    return 0


def report(cells: Cells, args, epochs: int, options: dict) -> str:
    labels = ["fixed"] + [f"adaptive-{c}" for c in args.criteria.split(",") if c]
    rows, count_rows = [], []
    for cell in cells.done:
        if cell["allocation"] != "fixed" or cell["epochs"] != epochs:
            continue
        row = [cell["dataset"], cell["method"]]
        for label in labels:
            found = cells.get(
                {k: cell[k] for k in ("dataset", "method", "ipc", "pipc", "epochs", "runs")} | {"allocation": label}
            )
            text = format_accuracy(found["mean"], found["std"]) if found else "not run"
            row.append(text + (" (= fixed)" if found and found.get("same_as_fixed") else ""))
        rows.append(row)
    for cell in cells.done:
        if cell["method"] == cells.done[0]["method"] and cell["allocation"] != "fixed":
            count_rows.append(
                [
                    cell["dataset"],
                    cell["allocation"],
                    " ".join(map(str, cell["counts"])),
                    " ".join(map(str, cell["chosen_k"] or [])),
                ]
            )
    header = (
        f"ipc {args.ipc} (budget ipc x classes), pipc {args.pipc}, {args.model} evaluation, {epochs}-epoch "
        f"protocol, {args.runs} runs; options {options}"
    )
    counts = markdown_table(["dataset", "allocation", "counts per class", "chosen k"], count_rows)
    return f"{header}\n\n{markdown_table(['dataset', 'method'] + labels, rows)}\n\n{counts}\n"


if __name__ == "__main__":
    raise SystemExit(main())
