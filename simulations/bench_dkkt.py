"""Benchmark the server distillation methods against a federated global model.

    python -m simulations.bench_dkkt --dataset cifar10 --data-root ../shared/data --clients 10 --alpha 0.5 \\
        --rounds 4 --local-epochs 2 --ipcs 1,10 --pipcs 50,10 --iterations 1000 --runs 3 --quick \\
        --out runs/bench-dkkt-cifar10

Three phases, each resumable (finished cells are kept in ``--out`` and skipped on a rerun; a dm,
dsv or dm+dkkt cell cut mid-distillation continues from its checkpoint in ``--out/work``, at most
100 iterations back, to the set an uncut run gives):

1. **federation**: a simulated fleet (``--clients``, Dirichlet(``--alpha``) label skew, the
   largest pipc carved out as the server's public subset) trains the global model; or pass
   ``--global-model DIR``.
2. **sweep** (model selection without the test split): at every ``--sweep-ipcs`` and
   ``--sweep-pipc`` the public subset is cut ``--val-folds`` ways: in fold k, ``--val-per-class``
   images per class (disjoint from the other folds' held-out images) are held out and the method
   sees the rest. Every ``--candidates`` recipe is distilled per fold and scored on that fold's
   held-out images; a candidate's score is its mean over folds x ``--sweep-runs``, its spread the
   std of the per-fold means. The best mean wins (ties: the earlier candidate); the report says
   by how much it leads DM (w_kkt 0) and the runner-up, in standard errors of the gap paired over folds.
   ``--recipe validated`` skips this phase and runs the dataset's recipe that an earlier sweep chose
   (``server/methods/recipes.py``, with its evidence): the test table without the sweep's cost.
3. **table**: random / herding / dm / dsv / dm+dkkt / dsv-dm-avg for every ipc x pipc, with
   dm+dkkt at the recipe the validation chose for the nearest swept ipc (``dm+dkkt@1``: the
   default recipe at w_kkt 1, for reference), tested on the real test split.

Writes ``sweep.json``, ``results.json`` and ``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.commands import eval_config_from_args, named_lists
from common.datasets import Split, load_dataset
from common.errors import ConfigError
from common.evaluation import evaluate_set
from common.fileio import atomic_write_bytes, atomic_write_json
from common.report import Cells, format_accuracy, markdown_table
from common.runtime import peak_memory_mib, resolve_device
from common.subsets import held_out_fold
from server.federation.rounds import RoundPlan, method_options
from server.methods.dkkt import lambda_from_weight_decay
from server.methods.dsv import averaged_runs
from server.methods.pixel_loop import checkpoint_path
from server.methods.recipes import VALIDATED
from server.methods.registry import distill, make_config, make_task, option_names, parse_options

METHODS = "random,herding,dm,dsv,dm+dkkt,dm+dkkt@1,dsv-dm-avg"
# The published DKKT recipe (one augmented copy, weight 5) and the un-augmented one, at two weights.
DEFAULT_CANDIDATES = (
    "dm: w_kkt=0 | w1: w_kkt=1 | w10: w_kkt=10 | "
    "w1-clean: w_kkt=1,kkt_clean_term=true,kkt_aug_weight=0 | "
    "w10-clean: w_kkt=10,kkt_clean_term=true,kkt_aug_weight=0"
)


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
    p.add_argument(
        "--candidates",
        default=DEFAULT_CANDIDATES,
        help="dm+dkkt recipes the validation chooses from: 'NAME: OPTION=VALUE,... | ...' "
        "(lambda_scale=X multiplies the weight-decay rule's lambda)",
    )
    p.add_argument("--sweep-ipcs", default="1,10", help="ipc values swept (each table ipc uses the nearest)")
    p.add_argument("--sweep-pipc", type=int, default=50)
    p.add_argument(
        "--recipe",
        choices=["sweep", "validated"],
        default="sweep",
        help="how dm+dkkt's recipe is chosen: sweep now, or the dataset's validated one (server/methods/recipes.py)",
    )
    p.add_argument("--sweep-iterations", type=int, default=None, help="iterations per sweep run (default --iterations)")
    p.add_argument("--val-folds", type=int, default=2, help="disjoint held-out folds of the public subset")
    p.add_argument("--val-per-class", type=int, default=20, help="held-out public images per class in each fold")
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
    last = history[-1]["round"] if history else 0
    if last != args.rounds or not meta.exists():
        raise SystemExit(
            f"the federation stopped after round {last} of {args.rounds} without a global model; see "
            f"{out / 'federation' / '.flwr'} for its log, then re-run the same command to resume from its checkpoint"
        )
    print(f"global model after {last} rounds: {100 * history[-1]['accuracy']:.2f} %")
    return model_dir


def parse_candidates(text: str) -> dict[str, dict]:
    """``'dm: w_kkt=0 | w1: w_kkt=1'`` -> {name: typed dm+dkkt options (lambda_scale kept as a float)}."""
    candidates: dict[str, dict] = {}
    for name, body in named_lists(text, "--candidates"):
        items = [i.strip() for i in body.split(",") if i.strip()]
        scale = [i for i in items if i.replace(" ", "").startswith("lambda_scale=")]
        rest = ",".join(i for i in items if i not in scale)
        options = parse_options("dm+dkkt", rest)
        options["lambda_scale"] = float(scale[-1].split("=", 1)[1]) if scale else 1.0
        candidates[name] = options
    if not candidates:
        raise SystemExit("--candidates is empty; name at least one recipe, e.g. 'dm: w_kkt=0 | w1: w_kkt=1'")
    return candidates


def validation_split(task, per_class: int, seed: int, fold: int = 0):
    """Fold ``fold`` of the public subset: (task without its held-out images, the held-out split).

    Each class is permuted once (seeded); fold k holds out positions ``[k * per_class, (k + 1) * per_class)``,
    so the folds' held-out images are disjoint.
    """
    try:
        keep, held = held_out_fold(task.real.labels, per_class, fold, ("val", seed))
    except ConfigError as exc:
        raise SystemExit(f"fold {fold}: {exc}; lower --val-per-class or --val-folds, or raise --sweep-pipc") from None
    trimmed = replace(
        task, real=task.real.subset(keep), real_indices=task.real_indices[keep], pipc=task.pipc - per_class
    )
    return trimmed, task.real.subset(held)


def score_candidates(sweep_cells: list[dict], ipc: int) -> list[dict]:
    """Per candidate at ``ipc``: mean over every fold's runs, std and standard error of the per-fold means."""
    by_name: dict[str, list[dict]] = {}
    for cell in sweep_cells:
        if cell["ipc"] == ipc:
            by_name.setdefault(cell["candidate"], []).append(cell)
    scores = []
    for name, cells in by_name.items():
        fold_means = torch.tensor([c["mean"] for c in sorted(cells, key=lambda c: c["fold"])], dtype=torch.float64)
        accuracies = [a for c in cells for a in c["accuracies"]]
        std = fold_means.std().item() if len(fold_means) > 1 else 0.0
        timed = [c["seconds_per_iteration"] for c in cells if c.get("seconds_per_iteration")]
        scores.append(
            {
                "ipc": ipc,
                "candidate": name,
                "options": cells[0]["options"],
                "folds": len(cells),
                "mean": sum(accuracies) / len(accuracies),
                "std": std,
                "sem": std / len(fold_means) ** 0.5,
                "fold_means": {c["fold"]: c["mean"] for c in cells},
                "order": cells[0].get("order", 0),
                "seconds_per_iteration": sum(timed) / len(timed) if timed else None,
            }
        )
    return sorted(scores, key=lambda s: s["order"])


