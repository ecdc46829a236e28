"""The pixel-optimisation loop shared by DM, DSV (DKKT) and DM+DKKT.

A method hands :func:`optimise_pixels` its initial synthetic images, an optimizer over them, and
a list of :class:`Objective` terms. Each iteration zeroes the gradients, lets every term
accumulate its gradient (``term.backward``), steps the optimizer, then lets every term update its
own state (``term.after_step``, e.g. the DKKT multipliers). The loop owns what every such method
needs: a progress bar with the loss terms, the loss curve for the manifest, checkpoints every N
iterations in the task's workdir, exact resume (all randomness of iteration t is derived from
(seed, t) by the terms), and a wall-clock budget that ends the run early with a note instead of
blocking a federation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import ConfigError
from server.methods.registry import DistillTask


class Objective(Protocol):
    """One loss term of a pixel-optimisation method."""

    name: str

    def backward(self, syn: torch.Tensor, iteration: int) -> float:
        """Accumulate this term's gradient into ``syn.grad`` (and its own parameters); return its value."""

    def after_step(self) -> None:
        """Update the term's own state after the image step (no-op for stateless terms)."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume the term exactly."""

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class LoopSettings:
    iterations: int
    checkpoint_every: int = 0
    resume: bool = False
    log_every: int = 10
    time_limit: float = 0.0  # seconds of optimisation before stopping early (0: no limit)

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.log_every < 1 or self.checkpoint_every < 0 or self.time_limit < 0:
            raise ConfigError("iterations, checkpoint_every and time_limit must be >= 0 and log_every >= 1")

    def after(self, spent: float) -> LoopSettings:
        """These settings for the rest of a method that already spent ``spent`` s of its time limit
        (a limit used up leaves one iteration, since 0 would mean no limit)."""
        if not self.time_limit or spent <= 0:
            return self
        return replace(self, time_limit=max(self.time_limit - spent, 1e-9))


def checkpoint_path(workdir: Path | str, label: str) -> Path:
    """Where the loop labelled ``label`` keeps its checkpoint in a task's workdir."""
    return Path(workdir) / f"{label}-checkpoint.pt"


def phases_to_resume(task: DistillTask, labels: list[str], resume: bool) -> dict[str, bool]:
    """For a method that runs several loops (``labels``), which of them continue from their own
    checkpoint on ``resume``. A run stopped before a loop's first checkpoint left none for it: that
    loop begins fresh (the same seed gives the same iterations). With no checkpoint at all,
    ``--resume`` names the fix."""
    found = {label: bool(task.workdir) and checkpoint_path(task.workdir, label).exists() for label in labels}
    if resume and not any(found.values()):
        names = " or ".join(label.upper() for label in labels)
        raise ConfigError(f"--resume: no {names} checkpoint in {task.workdir}; run without --resume to start fresh")
    return {label: resume and there for label, there in found.items()}


def slices_of(counts: dict[int, int]) -> dict[int, slice]:
    """Where each class's synthetic images sit in the concatenated tensor (class order of ``counts``)."""
    slices, start = {}, 0
    for c, n in counts.items():
        slices[c], start = slice(start, start + n), start + n
    return slices


def optimise_pixels(
    task: DistillTask,
    label: str,
    images: torch.Tensor,
    optimizer_factory: Callable[[torch.Tensor], torch.optim.Optimizer],
    terms: list[Objective],
    settings: LoopSettings,
    identity: dict,
    on_iteration: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Run the loop; returns the optimised images (CPU) and the manifest extras."""
    syn = images.to(task.device).clone().requires_grad_(True)
    optimizer = optimizer_factory(syn)
    ckpt_path = checkpoint_path(task.workdir, label) if task.workdir else None
    first, curve, window, seconds = 0, [], [], 0.0
    term_curves: dict[str, list] = {t.name: [] for t in terms}
    term_window: dict[str, list[float]] = {t.name: [] for t in terms}
    if settings.resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise ConfigError(
                f"--resume: no {label.upper()} checkpoint at {ckpt_path}; run without --resume to start fresh"
            )
        state = load_checkpoint(ckpt_path, identity)
        with torch.no_grad():
            syn.copy_(state["images"].to(task.device))
        optimizer.load_state_dict(state["optimizer"])
        for term in terms:
            term.load_state_dict(state["terms"].get(term.name, {}))
        first, curve, window, seconds = state["iteration"], state["loss_curve"], state["window"], state["seconds"]
        term_curves, term_window = state["term_curves"], state["term_window"]

    def checkpoint(iteration: int) -> None:
        if ckpt_path is None:
            return
        save_checkpoint(
            ckpt_path,
            {
                **identity,
                "images": syn.detach().cpu(),
                "optimizer": optimizer.state_dict(),
                "terms": {t.name: t.state_dict() for t in terms},
                "iteration": iteration,
                "loss_curve": curve,
                "window": window,
                "term_curves": term_curves,
                "term_window": term_window,
                "seconds": seconds,
            },
        )

    bar = tqdm(
        range(first, settings.iterations),
        desc=label,
        initial=first,
        total=settings.iterations,
        disable=None if task.progress else True,
        dynamic_ncols=True,
    )
    stopped_early, last = None, first
    for t in bar:
        if settings.time_limit and seconds >= settings.time_limit:
            stopped_early = f"time limit {settings.time_limit:g} s reached after {t} iterations"
            break
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        values = {term.name: term.backward(syn, t) for term in terms}
        optimizer.step()
        for term in terms:
            term.after_step()
        seconds += time.perf_counter() - started
        loss = sum(values.values())
        window.append(loss)
        for name, value in values.items():
            term_window[name].append(value)
        last = t + 1
        if len(window) == settings.log_every:
            curve.append([t + 1, sum(window) / len(window)])
            for name, vals in term_window.items():
                term_curves[name].append([t + 1, sum(vals) / len(vals)])
                term_window[name] = []
            window = []
            bar.set_postfix({name: f"{pts[-1][1]:.4g}" for name, pts in term_curves.items()}, refresh=False)
        if settings.checkpoint_every and (t + 1) % settings.checkpoint_every == 0 and t + 1 < settings.iterations:
            checkpoint(t + 1)
        if not window:  # at a loss-curve point
            task.report_progress(t + 1, settings.iterations, curve[-1][1], label)
        if on_iteration is not None:
            on_iteration(t, loss)
    bar.close()
    if window:
        curve.append([last, sum(window) / len(window)])
        for name, vals in term_window.items():
            term_curves[name].append([last, sum(vals) / len(vals)])
    extra = {
        "loss_curve": curve,
        "iterations": last,
        "seconds_per_iteration": round(seconds / last, 4) if last else 0.0,
        "resumed_from": first if settings.resume else None,
        "iterations_this_run": last - first,
    }
    if len(terms) > 1:
        extra["loss_terms"] = term_curves
    if stopped_early:
        extra["stopped_early"] = stopped_early
    return syn.detach().cpu(), extra
