"""Benchmark the generator method: CGAN-only vs logit matching (DiM-style) vs global+local.

    python -m simulations.bench_generator --dataset mnist --data-root ../shared/data \\
        --stage1-steps 2000 --stage2-steps 200 --ipcs 1,10,50 --runs 3 --quick --out runs/bench-generator

One CGAN (stage 1) is trained and shared by every variant, so the variants differ only in their
stage 2 (same steps, same batches and noise: matching draws from its own random stream):
``cgan`` (matching weights 0, but the same stage-2 learning rates and steps), ``logit`` (w_local 0)
and ``global+local`` (the defaults, or ``--set``); ``--extra-variants`` adds named stage-2 ablations
(e.g. ``match_scale=cgan-gradient``) on the same CGAN and streams. ``--stage2-seeds`` repeats every variant's
stage 2 from the same CGAN under other seeds; tables then give the mean and std across seeds (the
generator-training spread), a per-seed table, and per-seed paired differences between variants
(one seed's variants share every batch, so a difference is the method's). Every ipc is sampled
from the one generator of each variant and seed (no retraining). Tables, each
labelled with its protocol: the fixed set (the project's default, DESIGN s.8: ipc x C images,
last epoch) per variant x ipc, with random real images as the reference row; DiM's protocol
(``common.evaluation.DIM_PROTOCOL``: fresh random-label batches every epoch, constant lr, batch
64, the best of 5 tests) per variant x ipc; cross-architecture at ``--cross-ipc``. Every finished
stage and cell is kept in ``--out``; a rerun resumes. Writes ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from common.checkpoint import identity_options, load_checkpoint, save_checkpoint
from common.commands import eval_config_from_args, named_lists
from common.datasets import load_dataset
from common.errors import ConfigError
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
from server.methods.registry import coerce_option, distill, make_task, parse_options

VARIANTS = {"cgan": {"w_global": 0.0, "w_local": 0.0}, "logit": {"w_local": 0.0}, "global+local": {}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--pipc", default="all", help="real images per class the generator may see")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--extra-variants",
        default="",
        metavar="'NAME: OPTION=VALUE,... | ...'",
        help="more variants, each its stage-2 options over --set (stage-1 options are shared: use --set)",
    )
    p.add_argument(
        "--pairs",
        default="",
        metavar="'A vs B, ...'",
        help="per-seed paired differences to tabulate (default: logit/global+local vs cgan, global+local vs "
        "logit, and each extra variant vs cgan)",
    )
    p.add_argument("--stage2-seeds", default="0", help="stage-2 repeats of every variant from the one CGAN")
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


def variant_table(args) -> dict[str, dict]:
    """The built-in variants plus ``--extra-variants``: name -> its stage-2 options over ``--set``."""
    table = dict(VARIANTS)
    for name, body in named_lists(args.extra_variants, "--extra-variants"):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name) or name in table:
            raise SystemExit(
                f"--extra-variants item {name!r}: use NAME: OPTION=VALUE,... with a new name of letters, "
                "digits and _.+- (not cgan, logit, global+local)"
            )
        try:
            options = parse_options("generator", body)
            replace(base_config(args), **options)  # a wrong value fails here, before any training
        except ConfigError as exc:
            raise SystemExit(f"--extra-variants {name}: {exc}") from None
        shared = sorted(set(options) - set(STAGE2_OPTIONS))
        if shared:
            raise SystemExit(
                f"--extra-variants {name}: {', '.join(shared)} are not stage-2 options; every variant "
                "shares one stage 1, so set them for all with --set"
            )
        table[name] = options
    return table


def pair_list(args, table: dict[str, dict]) -> list[tuple[str, str]]:
    """``--pairs 'A vs B, ...'`` or the default pairs (the built-in three, then every extra variant vs cgan)."""
    if not args.pairs.strip():
        return list(PAIRS) + [(name, "cgan") for name in table if name not in VARIANTS]
    pairs = []
    for item in filter(None, (i.strip() for i in args.pairs.split(","))):
        a, sep, b = item.partition(" vs ")
        if not sep or a.strip() not in table or b.strip() not in table:
            raise SystemExit(f"--pairs item {item!r}: use 'A vs B' with A and B among {', '.join(table)}")
        pairs.append((a.strip(), b.strip()))
    return pairs


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


def generator_dir(out: Path, name: str, seed: int = 0) -> Path:
    return out / "generators" / (name.replace("+", "-") + (f"-seed{seed}" if seed else ""))


def run_label(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name} seed {seed}"


def variant_generators(
    task,
    config: GeneratorConfig,
    names: list[str],
    seeds: list[int],
    out: Path,
    table: dict[str, dict],
    train: bool = True,
) -> dict:
    """Every (variant, stage-2 seed)'s generator: kept ones are loaded (and must match this run's
    options), the rest run their stage 2 from the shared CGAN, which is trained (or loaded) only when
    one of them needs it (``train=False``: the rest are left out). Seed-major, so that a run cut
    short holds whole seeds: every variant of a seed shares its batches and can be compared."""
    generators, start = {}, None
    for seed in seeds:
        for name in names:
            where = generator_dir(out, name, seed)
            variant = replace(config, **table[name], stage2_seed=seed)
            if not (where / "generator.json").exists():
                if not train:
                    continue
                start = start or stage1_state(task, config, out)
                train_variant(task, variant, run_label(name, seed), start, where)
            generators[name, seed] = load_generator(where)
            check_kept_options(generators[name, seed][2], variant, where)
    return generators


def check_kept_options(meta: dict, variant: GeneratorConfig, where: Path) -> None:
    """A kept generator is reused only for the options it was trained with (budgets and logging aside)."""
    kept = meta.get("method_options", {})
    if "stage2_seed" not in kept:
        raise SystemExit(
            f"{where} was trained before matching drew from its own random stream (commit 85cff27 or older); "
            "its variants saw different batches: use another --out, or that commit to report it"
        )
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
        "pool_drawn": trainer.pool.drawn if trainer.pool is not None else [],
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
    table = variant_table(args)  # every flag is checked before the dataset loads or anything trains
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; use {', '.join(VARIANTS)} (or name one in --extra-variants)")
    variants += [name for name in table if name not in VARIANTS]
    seeds = stage2_seeds(args)
    pair_list(args, table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    protocol = eval_config_from_args(args)
    data = load_dataset(args.dataset, data_root=args.data_root)
    config = base_config(args)
    task = make_task(data, 1, args.pipc, seed=args.seed, device=device, dataset_spec=args.dataset)

    started = time.perf_counter()
    generators = variant_generators(task, config, variants, seeds, out, table, train=not args.report)
    trained = [(v, s) for s in seeds for v in variants if (v, s) in generators]

    cells = Cells(out / "cells.json")
    keyed = partial(cell_key, args, generators, protocol.epochs)
    ipcs = [int(i) for i in args.ipcs.split(",")]
    # ipc-major: a run cut short leaves whole columns (every variant at the small ipcs), not whole rows
    wanted = [("random real", ipc, "convnet3", "fixed", 0) for ipc in ipcs]
    wanted += [(v, ipc, "convnet3", "fixed", s) for ipc in ipcs for v, s in trained]
    wanted.sort(key=lambda w: w[1])
    dim_ipcs = [int(i) for i in (args.dim_ipcs or args.ipcs).split(",")]
    dim_variants = args.dim_variants.split(",")
    wanted += [(v, ipc, "convnet3", "dim", s) for ipc in dim_ipcs for v, s in trained if v in dim_variants]
    archs = [a for a in args.cross_archs.split(",") if a]
    wanted += [(v, args.cross_ipc, a, "fixed", s) for v, s in trained if v == args.cross_variant for a in archs]
    dim_protocol = replace(DIM_PROTOCOL, epochs=args.dim_epochs)
    for variant, ipc, arch, kind, seed in [] if args.report else wanted:
        key = keyed(variant, ipc, arch, kind, seed)
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
            gen = generators[variant, seed][0]
            images, labels = sample(gen, counts, args.seed, info, device)
            result = evaluate_set(
                images, labels, data.test, info, arch, args.runs, protocol, args.seed, device, progress=False
            )
        else:
            gen = generators[variant, seed][0]
            sampler = GeneratorSampler.for_dim_protocol(gen, info, counts, args.seed)
            result = evaluate_resampled(
                sampler, data.test, info, arch, args.runs, dim_protocol, args.seed, device, progress=False
            )
        cells.add({**key, "mean": result.mean, "std": result.std, "accuracies": result.accuracies})
        label = run_label(variant, seed)
        print(f"{label:>19} ipc {ipc:>3} {arch:>9} {kind:>5}: {format_accuracy(result.mean, result.std)}", flush=True)

    def lookup(*where) -> dict | None:
        return cells.latest(keyed(*where)) if where[0] == "random real" or (where[0], where[-1]) in generators else None

    return report(args, cells, lookup, generators, protocol, device, time.perf_counter() - started, table)


def stage2_seeds(args) -> list[int]:
    try:
        seeds = [int(s) for s in args.stage2_seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--stage2-seeds {args.stage2_seeds!r}: give distinct integers >= 0, e.g. 0,1,2")
    return seeds


def cell_key(
    args,
    generators: dict,
    epochs: int,
    variant: str,
    ipc: int,
    arch: str = "convnet3",
    kind: str = "fixed",
    seed: int = 0,
) -> dict:
    """Everything a cell's figure depends on: the images' source (the generator's weights by their
    sha256, and its stage-2 seed), the protocol with its epochs, runs and seed; a rerun with other
    flags measures anew."""
    epochs = args.dim_epochs if kind == "dim" else epochs
    if variant != "random real":
        source = {"source": generators[variant, seed][2]["sha256"][:16], "stage2_seed": seed}
    else:
        source = {"source": "real"}
    return {
        "variant": variant,
        "ipc": ipc,
        "arch": arch,
        "protocol": kind,
        "dataset": args.dataset,
        **source,
        "epochs": epochs,
        "runs": args.runs,
        "seed": args.seed,
    }


PAIRS = (("logit", "cgan"), ("global+local", "cgan"), ("global+local", "logit"))


def seed_cells(lookup, seeds: list[int], variant: str, ipc: int, arch: str = "convnet3", kind: str = "fixed") -> dict:
    """Stage-2 seed -> that seed's cell, for the seeds done."""
    return {s: c for s in seeds if (c := lookup(variant, ipc, arch, kind, s))}