def is_plain_dm(options: dict) -> bool:
    """dm+dkkt options that make it exactly ``dm``: no DKKT term and no DSV start."""
    return options.get("w_kkt") == 0 and not options.get("init_dsv_iterations")


def choose(scores: list[dict]) -> dict:
    """The validation-best candidate (ties: the earlier one), with its lead over DM and the runner-up.

    A lead is reported in standard errors of the gap. Both candidates ran on the same folds, whose
    difficulty differs by more than the candidates do, so the gap is paired: its SE is the std of the
    per-fold gaps over sqrt(folds) (with one shared fold, the pooled sqrt(sem_a^2 + sem_b^2)). Above 1
    the folds separate the two candidates; below it the choice is a coin toss the table should not trust.
    """
    best = max(scores, key=lambda s: (round(s["mean"], 6), -s["order"]))

    def lead(other: dict | None) -> dict | None:
        if other is None:
            return None
        gap = best["mean"] - other["mean"]
        shared = sorted(set(best["fold_means"]) & set(other["fold_means"]))
        if len(shared) > 1:
            gaps = torch.tensor([best["fold_means"][f] - other["fold_means"][f] for f in shared], dtype=torch.float64)
            se = gaps.std().item() / len(shared) ** 0.5
        else:
            se = (best["sem"] ** 2 + other["sem"] ** 2) ** 0.5
        return {"candidate": other["candidate"], "gap": gap, "in_sem": gap / se if se else float("inf")}

    dm = next((s for s in scores if is_plain_dm(s["options"]) and s is not best), None)
    rest = [s for s in scores if s is not best]
    runner_up = max(rest, key=lambda s: s["mean"]) if rest else None
    return {**best, "lead_over_dm": lead(dm), "lead_over_runner_up": lead(runner_up)}


