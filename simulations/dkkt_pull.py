"""How hard does the global model pull on the pixels, next to DM? A diagnostic for DM + DKKT.

    python -m simulations.dkkt_pull --dataset mnist --data-root DATA --global-model DIR --ipc 10 --pipc 50

DM + DKKT follows ``grad L_DM + w_kkt * grad L_DKKT``. When DKKT does not change the test
accuracy, the first question is whether it changes the images at all: this script measures, on
the same images and the same seeded draws the methods use (the DM network and DSA of iteration
k, the DKKT augmentation of iteration k), the norm of each term's pixel gradient, their ratio at
the recipe's w_kkt and their cosine. It measures at the public-subset start and, with ``--at
SET.pt`` (a set ``bench_dkkt`` keeps in ``OUT/sets``), at DM's converged images. Prints a table and
writes ``pull.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common.datasets import load_dataset
from common.fileio import atomic_write_json
from common.report import markdown_table
from server.methods.dkkt import DKKTLoss, DKKTOptions
from server.methods.dm import DMConfig, DMLoss, initial_images
from server.methods.registry import make_task
from simulations.bench_dkkt import parse_candidates

RECIPES = {  # name -> DKKT options (w_kkt is the weight the ratio is reported at)
    "un-augmented": "w_kkt=10,kkt_clean_term=true,kkt_aug_weight=0",
    "published": "w_kkt=10",
}


def pixel_gradient(objective, images: torch.Tensor, iteration: int) -> tuple[float, torch.Tensor]:
    """``(loss, d loss / d images)`` of one objective at one iteration's seeded draws."""
    syn = images.detach().clone().requires_grad_(True)
    loss = objective.backward(syn, iteration)
    return loss, syn.grad.detach()


def dkkt_term(task, labels: torch.Tensor, global_model: str, name: str, options: dict) -> DKKTLoss:
    """The DKKT objective of one ``--recipes`` entry, weighted by its w_kkt; other dm+dkkt options are refused."""
    options = dict(options)
    weight = float(options.pop("w_kkt", 1.0))
    if options.pop("lambda_scale", 1.0) != 1.0:
        raise SystemExit(f"recipe {name!r}: lambda_scale is not measured here; give lambda_init instead")
    other = sorted(k for k in options if k not in DKKTOptions.__dataclass_fields__)
    if other:
        raise SystemExit(f"recipe {name!r}: {', '.join(other)} do not change the pull; give w_kkt and DKKT options")
    return DKKTLoss(task, DKKTOptions(global_model=global_model, **options), labels, weight)


def measure(task, images: torch.Tensor, labels: torch.Tensor, global_model: str, recipes: dict, draws: int) -> list:
    """One row per recipe: mean over ``draws`` iterations of |g_DM|, |w g_DKKT|, their ratio and cosine."""
    dm = DMLoss(task, DMConfig())
    dm_grads = [pixel_gradient(dm, images, k)[1] for k in range(draws)]
    rows = []
    for name, options in recipes.items():
        term = dkkt_term(task, labels, global_model, name, options)
        ratios, cosines, accuracy = [], [], []
        for k, g_dm in enumerate(dm_grads):
            _, g_kkt = pixel_gradient(term, images, k)  # already times w_kkt
            ratios.append(float(g_kkt.norm() / g_dm.norm()))
            cosines.append(float(F.cosine_similarity(g_kkt.flatten(), g_dm.flatten(), dim=0)))
            accuracy.append(float(term.accuracy))
        rows.append(
            {
                "recipe": name,
                "options": {k: v for k, v in options.items() if k != "lambda_scale"},
                "dm_grad_norm": float(torch.stack([g.norm() for g in dm_grads]).mean()),
                "dkkt_over_dm": sum(ratios) / draws,
                "cosine": sum(cosines) / draws,
                "primal_accuracy": sum(accuracy) / draws,
            }
        )
    return rows


def load_kept(path: Path, labels: torch.Tensor) -> torch.Tensor:
    kept = torch.load(path, map_location="cpu", weights_only=True)
    if not torch.equal(kept["labels"], labels):
        raise SystemExit(f"{path}: its labels are not this task's (another ipc or dataset); pass a matching set")
    return kept["images"].float()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default="")
    p.add_argument("--global-model", required=True, help="a federation's OUT/global-model")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--pipc", default="50")
    p.add_argument("--at", action="append", default=[], help="also measure at a kept set (OUT/sets/.../dm.pt)")
    p.add_argument("--recipes", default=" | ".join(f"{k}: {v}" for k, v in RECIPES.items()), help="as --candidates")
    p.add_argument("--draws", type=int, default=3, help="iterations (seeded draws) averaged per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/dkkt-pull")
    args = p.parse_args(argv)
    recipes = parse_candidates(args.recipes)  # bench_dkkt's 'NAME: OPTION=VALUE,... | ...' syntax

    data = load_dataset(args.dataset, args.data_root or None)
    task = make_task(data, args.ipc, args.pipc, seed=args.seed, progress=False)
    start, labels = initial_images(task, "real")
    points = {"public-subset start": start, **{str(path): load_kept(Path(path), labels) for path in args.at}}
    report = []
    for where, images in points.items():
        for row in measure(task, images, labels, args.global_model, recipes, args.draws):
            report.append({"at": where, **row})
    table = markdown_table(
        ["images", "recipe", "|grad L_DM|", "w_kkt |grad L_DKKT| / |grad L_DM|", "cosine", "primal acc"],
        [
            [
                r["at"],
                r["recipe"],
                f"{r['dm_grad_norm']:.3f}",
                f"{r['dkkt_over_dm']:.3f}",
                f"{r['cosine']:+.3f}",
                f"{100 * r['primal_accuracy']:.0f} %",
            ]
            for r in report
        ],
    )
    print(f"{args.dataset}, ipc {args.ipc}, pipc {args.pipc}, {args.draws} draws per row\n\n{table}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "pull.json", {"args": vars(args), "rows": report})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