def summary(lookup, seeds: list[int], variant: str, ipc: int, arch: str = "convnet3", kind: str = "fixed"):
    """(mean, std, seeds done) or None: one seed's mean and evaluation-run std, or across several
    seeds the mean of their means and the std of those means (the generator-training spread)."""
    done = (
        {0: lookup(variant, ipc, arch, kind, 0)}
        if variant == "random real"
        else seed_cells(lookup, seeds, variant, ipc, arch, kind)
    )
    done = {s: c for s, c in done.items() if c}
    if not done:
        return None
    means = [c["mean"] for c in done.values()]
    if len(means) == 1:
        return means[0], next(iter(done.values()))["std"], 1
    return statistics.mean(means), statistics.stdev(means), len(means)


def paired(lookup, seeds: list[int], a: str, b: str, ipc: int, kind: str) -> str:
    """a - b per stage-2 seed (the two share every batch of that seed): mean ± std across seeds."""
    left, right = (
        seed_cells(lookup, seeds, a, ipc, "convnet3", kind),
        seed_cells(lookup, seeds, b, ipc, "convnet3", kind),
    )
    diffs = [100 * (left[s]["mean"] - right[s]["mean"]) for s in seeds if s in left and s in right]
    if not diffs:
        return "-"
    above = sum(d > 0 for d in diffs)
    if len(diffs) == 1:
        return f"{diffs[0]:+.2f} (1 seed)"
    return f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} ({above} of {len(diffs)} seeds above)"


