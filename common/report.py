"""Plain-text result tables (markdown) and the benchmarks' resumable cell store."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from common.fileio import atomic_write_json


def format_accuracy(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def matches(cell: dict, key: dict) -> bool:
    return all(cell.get(k) == v for k, v in key.items())


class Cells:
    """Finished cells on disk, so a crashed benchmark resumes where it stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = json.loads(path.read_text())["cells"] if path.exists() else []

    def get(self, key: dict) -> dict | None:
        """The first cell added under ``key`` (every item of ``key`` equal)."""
        return next((c for c in self.done if matches(c, key)), None)

    def latest(self, key: dict) -> dict | None:
        """The last cell added under ``key`` (the one a report keyed on fewer fields shows)."""
        return next((c for c in reversed(self.done) if matches(c, key)), None)

    def add(self, cell: dict) -> None:
        self.done.append(cell)
        atomic_write_json(self.path, {"cells": self.done})
