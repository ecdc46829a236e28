"""The method registry: one name -> one distillation entry point.

The CLI, the Flower ServerApp and the gRPC job service all go through :func:`distill` (or
``get_method(name)``), so no caller branches on method names. A method is a function
``run(task: DistillTask, config) -> MethodOutput`` plus a dataclass of its options, registered
with ``@register_method(name, ConfigClass)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.artifacts import DistilledSet
from common.checkpoint import identity_options
from common.config import from_text
from common.datasets import Dataset, DatasetInfo, Split
from common.errors import Cancelled, ConfigError
from common.registry import Registry
from common.subsets import parse_counts, parse_pipc, public_subset_indices


@dataclass
class DistillTask:
    """Everything a method may use: the real data it may see and the per-class budget."""

    info: DatasetInfo
    real: Split  # the images the method may see (public subset, or all training data)
    real_indices: torch.Tensor  # positions of ``real`` in the training split
    counts: dict[int, int]  # images per class to produce
    pipc: int | None = None  # public images per class the method may see (None: all)
    dataset_spec: str = ""  # the name ``load_dataset`` takes (e.g. ``mnist``, ``npz:/data/x.npz``)
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    workdir: Path | None = None  # where a method may keep checkpoints
    allocation: dict[str, Any] | None = None  # how class-adaptive counts were chosen (None: fixed ipc)
    # called as (iteration, iterations, loss) at every loss-curve point; returning False cancels the run
    on_progress: Callable[[int, int, float], bool | None] | None = None

    def real_of_class(self, c: int) -> torch.Tensor:
        return torch.nonzero(self.real.labels == c, as_tuple=True)[0]

    def report_progress(self, done: int, total: int, loss: float, what: str, unit: str = "iterations") -> None:
        """Call ``on_progress`` (if any); its False cancels the run with :class:`Cancelled`."""
        if self.on_progress is not None and self.on_progress(done, total, loss) is False:
            raise Cancelled(f"{what} cancelled after {done} of {total} {unit}")


def job_identity(
    method: str, task: DistillTask, config: Any, ignore: tuple[str, ...], with_counts: bool = True
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the method, its options, the data, the seed
    (and the per-class counts for methods whose state depends on them)."""
    identity = {
        "method": method,
        "options": identity_options(config, ignore),
        "seed": task.seed,
        "dataset": task.dataset_spec,
        "real_indices_sum": int(task.real_indices.sum()),
        "real_count": int(len(task.real_indices)),
    }
    if with_counts:
        identity["counts"] = {int(c): int(n) for c, n in task.counts.items()}
    return identity