def report(
    args,
    cells: Cells,
    lookup,
    generators: dict,
    protocol,
    device: torch.device,
    seconds: float,
    table: dict[str, dict],
) -> int:
    """Print and write the tables; ``lookup(variant, ipc, arch, kind, seed)`` is this run's cell or None."""
    ipcs, seeds = [int(i) for i in args.ipcs.split(",")], stage2_seeds(args)
    names = list(dict.fromkeys(v for v, _ in generators))

    def text(variant: str, ipc: int, arch: str = "convnet3", kind: str = "fixed") -> str:
        found = summary(lookup, seeds, variant, ipc, arch, kind)
        if found is None:
            return "-"
        partial = variant != "random real" and len(seeds) > 1 and found[2] < len(seeds)
        return format_accuracy(*found[:2]) + (f" ({found[2]} of {len(seeds)} seeds)" if partial else "")

    spread = (
        "the std of the evaluation runs"
        if len(seeds) == 1
        else f"for a generator row the std across stage-2 seeds {seeds} of each seed's mean over its runs"
    )
    header = (
        f"{args.dataset}, pipc {args.pipc}; one CGAN of {args.stage1_steps} steps shared by all variants, then "
        f"{args.stage2_steps} stage-2 steps each; options {args.set or 'defaults'}; {args.runs} runs; device {device}; "
        f"± is {spread}"
    )
    extras = {name: options for name, options in table.items() if name not in VARIANTS and name in names}
    if extras:
        header += "; extra variants " + "; ".join(
            f"{n}: {', '.join(f'{k}={v}' for k, v in o.items())}" for n, o in extras.items()
        )
    rows = [["random real", *(text("random real", i) for i in ipcs)]]
    rows += [[v, *(text(v, i) for i in ipcs)] for v in names]
    fixed = markdown_table(
        [f"fixed set, ConvNet-3, {protocol.epochs} epochs, last epoch", *(f"ipc {i}" for i in ipcs)], rows
    )
    per_seed = ""
    if len(seeds) > 1:
        per_seed = markdown_table(
            ["fixed set, per stage-2 seed (± evaluation runs)", *(f"ipc {i}" for i in ipcs)],
            [
                [
                    run_label(v, s),
                    *(
                        format_accuracy(c["mean"], c["std"]) if (c := lookup(v, i, "convnet3", "fixed", s)) else "-"
                        for i in ipcs
                    ),
                ]
                for s in seeds
                for v in names
                if (v, s) in generators
            ],
        )
    dim_names = [v for v in args.dim_variants.split(",") if v in names]
    dim_rows = [[v, *(text(v, i, kind="dim") for i in ipcs)] for v in dim_names]
    dim_title = f"DiM protocol, ConvNet-3, {args.dim_epochs} epochs of fresh batches, best of 5 tests"
    dim = markdown_table([dim_title, *(f"ipc {i}" for i in ipcs)], dim_rows) if dim_rows else ""
    kinds = ["fixed"] + (["dim"] if dim_rows else [])
    pair_rows = [
        [f"{a} - {b} ({kind})", *(paired(lookup, seeds, a, b, i, kind) for i in ipcs)]
        for kind in kinds
        for a, b in pair_list(args, table)
        if a in names and b in names
    ]
    pairs = (
        markdown_table(["paired by stage-2 seed, points", *(f"ipc {i}" for i in ipcs)], pair_rows) if pair_rows else ""
    )
    archs = [a for a in args.cross_archs.split(",") if a]
    cross = (
        markdown_table(
            [f"{args.cross_variant}, ipc {args.cross_ipc}, fixed set", *archs],
            [["accuracy %", *(text(args.cross_variant, args.cross_ipc, a) for a in archs)]],
        )
        if archs and args.cross_variant in names
        else ""
    )
    timing = {run_label(v, s): meta for (v, s), (_, _, meta) in generators.items()}
    speed = markdown_table(
        ["variant", "stage 1 s/step", "stage 2 s/step", "held-out selection (stage: step, score)"],
        [
            [
                label,
                m.get("seconds_per_step_stage1"),
                m.get("seconds_per_step_stage2"),
                "; ".join(f"{k}: {c['step']}, {100 * c['score']:.1f}" for k, c in chosen_steps(m).items()) or "-",
            ]
            for label, m in timing.items()
        ],
    )
    target = ordering(lookup, seeds, names, ipcs)
    tables = "\n\n".join(t for t in (header, fixed, per_seed, pairs, dim, cross, speed, target) if t)
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