RESUMABLE = ("dm", "dsv", "dm+dkkt")  # one pixel loop each: a cell cut mid-run continues from its checkpoint
CHECKPOINT_EVERY = 100  # iterations a cut cell can lose


def cell_workdir(out: Path, *parts) -> Path:
    """Where one table or sweep cell keeps its checkpoint while it runs (removed once it is cached)."""
    name = "-".join(str(p) for p in parts)
    return out / "work" / "".join(ch if ch.isalnum() or ch in "+-_." else "_" for ch in name)


def resumable(task, method: str, options: dict, workdir: Path | None) -> tuple:
    """The task and options of a cell that checkpoints into ``workdir`` every CHECKPOINT_EVERY iterations and
    continues from the checkpoint a cut run left (the continued run equals an uncut one: tested)."""
    if workdir is None or method not in RESUMABLE:
        return task, options
    workdir.mkdir(parents=True, exist_ok=True)
    resume = checkpoint_path(workdir, method).exists()
    return replace(task, workdir=workdir), {**options, "checkpoint_every": CHECKPOINT_EVERY, "resume": resume}


REUSED_PARTS = ("dm", "dsv")  # the runs dsv-dm-avg averages: kept per table cell in --out/sets


def kept_set(sets: Path, method: str) -> Path:
    return sets / f"{method}.pt"


def keep_set(sets: Path, method: str, dset, options: dict, seconds: float) -> None:
    """Keep a dm / dsv set of the table with the exact config it ran, for dsv-dm-avg to average."""
    buffer = io.BytesIO()
    config = dataclasses.asdict(make_config(method, options))
    torch.save({"images": dset.images, "labels": dset.labels, "config": config, "seconds": seconds}, buffer)
    atomic_write_bytes(kept_set(sets, method), buffer.getvalue())


def averaged_from_kept(sets: Path, options: dict) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """dsv-dm-avg's set from this cell's kept dm and dsv sets, when both ran the configs it would run
    (bit for bit the same set, tested); None: run it."""
    dm_config, dsv_config = averaged_runs(make_config("dsv-dm-avg", options))
    if dm_config.init != "real":
        return None
    parts = []
    for method, wanted in zip(REUSED_PARTS, (dm_config, dsv_config), strict=True):
        path = kept_set(sets, method)
        if not path.exists():
            return None
        part = torch.load(path, weights_only=True)
        if part["config"] != dataclasses.asdict(wanted):
            return None
        parts.append(part)
    dm, dsv = parts
    if not torch.equal(dm["labels"], dsv["labels"]):
        return None
    return (dm["images"] + dsv["images"]) / 2, dm["labels"], dm["seconds"] + dsv["seconds"]