@dataclass
class MethodOutput:
    images: torch.Tensor
    labels: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)  # goes into the manifest
    # extra files of the artifact: name -> writer(path) (e.g. the generator method's network)
    attachments: dict[str, Callable[[Path], None]] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    run: Callable[[DistillTask, Any], MethodOutput]
    config_cls: type
    description: str
    quick: dict[str, Any] = field(default_factory=dict)  # option overrides of the --quick smoke preset
    # (task, caller's options) -> (options with task-specific defaults under them, manifest record)
    presets: Callable[[DistillTask, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(
    name: str,
    config_cls: type,
    description: str = "",
    quick: dict[str, Any] | None = None,
    presets: Callable[[DistillTask, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None,
):
    """Decorator registering ``run(task, config) -> MethodOutput`` under ``name``.

    ``quick`` holds the option overrides of the method's smoke-run preset (``distill --quick``);
    ``presets`` puts task-specific defaults under the caller's options (e.g. a dataset's validated recipe).
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError("a method's config must be a dataclass")

    def decorator(run: Callable[[DistillTask, Any], MethodOutput]):
        doc = description or (run.__doc__ or "").strip().splitlines()[0]
        METHODS.register(name)(MethodSpec(name, run, config_cls, doc, dict(quick or {}), presets))
        return run

    return decorator


def get_method(name: str) -> MethodSpec:
    return METHODS.get(name)


def list_methods() -> list[str]:
    return METHODS.names()


def option_names(name: str) -> set[str]:
    """The options method ``name`` takes (the fields of its config dataclass)."""
    return {f.name for f in dataclasses.fields(get_method(name).config_cls)}


def make_config(name: str, options: dict[str, Any] | None = None) -> Any:
    """Build a method's config from a dict, refusing unknown keys with the list of known ones."""
    spec = get_method(name)
    options = dict(options or {})
    known = option_names(name)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"method {name!r} has no option {', '.join(unknown)}; its options are: {', '.join(sorted(known)) or 'none'}"
        )
    return spec.config_cls(**options)


def coerce_option(name: str, option: str, value: Any) -> Any:
    """A method option from text (a flag, a run-config string) to the type of its default."""
    fields = {f.name: f for f in dataclasses.fields(get_method(name).config_cls)}
    if option not in fields:
        raise ConfigError(f"method {name!r} has no option {option!r}; its options are: {', '.join(fields)}")
    kind = type(fields[option].default)
    if not isinstance(value, str) or kind is str:
        return value
    try:
        return from_text(kind, value)
    except ValueError:
        raise ConfigError(f"option {option!r} of {name!r} needs a {kind.__name__}, got {value!r}") from None


def parse_options(name: str, text: str) -> dict[str, Any]:
    """``"w_kkt=10,lambda_init=0"`` -> typed options of method ``name`` (dashes or underscores)."""
    options = {}
    for item in filter(None, (part.strip() for part in text.replace(";", ",").split(","))):
        if "=" not in item:
            raise ConfigError(f"method option {item!r}: use NAME=VALUE, e.g. iterations=200")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        options[key] = coerce_option(name, key, value.strip())
    return options


def make_task(
    dataset: Dataset,
    ipc: int | str | dict[int, int],
    pipc: int | str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dataset_spec: str = "",
    progress: bool = True,
    workdir: Path | None = None,
) -> DistillTask:
    """The task for a dataset: per-class counts from ``ipc``, real data restricted to ``pipc``."""
    info = dataset.info
    pipc_value = parse_pipc(pipc)
    indices = public_subset_indices(dataset.train.labels, info.num_classes, pipc_value, seed)
    return DistillTask(
        info=info,
        real=dataset.train.subset(indices),
        real_indices=indices,
        counts=parse_counts(ipc, info.num_classes),
        pipc=pipc_value,
        dataset_spec=dataset_spec or info.name,
        seed=seed,
        device=torch.device(device),
        progress=progress,
        workdir=workdir,
    )


def distill(name: str, task: DistillTask, options: dict[str, Any] | Any = None) -> DistilledSet:
    """Run method ``name`` on ``task``; returns an unsaved :class:`DistilledSet`."""
    spec = get_method(name)
    preset = None
    if isinstance(options, spec.config_cls):
        config = options
    else:
        options = dict(options or {})
        if spec.presets is not None:
            options, preset = spec.presets(task, options)
        config = make_config(name, options)
    out = spec.run(task, config)
    produced = {c: int((out.labels == c).sum()) for c in range(task.info.num_classes)}
    if produced != task.counts:
        raise AssertionError(f"method {name} produced {produced}, expected {task.counts}")
    manifest = {
        "options": dataclasses.asdict(config),
        "seed": task.seed,
        "dataset_spec": task.dataset_spec or task.info.name,
        "pipc": task.pipc,
        "real_images_seen": int(len(task.real)),
        "allocation": task.allocation or {"allocation": "fixed"},
        **({"recipe": preset} if preset is not None else {}),
        **out.extra,
    }
    return DistilledSet(
        out.images.detach().cpu().float().contiguous(),
        out.labels.detach().cpu().long(),
        task.info,
        name,
        manifest,
        attachments=out.attachments,
    )
