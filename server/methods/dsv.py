"""Methods built on the DKKT loss: ``dsv``, ``dm+dkkt`` and ``dsv-dm-avg``.

- ``dsv``: Deep Support Vectors, DKKT only. Images start from the public subset, noise, or
  images of another dataset (``--init dataset:fashion-mnist``), optimised by Adam.
- ``dm+dkkt``: the practical setting of the seed paper, L = L_DM + w_kkt * L_DKKT, images
  initialised from the public subset, optimised like DM. ``w_kkt = 0`` is exactly ``dm``.
- ``dsv-dm-avg``: the published averaging variant: one DM run and one DSV run from the same
  initial images, averaged slot by slot.

All take ``--global-model DIR`` (the federated server's global model or any saved model).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from common.datasets import load_dataset
from common.errors import ConfigError
from common.runtime import derive_seed, make_generator
from server.methods.dkkt import DKKTLoss, DKKTOptions, WeightSchedule
from server.methods.dm import DMConfig, DMLoss, dm_optimizer, initial_images, job_identity, loop_settings, run_dm
from server.methods.pixel_loop import optimise_pixels, phases_to_resume
from server.methods.recipes import apply_recipe, check_recipe
from server.methods.registry import DistillTask, MethodOutput, register_method


@dataclass(frozen=True)
class DSVConfig(DKKTOptions):
    iterations: int = 1000
    lr_img: float = 0.01  # Adam
    init: str = "real"  # real (public subset) | noise | dataset:SPEC (images of another dataset)
    checkpoint_every: int = 500
    resume: bool = False
    log_every: int = 10
    time_limit: float = 0.0

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.lr_img <= 0:
            raise ConfigError("dsv needs iterations >= 0 and lr_img > 0")
        if self.init not in ("real", "noise") and not self.init.startswith("dataset:"):
            raise ConfigError(f"dsv init {self.init!r}: use real, noise or dataset:NAME")


@dataclass(frozen=True)
class DMDKKTConfig(DMConfig, DKKTOptions):
    w_kkt: float = 1.0  # weight of L_DKKT against L_DM (0: plain DM)
    w_kkt_schedule: str = "constant"  # constant | warmup | decay (ours, for the ablation)
    w_kkt_ramp: float = 0.5  # share of the iterations the warm-up / decay ramp spans
    init_dsv_iterations: int = 0  # > 0: start from a DSV run (Adam, init_dsv_lr) on the public init (ours)
    init_dsv_lr: float = 0.01
    recipe: str = "validated"  # validated: the dataset's validated DKKT settings under these options | published

    def __post_init__(self) -> None:
        super().__post_init__()
        check_recipe(self.recipe)
        if self.w_kkt < 0 or self.init_dsv_iterations < 0 or self.init_dsv_lr <= 0:
            raise ConfigError("w_kkt and init_dsv_iterations must be >= 0 and init_dsv_lr > 0")
        self.weight_schedule()  # checks the schedule's name and ramp

    def weight_schedule(self) -> WeightSchedule:
        return WeightSchedule(self.w_kkt, self.w_kkt_schedule, self.w_kkt_ramp, self.iterations)


@dataclass(frozen=True)
class DSVDMAvgConfig(DMConfig, DKKTOptions):
    dsv_iterations: int = 1000
    dsv_lr: float = 0.01


def _pick(config, cls, **overrides):
    """The fields of ``cls`` taken from ``config`` (a config that inherits them)."""
    return cls(**{**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}, **overrides})


def images_from_dataset(spec: str, task: DistillTask) -> torch.Tensor:
    """Random training images of another dataset, resized and channel-matched to this one."""
    other = load_dataset(spec)
    total = sum(task.counts.values())
    g = make_generator(derive_seed("dsv-init-other", task.seed))
    x = other.train.images[torch.randperm(len(other.train), generator=g)[:total]]
    if len(x) < total:
        x = x[torch.arange(total) % len(x)]
    channels = task.info.channels
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    size = task.info.image_size
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous()


def dsv_initial_images(task: DistillTask, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    if init.startswith("dataset:"):
        _, labels = initial_images(task, "noise")
        return images_from_dataset(init.split(":", 1)[1], task), labels
    return initial_images(task, init)


def run_dsv(task: DistillTask, config: DSVConfig, images=None, labels=None, on_iteration=None) -> MethodOutput:
    config.check("dsv")
    if images is None:
        images, labels = dsv_initial_images(task, config.init)
    objective = DKKTLoss(task, config, labels)
    syn, extra = optimise_pixels(
        task,
        "dsv",
        images,
        lambda syn: torch.optim.Adam([syn], lr=config.lr_img),
        [objective],
        loop_settings(config),
        job_identity("dsv", task, config),
        on_iteration,
    )
    return MethodOutput(syn, labels, {**extra, **objective.summary()})


@register_method("dsv", DSVConfig, "Deep Support Vectors: images that satisfy the global model's KKT conditions")
def distill_dsv(task: DistillTask, config: DSVConfig) -> MethodOutput:
    return run_dsv(task, config)


def dsv_start(
    task: DistillTask, config: DMDKKTConfig, resume: dict[str, bool]
) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """dm+dkkt's initial images: the public init, or (``init_dsv_iterations``) a DSV run from it."""
    images, labels = initial_images(task, config.init)
    if not config.init_dsv_iterations:
        return images, labels, None
    if resume["dm+dkkt"]:
        return images, labels, {"skipped": "resumed: the images come from the dm+dkkt checkpoint"}
    dsv = _pick(
        config,
        DSVConfig,
        iterations=config.init_dsv_iterations,
        lr_img=config.init_dsv_lr,
        init="real",
        resume=resume["dsv"],
    )
    out = run_dsv(task, dsv, images, labels)
    return out.images, labels, {k: v for k, v in out.extra.items() if k != "loss_curve"}