def run_cell(
    data, task, method, options, test: Split, args, config, device, sets: Path | None = None, work: Path | None = None
) -> dict:
    """Distil (or, for dsv-dm-avg, average the kept dm and dsv sets of ``sets``) and evaluate; a cut
    distillation continues from its checkpoint in ``work`` (see :func:`resumable`)."""
    reused = averaged_from_kept(sets, options) if sets is not None and method == "dsv-dm-avg" else None
    manifest, note = {}, {}
    if reused is not None:
        images, labels, distill_s = reused
        note = {"note": "averaged from this cell's dm and dsv sets (what dsv-dm-avg runs, bit for bit)"}
    else:
        started = time.perf_counter()
        dset = distill(method, *resumable(task, method, options, work))
        distill_s = time.perf_counter() - started
        images, labels, manifest = dset.images, dset.labels, dset.manifest
        if manifest.get("resumed_from"):
            note = {"resumed_from": manifest["resumed_from"]}  # distill_seconds: this run's part only
        if sets is not None and method in REUSED_PARTS:
            keep_set(sets, method, dset, options, distill_s)
    result = evaluate_set(
        images, labels, test, data.info, runs=args.runs_now, config=config, seed=args.seed, device=device
    )
    if work is not None and work.exists():
        shutil.rmtree(work)
    return {
        "mean": result.mean,
        "std": result.std,
        "accuracies": result.accuracies,
        "distill_seconds": round(distill_s, 2),
        "seconds_per_iteration": manifest.get("seconds_per_iteration"),
        "lambda_init": manifest.get("lambda_init"),
        "kkt_primal_accuracy": manifest.get("kkt_primal_accuracy"),
        **note,
    }


def sweep_ipc(args, data, ipc: int, candidates: dict, sweep: Cells, model_meta, options_for, config, device) -> dict:
    """Phase 2 at one ipc: every candidate on every fold (finished cells are skipped); returns the choice."""
    task = make_task(data, ipc, args.sweep_pipc, seed=args.seed, device=device, progress=False)
    iterations = args.sweep_iterations or args.iterations
    args.runs_now = args.sweep_runs
    for fold in range(args.val_folds):
        trimmed, val = validation_split(task, args.val_per_class, args.seed, fold)
        rule = lambda_from_weight_decay(sum(task.counts.values()), model_meta["weight_decay"])
        for order, (name, options) in enumerate(candidates.items()):
            key = {"ipc": ipc, "candidate": name, "fold": fold, "options": options, "iterations": iterations}
            if sweep.get(key) is not None:
                continue
            recipe = {k: v for k, v in options.items() if k != "lambda_scale"}
            opts = options_for("dm+dkkt", **recipe, iterations=iterations, lambda_init=options["lambda_scale"] * rule)
            work = cell_workdir(Path(args.out), "sweep", f"ipc{ipc}", f"fold{fold}", name)
            result = run_cell(data, trimmed, "dm+dkkt", opts, val, args, config, device, work=work)
            cell = {**key, "order": order, **result}
            sweep.add(cell)
            print(f"sweep ipc {ipc} fold {fold} {name}: val {format_accuracy(cell['mean'], cell['std'])}", flush=True)
    return current_choice(args, sweep, candidates, ipc)


def validated_choices(dataset: str) -> dict[int, dict]:
    """Per swept ipc, the validated recipe of ``dataset`` in the shape of a sweep's choice."""
    recipes = VALIDATED.get(dataset)
    if not recipes:
        raise SystemExit(f"--recipe validated: no validated recipe for {dataset!r}; run the sweep (--recipe sweep)")
    return {
        r.chosen_at["ipc"]: {
            "candidate": "validated",
            "options": {**r.options, "lambda_scale": 1.0},
            "evidence": r.evidence,
            "chosen_at": r.chosen_at,
            "lead_over_dm": None,
            "lead_over_runner_up": None,
        }
        for r in recipes
    }


def current_cells(args, sweep: Cells, candidates: dict) -> list[dict]:
    """The sweep cells of today's candidates, folds and budget (older sweeps in the same file are ignored)."""
    iterations = args.sweep_iterations or args.iterations
    return [
        c
        for c in sweep.done
        if c.get("iterations") == iterations
        and candidates.get(c.get("candidate")) == c.get("options")
        and c.get("fold", 0) < args.val_folds
    ]


