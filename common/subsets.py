"""Per-class budgets and the server's public subset (pipc images per class)."""

from __future__ import annotations

import torch

from common.errors import ConfigError
from common.runtime import derive_seed, make_generator


def parse_counts(ipc: int | str | dict[int, int], num_classes: int) -> dict[int, int]:
    """``10`` -> every class 10; ``"0:5,1:12,..."`` or a dict -> ragged per-class counts."""
    if isinstance(ipc, dict):
        counts = {int(c): int(n) for c, n in ipc.items()}
    elif isinstance(ipc, int) or str(ipc).strip().isdigit():
        counts = dict.fromkeys(range(num_classes), int(ipc))
    else:
        try:
            counts = {int(c): int(n) for c, n in (item.split(":") for item in str(ipc).split(","))}
        except ValueError:
            raise ConfigError(f"--ipc {ipc!r}: use an integer or 'class:count,...' like 0:5,1:12") from None
    if sorted(counts) != list(range(num_classes)):
        raise ConfigError(
            f"--ipc must give a count for each of the {num_classes} classes, got classes {sorted(counts)}"
        )
    if any(n < 1 for n in counts.values()):
        raise ConfigError("every class needs at least 1 image per class")
    return counts


def parse_pipc(value: int | str | None) -> int | None:
    """``None``/``"all"`` -> the whole training split; else a positive integer."""
    if value is None or str(value).lower() == "all":
        return None
    try:
        pipc = int(value)
    except ValueError:
        raise ConfigError(f"--pipc {value!r}: use a positive integer or 'all'") from None
    if pipc < 1:
        raise ConfigError("--pipc must be at least 1 (or 'all')")
    return pipc


def public_subset_indices(labels: torch.Tensor, num_classes: int, pipc: int | None, seed: int) -> torch.Tensor:
    """Indices of ``pipc`` images per class drawn once with ``seed`` (all indices if ``pipc`` is None).

    The draw for a class depends only on ``(seed, class)``, so the same server subset is
    carved out wherever it is computed (the server, the partitioner of a simulated fleet).
    """
    if pipc is None:
        return torch.arange(labels.shape[0])
    sizes = torch.bincount(labels, minlength=num_classes)[:num_classes]
    if int(sizes.min()) == 0:
        raise ConfigError(f"class {int(sizes.argmin())} has no training images; the public subset cannot include it")
    if pipc > int(sizes.min()):  # asking for more than a class holds is an error, not 'all'
        raise ConfigError(
            f"--pipc {pipc} is more than class {int(sizes.argmin())} has ({int(sizes.min())} training images); "
            f"use at most {int(sizes.min())}, or 'all' for the whole training split"
        )
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        order = torch.randperm(len(members), generator=make_generator(derive_seed("public-subset", seed, c)))
        chosen.append(members[order[:pipc]])
    return torch.sort(torch.cat(chosen)).values


def held_out_fold(
    labels: torch.Tensor, per_class: int, fold: int, seed_key: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) positions of ``labels``: per class, fold k of a seeded permutation.

    Each class present is permuted once with ``derive_seed(*seed_key, class)``; fold k holds out
    positions ``[k * per_class, (k + 1) * per_class)``, so different folds are disjoint. Raises a
    ConfigError naming the class when a fold would leave it no kept image.
    """
    keep, held = [], []
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        lo, hi = fold * per_class, (fold + 1) * per_class
        if hi >= len(members):
            raise ConfigError(f"holding out images {lo}..{hi - 1} of class {c} leaves none of its {len(members)}")
        order = members[torch.randperm(len(members), generator=make_generator(derive_seed(*seed_key, c)))]
        held.append(order[lo:hi])
        keep.append(torch.cat([order[:lo], order[hi:]]))
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values