def ordering(lookup, seeds: list[int], names: list[str], ipcs: list[int]) -> str:
    """The issue's targets beside the figures: global+local >= logit >= cgan per ipc and protocol (on
    the seed-averaged means), and the best generator's fixed ipc-50 sample against random real images
    at ipc 10."""
    lines = []
    for kind in ("fixed", "dim"):
        for ipc in ipcs:
            means = {
                v: found[0]
                for v in ("global+local", "logit", "cgan")
                if v in names and (found := summary(lookup, seeds, v, ipc, "convnet3", kind))
            }
            if len(means) == 3:
                held = means["global+local"] >= means["logit"] >= means["cgan"]
                order = " >= ".join(sorted(means, key=means.get, reverse=True))
                lines.append(f"- {kind} ipc {ipc}: {order} ({'ordering holds' if held else 'ordering MISSED'})")
    real = summary(lookup, seeds, "random real", 10)
    fifty = {v: found for v in names if (found := summary(lookup, seeds, v, 50))}
    if real and fifty:
        best = max(fifty, key=lambda v: fifty[v][0])
        verdict = "above" if fifty[best][0] > real[0] else "BELOW"
        lines.append(
            f"- best generator's fixed ipc-50 sample ({best}) "
            f"{format_accuracy(*fifty[best][:2])} vs random real ipc 10 "
            f"{format_accuracy(*real[:2])}: {verdict}"
        )
    return "Targets:\n" + "\n".join(lines) if lines else ""


if __name__ == "__main__":
    raise SystemExit(main())
