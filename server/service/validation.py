"""Checks a job request before it is queued, so that a bad request costs nothing and a queued job can run.

One function, :func:`validate_request`, turns a submitted request (a plain dict, the fields of
``SubmitJobRequest``) into the normalised request the job table stores, or raises
:class:`RequestError` with the gRPC status the service answers and a message a person can act
on. The CLI's own checks (``parse_counts``, ``public_subset_indices``, ``make_config``) are the
ones used here, so the CLI and the service refuse the same things with the same words.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

from common.errors import EdgeDistillError

INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED = (
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
)
# options the service sets itself: the model comes from the request's global_model, resume from the job's state
SERVICE_OWNED_OPTIONS = ("global_model", "resume")
MAX_OPTIONS = 64
MAX_EVAL_RUNS = 5  # quick evaluations after distilling: each trains a fresh network on the worker
MAX_TEXT = 256


class RequestError(EdgeDistillError):
    """A request the service refuses; ``code`` names the gRPC status (``INVALID_ARGUMENT`` ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
    """What validation needs to know about a dataset the server holds."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    smallest_class: int  # training images of the smallest class: the largest pipc


@lru_cache(maxsize=16)
def dataset_facts(name: str, data_root: str) -> DatasetFacts:
    """Loads the dataset once per process; validation of later requests reads only this."""
    import torch

    from common.datasets import load_dataset

    data = load_dataset(name, data_root=data_root or None)
    sizes = torch.bincount(data.train.labels, minlength=data.info.num_classes)
    info = data.info
    return DatasetFacts(info.name, info.channels, info.image_size, info.num_classes, int(sizes.min()))


def warm_dataset_facts(data_root: str) -> list[str]:
    """Learn the facts of every dataset the server holds (at start, off the request path); returns their names."""
    from common.datasets import dataset_availability

    ready = []
    for name, where, _ in dataset_availability(data_root or None):
        if where is None:
            continue
        try:
            dataset_facts(name, data_root)
            ready.append(name)
        except EdgeDistillError:
            continue  # validation answers for it with the loader's message
    return ready


def validate_request(request: dict, data_root: str, models_dir: Path) -> dict:
    """The normalised request to queue; :class:`RequestError` if the service must refuse it."""
    from common.datasets import list_datasets
    from server.methods.registry import coerce_option, list_methods, make_config, option_names

    method = _text(request, "method")
    if method not in list_methods():
        raise RequestError(INVALID_ARGUMENT, f"unknown method {method!r}; choose one of {', '.join(list_methods())}")
    dataset = _text(request, "dataset")
    known = [d for d in list_datasets() if ":" not in d]
    if dataset not in known:
        raise RequestError(
            INVALID_ARGUMENT,
            f"unknown dataset {dataset!r}; this server serves {', '.join(known)} (paths on the server are not "
            "accepted from clients)",
        )
    try:
        facts = dataset_facts(dataset, data_root)
    except EdgeDistillError as exc:
        raise RequestError(FAILED_PRECONDITION, f"dataset {dataset!r} is not available on this server: {exc}") from None
    counts = _counts(request, facts.num_classes)
    pipc = int(request.get("pipc") or 0)
    if pipc < 0:
        raise RequestError(INVALID_ARGUMENT, "pipc must be > 0, or 0 for all the server's training images")
    if pipc > facts.smallest_class:
        raise RequestError(
            FAILED_PRECONDITION,
            f"pipc {pipc} is more than this server holds for the smallest class of {dataset} "
            f"({facts.smallest_class} images); use at most {facts.smallest_class}, or 0 for all",
        )
    raw_options = dict(request.get("options") or {})
    if len(raw_options) > MAX_OPTIONS:
        raise RequestError(INVALID_ARGUMENT, f"{len(raw_options)} options; a request takes at most {MAX_OPTIONS}")
    if owned := sorted(set(raw_options) & set(SERVICE_OWNED_OPTIONS)):
        raise RequestError(
            INVALID_ARGUMENT,
            f"option {', '.join(owned)} is set by the service; pass the model as global_model (an UploadModel id)",
        )
    try:
        options = {key: coerce_option(method, key, str(value)) for key, value in raw_options.items()}
    except EdgeDistillError as exc:
        raise RequestError(INVALID_ARGUMENT, str(exc)) from None
    model_id = _text(request, "global_model", required=False)
    if model_id:
        if "global_model" not in option_names(method):
            raise RequestError(INVALID_ARGUMENT, f"method {method!r} takes no global model; leave global_model empty")
        options["global_model"] = str(check_model(models_dir, model_id, facts))
    try:
        config = make_config(method, options)  # the method's own range checks ...
        if callable(getattr(config, "check", None)):
            config.check(method)  # ... and what it needs at run time (a global model for DKKT)
    except EdgeDistillError as exc:
        raise RequestError(INVALID_ARGUMENT, str(exc).replace("--global-model DIR", "global_model")) from None
    eval_runs = int(request.get("eval_runs") or 0)
    if not 0 <= eval_runs <= MAX_EVAL_RUNS:
        raise RequestError(
            INVALID_ARGUMENT, f"eval_runs {eval_runs}: use 0 (no evaluation) to {MAX_EVAL_RUNS} fresh networks"
        )
    return {
        "method": method,
        "dataset": dataset,
        "global_model": model_id,
        "counts": {str(c): n for c, n in counts.items()},
        "pipc": pipc,
        "options": {key: str(value) for key, value in raw_options.items()},
        "seed": int(request.get("seed") or 0),
        "priority": int(request.get("priority") or 0),
        "label": _text(request, "label", required=False),
        "eval_runs": eval_runs,
    }


def check_model(models_dir: Path, model_id: str, facts: DatasetFacts) -> Path:
    """The uploaded model's directory, after checking it fits the dataset's shape and classes."""
    import json

    if not model_id.isalnum() or len(model_id) > 64:
        raise RequestError(
            INVALID_ARGUMENT, f"global_model {model_id[:70]!r} is not a model id (UploadModel returns one)"
        )
    path = models_dir / model_id
    try:
        meta = json.loads((path / "model.json").read_text())
    except FileNotFoundError:
        raise RequestError(
            NOT_FOUND, f"no uploaded model {model_id!r}; upload it first (jobs submit --global-model DIR)"
        ) from None
    info = meta["dataset"]
    theirs = (info["channels"], info["image_size"], info["num_classes"])
    mine = (facts.channels, facts.image_size, facts.num_classes)
    if theirs != mine:
        raise RequestError(
            FAILED_PRECONDITION,
            f"model {model_id} expects (channels, size, classes) {theirs} but {facts.name} has {mine}; "
            "upload a model trained on this dataset",
        )
    return path


def _text(request: dict, key: str, required: bool = True) -> str:
    value = str(request.get(key) or "")
    if required and not value:
        raise RequestError(INVALID_ARGUMENT, f"{key} is required")
    if len(value) > MAX_TEXT:
        raise RequestError(INVALID_ARGUMENT, f"{key} is {len(value)} characters; at most {MAX_TEXT}")
    return value


def _counts(request: dict, num_classes: int) -> dict[int, int]:
    from common.subsets import parse_counts

    class_counts = request.get("class_counts") or {}
    ipc = int(request.get("ipc") or 0)
    if not class_counts and ipc <= 0:
        raise RequestError(INVALID_ARGUMENT, f"ipc must be > 0 (got {ipc}), or give class_counts")
    try:
        return parse_counts({int(c): int(n) for c, n in class_counts.items()} if class_counts else ipc, num_classes)
    except EdgeDistillError as exc:
        raise RequestError(INVALID_ARGUMENT, str(exc).replace("--ipc", "class_counts")) from None
