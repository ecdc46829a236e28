"""Validated DM+DKKT recipes: the DKKT settings a validation split chose, per dataset.

The published DKKT recipe (one composed augmented copy at weight 5) was designed for 32-px
images; on 8 x 8 digits that copy is a large distortion and the recipe loses to plain DM. So
``dm+dkkt`` starts from the recipe that ``simulations/bench_dkkt.py``'s sweep chose for the
dataset on held-out folds of the public subset (never the test split), when one was measured.

Options the caller gives always win over the recipe; ``recipe=published`` turns it off. Every
artifact's manifest records which recipe it ran and where the recipe came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

RECIPE_CHOICES = ("validated", "published")


@dataclass(frozen=True)
class Recipe:
    options: dict[str, Any]
    evidence: str  # what the validation measured, and the command that measures it
    command: str = ""
    chosen_at: dict[str, Any] = field(default_factory=dict)  # the ipc / pipc the sweep ran at


# the candidates of the MNIST / Fashion-MNIST sweeps (the published augmented loss at w_kkt 10 was dropped
# after it lost on the first ipc-10 fold of both; see the README)
CANDIDATES_28PX = (
    "dm: w_kkt=0 | w10-clean: w_kkt=10,kkt_clean_term=true,kkt_aug_weight=0 | "
    "w30-clean: w_kkt=30,kkt_clean_term=true,kkt_aug_weight=0"
)


def swept_28px(dataset: str, w_kkt: float, evidence: str, ipc: int = 1) -> Recipe:
    """An un-augmented DKKT recipe the 28-px sweep chose at ``ipc`` (global model: 10 clients, Dirichlet 0.5,
    4 rounds x 2 local epochs)."""
    command = (
        f"python -m simulations.bench_dkkt --dataset {dataset} --data-root DATA --clients 10 --alpha 0.5 --rounds 4 "
        f"--local-epochs 2 --ipcs {ipc} --pipcs 50,10 --sweep-ipcs {ipc} --sweep-pipc 50 --iterations 1000 --runs 3 "
        f"--sweep-runs 2 --quick --candidates '{CANDIDATES_28PX}' --stop-after sweep"
    )
    options = {"w_kkt": w_kkt, "kkt_clean_term": True, "kkt_aug_weight": 0.0}
    return Recipe(options, evidence, command, chosen_at={"ipc": ipc, "pipc": 50, "iterations": 1000})


# per dataset, one recipe per swept ipc; a task takes the recipe of the nearest swept ipc
VALIDATED: dict[str, list[Recipe]] = {
    "digits": [
        Recipe(
            options={"w_kkt": 10.0, "kkt_clean_term": True, "kkt_aug_weight": 0.0},
            evidence=(
                "validation 92.88 % vs dm 91.88 % (+1.00, 1.0 SE paired over 2 folds of 20 held-out images per class); "
                "published recipe w_kkt 1: 84.25 %, w_kkt 10: 76.88 %; un-augmented w_kkt 1: 92.75 %"
            ),
            command=(
                "python -m simulations.bench_dkkt --dataset digits --global-model runs/main/global-model --ipcs 10 "
                "--pipcs 50 --sweep-ipcs 10 --sweep-pipc 50 --iterations 1000 --sweep-runs 2 --quick --stop-after sweep"
            ),
            chosen_at={"ipc": 10, "pipc": 50, "iterations": 1000},
        )
    ],
    "mnist": [
        swept_28px(
            "mnist",
            w_kkt=10.0,
            evidence=(
                "ipc 1: validation 86.50 % vs dm 86.13 % (+0.38, 3.0 SE paired over 2 folds of 20 held-out images "
                "per class: +0.50, +0.25); un-augmented w_kkt 30: 86.38 %; tried after the choice, none better: "
                "w_kkt 10 decaying 86.25 %, a DSV start then dm 86.25 %. Global model 98.71 %"
            ),
        ),
        swept_28px(
            "mnist",
            w_kkt=10.0,
            ipc=10,
            evidence=(
                "ipc 10: validation 96.25 % vs dm 95.88 % (+0.37, 0.6 SE paired over 2 folds of 20 held-out images "
                "per class: -0.25, +1.00: the folds do not separate the candidates at 96 %); un-augmented w_kkt 30: "
                "96.13 %. An earlier, lost run's first fold: the published augmented loss at w_kkt 10 lost 2.25 "
                "points (94.00 % vs 96.25 %). Global model 98.71 %"
            ),
        ),
    ],
    "fashion-mnist": [
        swept_28px(
            "fashion-mnist",
            w_kkt=30.0,
            evidence=(
                "ipc 1: validation 71.75 % vs dm 70.63 % (+1.12, 1.8 SE paired over 2 folds of 20 held-out images "
                "per class: +0.50, +1.75); un-augmented w_kkt 10: 71.13 %; tried after the choice, none better: "
                "w_kkt 100 69.88 %, w_kkt 30 decaying 71.63 %, warming up 71.38 %, a DSV start then dm 71.50 %, "
                "a DSV start then w_kkt 30 70.25 %. Global model 88.39 %"
            ),
        ),
        swept_28px(
            "fashion-mnist",
            w_kkt=10.0,
            ipc=10,
            evidence=(
                "ipc 10: validation 84.88 % vs dm 83.50 % (+1.38, 3.7 SE paired over 2 folds of 20 held-out images "
                "per class: +1.00, +1.75); un-augmented w_kkt 30: 84.38 %. An earlier, lost run's first fold: the "
                "published augmented loss at w_kkt 10 lost 4.00 points (79.50 % vs 83.50 %). Global model 88.39 %"
            ),
        ),
    ],
    "cifar10": [
        Recipe(
            options={"w_kkt": 10.0},  # the published loss (one augmented copy at weight 5), ten times stronger
            evidence=(
                "validation 28.38 % vs dm 26.63 % (+1.75, 1.8 SE paired over 2 folds of 20 held-out images per class: "
                "+2.75, +0.75); published w_kkt 1: 27.00 %; un-augmented w_kkt 1: 26.00 %, w_kkt 10: 25.38 %; "
                "global model 63.98 % (10 clients, Dirichlet 0.5, 4 rounds x 2 local epochs)"
            ),
            command=(
                "python -m simulations.bench_dkkt --dataset cifar10 --data-root DATA --clients 10 --alpha 0.5 "
                "--rounds 4 --local-epochs 2 --ipcs 1,10 --pipcs 50,10 --sweep-ipcs 1,10 --sweep-pipc 50 "
                "--iterations 1000 --runs 3 --sweep-runs 2 --quick --stop-after sweep"
            ),
            chosen_at={"ipc": 1, "pipc": 50, "iterations": 1000},
        ),
        Recipe(
            options={"w_kkt": 10.0},  # the same choice at ipc 10, by a far wider margin
            evidence=(
                "validation 45.50 % vs dm 38.75 % (+6.75, 27.0 SE paired over 2 folds of 20 held-out images per "
                "class: +6.50, +7.00); published w_kkt 1: 43.00 %; un-augmented w_kkt 1: 40.38 %, w_kkt 10: 41.75 %; "
                "global model 63.98 % (10 clients, Dirichlet 0.5, 4 rounds x 2 local epochs)"
            ),
            command=(
                "python -m simulations.bench_dkkt --dataset cifar10 --data-root DATA --clients 10 --alpha 0.5 "
                "--rounds 4 --local-epochs 2 --ipcs 1,10 --pipcs 50,10 --sweep-ipcs 1,10 --sweep-pipc 50 "
                "--iterations 1000 --runs 3 --sweep-runs 2 --quick --stop-after sweep"
            ),
            chosen_at={"ipc": 10, "pipc": 50, "iterations": 1000},
        ),
    ],
}


def check_recipe(which: str) -> str:
    """``which`` if it names a recipe choice, else a one-line ConfigError naming the choices."""
    if which not in RECIPE_CHOICES:
        raise ConfigError(f"recipe {which!r}: use validated (the dataset's validated DKKT settings) or published")
    return which


def recipe_for(dataset: str, ipc: float) -> Recipe | None:
    """The validated recipe of ``dataset`` swept at the ipc nearest ``ipc`` (None: none measured)."""
    recipes = VALIDATED.get(dataset, [])
    return min(recipes, key=lambda r: abs(r.chosen_at["ipc"] - ipc)) if recipes else None


def apply_recipe(task, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(options with the task's validated recipe under them, the manifest's record of it)``."""
    which = check_recipe(options.get("recipe", "validated"))
    dataset = task.info.name
    ipc = sum(task.counts.values()) / max(1, len(task.counts))
    recipe = recipe_for(dataset, ipc) if which == "validated" else None
    if recipe is None:
        why = "asked for" if which == "published" else f"no validated recipe for {dataset!r}"
        return options, {"recipe": "published", "why": why}
    given = sorted(k for k in recipe.options if k in options)
    record = {
        "recipe": "validated",
        "dataset": dataset,
        "options": recipe.options,
        "overridden_by_caller": given,
        "chosen_at": recipe.chosen_at,
        "evidence": recipe.evidence,
        "command": recipe.command,
    }
    return {**recipe.options, **options}, record