def current_choice(args, sweep: Cells, candidates: dict, ipc: int) -> dict | None:
    """The choice at ``ipc`` from :func:`current_cells` (None: nothing swept there yet)."""
    scores = score_candidates(current_cells(args, sweep, candidates), ipc)
    return choose(scores) if scores else None


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
        # a candidate is the whole recipe: no dataset-validated DKKT settings under it
        pinned = {"recipe": "published"} if "recipe" in option_names(method) else {}
        return {**pinned, **method_options(replace(budget, method=method, options=extra), global_model), **more}

    sweep, candidates = Cells(out / "sweep.json"), parse_candidates(args.candidates)
    if args.report:
        if args.recipe == "validated":
            chosen = validated_choices(data.info.name)
        else:
            chosen = {i: current_choice(args, sweep, candidates, int(i)) for i in args.sweep_ipcs.split(",")}
        chosen = {i: c for i, c in chosen.items() if c is not None}
        return report(args, sweep, Cells(out / "cells.json"), chosen, model_meta, config, device)

    # phase 2: sweep on held-out folds of the public subset, per ipc (or the validated recipe)
    best: dict[int, dict] = validated_choices(data.info.name) if args.recipe == "validated" else {}
    sweep_ipcs = [] if args.recipe == "validated" else [int(i) for i in args.sweep_ipcs.split(",")]
    for ipc in sweep_ipcs:
        best[ipc] = sweep_ipc(args, data, ipc, candidates, sweep, model_meta, options_for, config, device)
        lead = best[ipc]["lead_over_dm"]
        print(
            f"validation chose for ipc {ipc}: {best[ipc]['candidate']} "
            f"({format_accuracy(best[ipc]['mean'], best[ipc]['std'])})"
            + (f", {100 * lead['gap']:+.2f} points over dm ({lead['in_sem']:.1f} SE)" if lead else ""),
            flush=True,
        )
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
                base_method, _, fixed_w = method.partition("@")  # dm+dkkt@1: w_kkt fixed at 1, not chosen
                more = {}
                if base_method == "dm+dkkt":
                    choice = best[min(best, key=lambda i: abs(i - ipc))]
                    recipe = {"w_kkt": float(fixed_w), "lambda_scale": 1.0} if fixed_w else dict(choice["options"])
                    scale = recipe.pop("lambda_scale")
                    rule = lambda_from_weight_decay(m_images, model_meta["weight_decay"])
                    more = {**recipe, "lambda_init": scale * rule}
                cached = cells.get({**key, "options": more})
                if cached is not None:  # a cell of another recipe (the choice moved since it ran) is not reused
                    if cells.latest(key) is not cached:
                        cells.add(cached)  # the choice moved back: the report reads the newest cell of a key
                    continue
                same_as_dm = cells.get({"method": "dm", "ipc": ipc, "pipc": pipc})
                chosen_cell = cells.get({"method": "dm+dkkt", "ipc": ipc, "pipc": pipc})
                if base_method == "dm+dkkt" and is_plain_dm(more) and same_as_dm is not None:
                    # w_kkt 0 is exactly dm (tested): reuse its cell instead of recomputing it
                    cell = {**same_as_dm, **key, "note": "w_kkt 0 chosen: identical to dm"}
                elif fixed_w and chosen_cell is not None and chosen_cell.get("options") == more:
                    cell = {**chosen_cell, **key, "note": "same options as the validation choice"}
                else:
                    sets = out / "sets" / f"pipc{pipc}-ipc{ipc}"
                    opts = options_for(base_method, **more)
                    work = cell_workdir(out, f"pipc{pipc}", f"ipc{ipc}", method)
                    result = run_cell(data, task, base_method, opts, data.test, args, config, device, sets, work)
                    cell = {**key, **result}
                recipe_name = choice["candidate"] if base_method == "dm+dkkt" and not fixed_w else None
                cells.add({**cell, "options": more, "recipe": recipe_name})
                print(
                    f"pipc {pipc:>3} ipc {ipc:>3} {method:>10}: {format_accuracy(cell['mean'], cell['std'])}",
                    flush=True,
                )

    return report(args, sweep, cells, best, model_meta, config, device)