def dsv_seconds(summary: dict | None) -> float:
    """Seconds a DSV start spent optimising in this run (0 when none ran): they count against
    dm+dkkt's ``time_limit``, which bounds the whole method."""
    if not summary:
        return 0.0
    return float(summary.get("seconds_per_iteration") or 0.0) * int(summary.get("iterations_this_run") or 0)


def run_dm_dkkt(task: DistillTask, config: DMDKKTConfig, on_iteration=None) -> MethodOutput:
    config.check("dm+dkkt")
    # stopped during its DSV start (or before its own first checkpoint), only the start's checkpoint is there
    resume = phases_to_resume(task, ["dsv", "dm+dkkt"] if config.init_dsv_iterations else ["dm+dkkt"], config.resume)
    images, labels, dsv_summary = dsv_start(task, config, resume)
    dm = DMLoss(task, config)
    terms = [dm]
    dkkt = None
    if config.w_kkt > 0:
        dkkt = DKKTLoss(task, config, labels, weight=config.weight_schedule())
        terms.append(dkkt)
    syn, extra = optimise_pixels(
        task,
        "dm+dkkt",
        images,
        dm_optimizer(config),
        terms,
        replace(loop_settings(config), resume=resume["dm+dkkt"]).after(dsv_seconds(dsv_summary)),
        job_identity("dm+dkkt", task, config),
        on_iteration,
    )
    extra["real_images_used_this_run"] = int(dm.used.sum())
    if dkkt is not None:
        extra.update(dkkt.summary())
    if dsv_summary is not None:
        extra["dsv_init"] = dsv_summary
    return MethodOutput(syn, labels, extra)


@register_method(
    "dm+dkkt",
    DMDKKTConfig,
    "DM on the public subset plus w_kkt x DKKT against the global model",
    presets=apply_recipe,
)
def distill_dm_dkkt(task: DistillTask, config: DMDKKTConfig) -> MethodOutput:
    return run_dm_dkkt(task, config)


def averaged_runs(config: DSVDMAvgConfig) -> tuple[DMConfig, DSVConfig]:
    """The DM run and the DSV run that ``dsv-dm-avg`` averages. With the DM init ``real`` they are
    exactly the ``dm`` and ``dsv`` methods at these configs (tested), so a caller that ran both may
    average their sets instead of running them again."""
    dsv = _pick(config, DSVConfig, iterations=config.dsv_iterations, lr_img=config.dsv_lr, init="real")
    return _pick(config, DMConfig), dsv


@register_method("dsv-dm-avg", DSVDMAvgConfig, "Average of a DSV image and a DM image per slot (published variant)")
def distill_dsv_dm_avg(task: DistillTask, config: DSVDMAvgConfig) -> MethodOutput:
    config.check("dsv-dm-avg")
    dm, dsv = averaged_runs(config)
    resume = phases_to_resume(task, ["dm", "dsv"], config.resume)  # stopped in its DSV run, DM's is there alone
    dm, dsv = replace(dm, resume=resume["dm"]), replace(dsv, resume=resume["dsv"])
    dm_out = run_dm(task, dm)
    images, labels = initial_images(task, config.init)
    dsv_out = run_dsv(task, dsv, images, labels)
    extra = {
        "dm": {k: v for k, v in dm_out.extra.items() if k != "loss_curve"},
        "dsv": {k: v for k, v in dsv_out.extra.items() if k != "loss_curve"},
        "loss_curve": dm_out.extra["loss_curve"],
        "dsv_loss_curve": dsv_out.extra["loss_curve"],
    }
    return MethodOutput((dm_out.images + dsv_out.images) / 2, labels, extra)
