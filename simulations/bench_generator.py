"""Benchmark the generator method: CGAN-only vs logit matching (DiM-style) vs global+local.

    python -m simulations.bench_generator --dataset mnist --data-root ../shared/data \\
        --stage1-steps 2000 --stage2-steps 200 --ipcs 1,10,50 --runs 3 --quick --out runs/bench-generator

One CGAN (stage 1) is trained and shared by every variant, so the variants differ only in their
stage 2 (same steps, same batches, same seed): ``cgan`` (matching weights 0, but the same stage-2
learning rates and steps), ``logit`` (w_local 0) and ``global+local`` (the defaults, or ``--set``).
Every ipc is sampled from the one generator of each variant (no retraining). Tables, each
labelled with its protocol: the fixed set (the project's default, DESIGN s.8: ipc x C images,
last epoch) per variant x ipc, with random real images as the reference row; DiM's protocol
(``common.evaluation.DIM_PROTOCOL``: fresh random-label batches every epoch, constant lr, batch
64, the best of 5 tests) per variant x ipc; cross-architecture at ``--cross-ipc``. Every finished
stage and cell is kept in ``--out``; a rerun resumes. Writes ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from common.checkpoint import identity_options, load_checkpoint, save_checkpoint
from common.commands import eval_config_from_args
from common.datasets import load_dataset
from common.evaluation import DIM_PROTOCOL, evaluate_resampled, evaluate_set
from common.fileio import atomic_write_json
from common.report import Cells, format_accuracy, markdown_table
from common.runtime import peak_memory_mib, resolve_device
from server.methods.gan import GeneratorSampler, load_generator, sample, save_generator
from server.methods.generator import (
    NON_IDENTITY_OPTIONS,
    STAGE2_OPTIONS,
    TERMS_PLOT,
    GeneratorConfig,
    save_terms_plot,
    selection_record,
    train_generator,
)
from server.methods.registry import coerce_option, distill, make_task

VARIANTS = {"cgan": {"w_global": 0.0, "w_local": 0.0}, "logit": {"w_local": 0.0}, "global+local": {}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--pipc", default="all", help="real images per class the generator may see")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--stage1-steps", type=int, default=2000)
    p.add_argument("--stage2-steps", type=int, default=200)
    p.add_argument(
        "--set", action="append", default=[], metavar="OPTION=VALUE", help="a generator option (all variants)"
    )
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dim-variants", default=",".join(VARIANTS), help="variants also evaluated with DiM's protocol")
    p.add_argument("--dim-ipcs", default="", help="ipcs of the DiM-protocol cells (default: --ipcs)")
    p.add_argument("--dim-epochs", type=int, default=DIM_PROTOCOL.epochs, help="epochs of DiM's protocol")
    p.add_argument("--cross-archs", default="convnet3,resnet18,alexnet,vgg11")
    p.add_argument("--cross-ipc", type=int, default=10)
    p.add_argument("--cross-variant", default="global+local")
    p.add_argument("--quick", action="store_true", help="300-epoch protocol (default: 1000)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench-generator")
    p.add_argument("--report", action="store_true", help="only print the tables of the cells finished so far")
    return p.parse_args(argv)


def base_config(args) -> GeneratorConfig:
    options = {"stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps}
    for item in args.set:  # one option per --set, so a value may hold commas (pool=convnet3,resnet18)
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        options[key] = coerce_option("generator", key, value.strip())
    return GeneratorConfig(**options)


def stage1_state(task, config: GeneratorConfig, out: Path) -> dict:
    """The shared CGAN: trained once (resumable through its checkpoints), then kept in stage1.pt."""
    done = out / "stage1.pt"
    stage1 = replace(config, stage2_steps=0, checkpoint_every=max(1, config.stage1_steps // 10))
    identity = {"stage1": identity_options(stage1, NON_IDENTITY_OPTIONS + STAGE2_OPTIONS)}
    if done.exists():
        state = load_checkpoint(done, {})
        kept = state.get("stage1", {})  # older files also hold the stage-2 options: only stage 1's must match
        differ = sorted(k for k, v in identity["stage1"].items() if kept.get(k) != v)
        if differ:
            raise SystemExit(
                f"{done} holds a stage 1 trained with other options ({', '.join(differ)}); "
                "use another --out or the same --set flags"
            )
        return state
    print(f"stage 1: {config.stage1_steps} steps", flush=True)
    workdir = out / "stage1-work"
    resume = (workdir / "generator-checkpoint.pt").exists()
    trainer = train_generator(replace(task, workdir=workdir), replace(stage1, resume=resume))
    state = trainer.state_dict()
    state["seconds_per_step"] = trainer.seconds[0] / max(1, config.stage1_steps)
    save_checkpoint(done, {**identity, **state})
    print(f"stage 1: {state['seconds_per_step']:.3f} s/step", flush=True)
    return state


def generator_dir(out: Path, name: str) -> Path:
    return out / "generators" / name.replace("+", "-")


def variant_generators(task, config: GeneratorConfig, names: list[str], out: Path, train: bool = True) -> dict:
    """Every variant's generator: kept ones are loaded (and must match this run's options), the rest run
    their stage 2 from the shared CGAN, which is trained (or loaded) only when some variant needs it
    (``train=False``: the rest are left out)."""
    generators, start = {}, None
    for name in names:
        where = generator_dir(out, name)
        variant = replace(config, **VARIANTS.get(name, {}))
        if not (where / "generator.json").exists():
            if not train:
                continue
            start = start or stage1_state(task, config, out)
            train_variant(task, variant, name, start, where)
        generators[name] = load_generator(where)
        check_kept_options(generators[name][2], variant, where)
    return generators


def check_kept_options(meta: dict, variant: GeneratorConfig, where: Path) -> None:
    """A kept generator is reused only for the options it was trained with (budgets and logging aside)."""
    kept = meta.get("method_options", {})
    wanted = identity_options(variant, NON_IDENTITY_OPTIONS)
    differ = sorted(k for k in wanted if k in kept and kept[k] != wanted[k])
    if differ:
        raise SystemExit(
            f"{where} was trained with other options ({', '.join(differ)}); use another --out or the same --set flags"
        )


def train_variant(task, variant: GeneratorConfig, name: str, start: dict, where: Path) -> None:
    """Stage 2 of one variant from the shared stage-1 state, saved as a generator artifact in ``where``."""
    trainer = train_generator(task, variant, start_from=start)
    s2 = trainer.seconds[1] / max(1, variant.stage2_steps)
    meta = {
        "variant": name,
        "selection": selection_record(trainer),
        "method_options": dataclasses.asdict(variant),
        "seconds_per_step_stage1": round(start["seconds_per_step"], 4),
        "seconds_per_step_stage2": round(s2, 4),
        "dataset_spec": task.dataset_spec,
        "pipc": task.pipc,
        "seed": task.seed,
    }
    figures = {TERMS_PLOT: lambda path: save_terms_plot(trainer.curves, path)}
    meta["loss_curves"] = trainer.curves
    grid = {"stage2.png": trainer.grid_samples()}
    save_generator(where, trainer.gen.cpu(), task.info, meta, grid, overwrite=True, figures=figures)
    print(f"{name}: stage 2 {s2:.3f} s/step", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    protocol = eval_config_from_args(args)
    data = load_dataset(args.dataset, data_root=args.data_root)
    config = base_config(args)
    task = make_task(data, 1, args.pipc, seed=args.seed, device=device, dataset_spec=args.dataset)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; use {', '.join(VARIANTS)}")

    started = time.perf_counter()
    generators = variant_generators(task, config, variants, out, train=not args.report)

    cells = Cells(out / "cells.json")
    keyed = partial(cell_key, args, generators, protocol.epochs)
    ipcs = [int(i) for i in args.ipcs.split(",")]
    # ipc-major: a run cut short leaves whole columns (every variant at the small ipcs), not whole rows
    wanted = [(v, ipc, "convnet3", "fixed") for ipc in ipcs for v in ["random real", *generators]]
    dim_ipcs = [int(i) for i in (args.dim_ipcs or args.ipcs).split(",")]
    wanted += [(v, ipc, "convnet3", "dim") for ipc in dim_ipcs for v in args.dim_variants.split(",") if v in generators]
    if args.cross_variant in generators:
        wanted += [(args.cross_variant, args.cross_ipc, a, "fixed") for a in args.cross_archs.split(",") if a]
    dim_protocol = replace(DIM_PROTOCOL, epochs=args.dim_epochs)
    for variant, ipc, arch, kind in [] if args.report else wanted:
        key = keyed(variant, ipc, arch, kind)
        if cells.get(key) is not None:
            continue
        info = data.info
        counts = dict.fromkeys(range(info.num_classes), ipc)
        if variant == "random real":
            # the registry's random coreset from the whole training split: the README's "random" rows
            reference = distill("random", make_task(data, ipc, "all", seed=args.seed, progress=False))
            images, labels = reference.images, reference.labels
            result = evaluate_set(
                images, labels, data.test, info, arch, args.runs, protocol, args.seed, device, progress=False
            )
        elif kind == "fixed":
            gen = generators[variant][0]
            images, labels = sample(gen, counts, args.seed, info, device)
            result = evaluate_set(
                images, labels, data.test, info, arch, args.runs, protocol, args.seed, device, progress=False
            )
        else:
            gen = generators[variant][0]
            sampler = GeneratorSampler.for_dim_protocol(gen, info, counts, args.seed)
            result = evaluate_resampled(
                sampler, data.test, info, arch, args.runs, dim_protocol, args.seed, device, progress=False
            )
        cells.add({**key, "mean": result.mean, "std": result.std, "accuracies": result.accuracies})
        print(f"{variant:>12} ipc {ipc:>3} {arch:>9} {kind:>5}: {format_accuracy(result.mean, result.std)}", flush=True)

    def lookup(*where) -> dict | None:
        return cells.latest(keyed(*where))

    return report(args, cells, lookup, generators, protocol, device, time.perf_counter() - started)


def cell_key(
    args, generators: dict, epochs: int, variant: str, ipc: int, arch: str = "convnet3", kind: str = "fixed"
) -> dict:
    """Everything a cell's figure depends on: the images' source (the generator's weights by their
    sha256), the protocol with its epochs, runs and seed; a rerun with other flags measures anew."""
    source = "real" if variant == "random real" else generators[variant][2]["sha256"][:16]
    epochs = args.dim_epochs if kind == "dim" else epochs
    return {
        "variant": variant,
        "ipc": ipc,
        "arch": arch,
        "protocol": kind,
        "dataset": args.dataset,
        "source": source,
        "epochs": epochs,
        "runs": args.runs,
        "seed": args.seed,
    }


def report(args, cells: Cells, lookup, generators: dict, protocol, device: torch.device, seconds: float) -> int:
    """Print and write the tables; ``lookup(variant, ipc, arch, kind)`` is this run's cell or None."""
    ipcs = [int(i) for i in args.ipcs.split(",")]

    def text(variant: str, ipc: int, arch: str = "convnet3", kind: str = "fixed") -> str:
        cell = lookup(variant, ipc, arch, kind)
        return format_accuracy(cell["mean"], cell["std"]) if cell else "-"

    timing = {name: meta for name, (_, _, meta) in generators.items()}
    header = (
        f"{args.dataset}, pipc {args.pipc}; one CGAN of {args.stage1_steps} steps shared by all variants, then "
        f"{args.stage2_steps} stage-2 steps each; options {args.set or 'defaults'}; {args.runs} runs; device {device}"
    )
    rows = [["random real", *(text("random real", i) for i in ipcs)]]
    rows += [[v, *(text(v, i) for i in ipcs)] for v in generators]
    fixed = markdown_table(
        [f"fixed set, ConvNet-3, {protocol.epochs} epochs, last epoch", *(f"ipc {i}" for i in ipcs)], rows
    )
    dim_rows = [[v, *(text(v, i, kind="dim") for i in ipcs)] for v in args.dim_variants.split(",") if v in generators]
    dim_title = f"DiM protocol, ConvNet-3, {args.dim_epochs} epochs of fresh batches, best of 5 tests"
    dim = markdown_table([dim_title, *(f"ipc {i}" for i in ipcs)], dim_rows) if dim_rows else ""
    archs = [a for a in args.cross_archs.split(",") if a]
    cross = (
        markdown_table(
            [f"{args.cross_variant}, ipc {args.cross_ipc}, fixed set", *archs],
            [["accuracy %", *(text(args.cross_variant, args.cross_ipc, a) for a in archs)]],
        )
        if archs and args.cross_variant in generators
        else ""
    )
    speed = markdown_table(
        ["variant", "stage 1 s/step", "stage 2 s/step", "held-out selection (stage: step, score)"],
        [
            [
                v,
                m.get("seconds_per_step_stage1"),
                m.get("seconds_per_step_stage2"),
                "; ".join(f"{k}: {c['step']}, {100 * c['score']:.1f}" for k, c in chosen_steps(m).items()) or "-",
            ]
            for v, m in timing.items()
        ],
    )
    tables = "\n\n".join(t for t in (header, fixed, dim, cross, speed, ordering(lookup, generators, ipcs)) if t)
    tables += f"\n\npeak memory {peak_memory_mib(device):.0f} MiB; this run {seconds:.0f} s"
    print("\n" + tables)
    out = Path(args.out)
    (out / "table.md").write_text(tables + "\n")
    atomic_write_json(out / "results.json", {"header": header, "cells": cells.done, "generators": timing})
    print(f"\nwrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


def chosen_steps(meta: dict) -> dict:
    """Stage -> {"step", "score"} of a variant's held-out selection (older runs kept only that mapping)."""
    selection = meta.get("selection") or {}
    return selection.get("chosen", selection)


def ordering(lookup, generators: dict, ipcs: list[int]) -> str:
    """The issue's targets beside the figures: global+local >= logit >= cgan per ipc and protocol, and
    the best generator's fixed ipc-50 sample against random real images at ipc 10."""
    lines = []
    for kind in ("fixed", "dim"):
        for ipc in ipcs:
            means = {
                v: c["mean"]
                for v in ("global+local", "logit", "cgan")
                if v in generators and (c := lookup(v, ipc, "convnet3", kind))
            }
            if len(means) == 3:
                held = means["global+local"] >= means["logit"] >= means["cgan"]
                order = " >= ".join(sorted(means, key=means.get, reverse=True))
                lines.append(f"- {kind} ipc {ipc}: {order} ({'ordering holds' if held else 'ordering MISSED'})")
    real = lookup("random real", 10, "convnet3", "fixed")
    fifty = [c for v in generators if (c := lookup(v, 50, "convnet3", "fixed"))]
    if real and fifty:
        best = max(fifty, key=lambda c: c["mean"])
        verdict = "above" if best["mean"] > real["mean"] else "BELOW"
        lines.append(
            f"- best generator's fixed ipc-50 sample ({best['variant']}) "
            f"{format_accuracy(best['mean'], best['std'])} vs random real ipc 10 "
            f"{format_accuracy(real['mean'], real['std'])}: {verdict}"
        )
    return "Targets:\n" + "\n".join(lines) if lines else ""


if __name__ == "__main__":
    raise SystemExit(main())