def report(args, sweep: Cells, cells: Cells, chosen: dict, model_meta: dict, config, device) -> int:
    """Print and write the method table, DM+DKKT's gain over DM, and the sweep ('not run' where unfinished)."""
    out = Path(args.out)
    methods = [m for m in args.methods.split(",") if m]
    ipcs, pipcs = [int(i) for i in args.ipcs.split(",")], [int(p) for p in args.pipcs.split(",")]
    by_key = {(c["method"], c["pipc"], c["ipc"]): c for c in cells.done}

    def cell_text(m: str, p: int, i: int) -> str:
        cell = by_key.get((m, p, i))
        if cell is None:
            return "not run"
        recipe = f" ({cell['recipe']})" if cell.get("recipe") else ""
        return format_accuracy(cell["mean"], cell["std"]) + recipe

    def gain_text(p: int, i: int) -> str:
        dm, dkkt = by_key.get(("dm", p, i)), by_key.get(("dm+dkkt", p, i))
        if dm is None or dkkt is None:
            return "not run"
        gap, bar = dkkt["mean"] - dm["mean"], max(dm["std"], dkkt["std"])
        verdict = "above" if gap > bar else ("below" if gap < -bar else "within std")
        return f"{100 * gap:+.2f} ({verdict})"

    rows = [[m, p] + [cell_text(m, p, i) for i in ipcs] for p in pipcs for m in methods]
    rows += [["dm+dkkt - dm", p] + [gain_text(p, i) for i in ipcs] for p in pipcs]
    sweep_rows, swept = [], current_cells(args, sweep, parse_candidates(args.candidates))
    for ipc in sorted({c["ipc"] for c in swept}):
        for score in score_candidates(swept, ipc):
            options = ", ".join(f"{k}={v}" for k, v in score["options"].items() if not (k == "lambda_scale" and v == 1))
            seconds = score["seconds_per_iteration"]
            sweep_rows.append(
                [
                    ipc,
                    score["candidate"],
                    options,
                    score["folds"],
                    format_accuracy(score["mean"], score["std"]),
                    f"{seconds:.3f}" if seconds else "-",
                ]
            )

    def chosen_line(ipc, c: dict) -> str:
        if c.get("evidence"):
            return f"ipc {ipc}: the validated recipe {c['options']} ({c['evidence']})"
        leads, named = [], set()
        for lead in (c["lead_over_dm"], c["lead_over_runner_up"]):
            if lead is not None and lead["candidate"] not in named:
                named.add(lead["candidate"])
                leads.append(f"{100 * lead['gap']:+.2f} over {lead['candidate']} ({lead['in_sem']:.1f} SE)")
        return f"ipc {ipc}: {c['candidate']} ({'; '.join(leads) or 'alone'})"

    chosen_text = "; ".join(chosen_line(i, c) for i, c in chosen.items())
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
    seen = args.sweep_pipc - args.val_per_class
    sweep_text = (
        # a validated run sweeps nothing: a table of whatever older sweep sits in --out would mislead
        ""
        if args.recipe == "validated"
        else f"Sweep (dm+dkkt at pipc {args.sweep_pipc}, {args.sweep_iterations or args.iterations} iterations; "
        f"{args.val_folds} folds, each seeing {seen} public images per class and scored on its own "
        f"{args.val_per_class} held-out ones; {args.sweep_runs} runs per fold; mean over all runs, "
        f"± std of the fold means):\n\n"
        f"{markdown_table(['ipc', 'recipe', 'options', 'folds', 'validation acc %', 's / iteration'], sweep_rows)}\n\n"
    )
    text = (
        f"{header}\n\n{markdown_table(['method', 'pipc'] + [f'ipc {i}' for i in ipcs], rows)}\n\n{sweep_text}"
        f"{'validated recipe, not swept in this run' if args.recipe == 'validated' else 'chosen on validation'}: "
        f"{chosen_text}; "
        f"peak memory {peak_memory_mib(device):.0f} MiB\n"
    )
    print("\n" + text)
    atomic_write_json(
        out / "results.json", {"header": header, "cells": cells.done, "sweep": sweep.done, "chosen": chosen}
    )
    atomic_write_bytes(out / "table.md", text.encode())
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
