"""Seconds per DM iteration and peak memory, per class loop vs one batch over all classes.

    python -m simulations.time_dm --dataset mnist --ipc 10 --pipc all --iterations 5

Prints a markdown table and writes ``timing.json`` into ``--out``. Timing excludes the first
(warm-up) iteration.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from common.datasets import load_dataset
from common.fileio import atomic_write_json
from common.report import markdown_table
from common.runtime import peak_memory_mib, resolve_device
from server.methods.dm import DMConfig, DMLoss, initial_images
from server.methods.registry import make_task


def time_mode(task, batch_classes: bool, iterations: int, batch_real: int) -> float:
    config = DMConfig(batch_classes=batch_classes, batch_real=batch_real)
    images, _ = initial_images(task, "real")
    syn = images.to(task.device).requires_grad_(True)
    objective = DMLoss(task, config)
    seconds = []
    for t in range(iterations + 1):
        if task.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        syn.grad = None
        objective.backward(syn, t)
        if task.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return sum(seconds[1:]) / iterations


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--pipc", default="all")
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/time-dm")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, data_root=args.data_root)
    task = make_task(data, args.ipc, args.pipc, device=device, progress=False)
    rows, results = [], {}
    for batch_classes in (False, True):
        s = time_mode(task, batch_classes, args.iterations, args.batch_real)
        name = "one batch over classes" if batch_classes else "loop over classes"
        results[name] = s
        rows.append([name, f"{s:.3f}"])
    peak = peak_memory_mib(device)
    print(
        f"{args.dataset} ipc {args.ipc} pipc {args.pipc} batch_real {args.batch_real} on {device.type} "
        f"({torch.get_num_threads()} threads)\n"
    )
    print(markdown_table(["DM forward/backward", "s / iteration"], rows))
    print(f"\npeak memory: {peak:.0f} MiB")
    atomic_write_json(
        Path(args.out) / "timing.json",
        {
            **vars(args),
            "device": str(device),
            "seconds_per_iteration": results,
            "peak_memory_mib": round(peak, 1),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
