"""CLI subcommands of the server: ``distill``, ``generate`` and ``allocate``."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from common.commands import add_data_arguments, add_eval_arguments


def _method_from_argv(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--method="):
            return token.split("=", 1)[1]
    return None


def _add_method_options(parser: argparse.ArgumentParser, method: str) -> None:
    """Every field of the method's config dataclass becomes ``--field-name`` (typed)."""
    from server.methods.registry import get_method

    spec = get_method(method)
    group = parser.add_argument_group(f"options of method {method!r}", spec.description)
    for field in dataclasses.fields(spec.config_cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        kind = type(default) if default is not None else str
        if kind is bool:
            group.add_argument(
                flag,
                dest=f"opt_{field.name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"(default {default})",
            )
        else:
            group.add_argument(
                flag,
                dest=f"opt_{field.name}",
                type=kind,
                default=None,
                metavar=kind.__name__.upper(),
                help=f"(default {default})",
            )


def add_allocation_arguments(parser: argparse.ArgumentParser, with_switch: bool = True) -> None:
    """The class-adaptive budget flags, shared by ``distill``, ``generate`` and ``allocate``."""
    from server.methods.allocation import ALLOCATIONS, CRITERIA, AllocationConfig

    group = parser.add_argument_group("class-adaptive images per class (the same total budget, split by diversity)")
    if with_switch:
        group.add_argument("--allocation", choices=ALLOCATIONS, default="fixed", help="per-class counts")
    group.add_argument(
        "--allocation-model",
        default="",
        help="trained model directory to embed with (default: the method's --global-model, else a ConvNet "
        "trained on the visible images)",
    )
    group.add_argument("--allocation-criterion", choices=CRITERIA, default=AllocationConfig.criterion)
    group.add_argument("--allocation-k-max", type=int, default=AllocationConfig.k_max, help="largest k tried")
    group.add_argument(
        "--allocation-min", type=int, default=AllocationConfig.min_per_class, help="images per class at least"
    )


def allocation_config(args: argparse.Namespace, fallback_model: str = ""):
    from server.methods.allocation import AllocationConfig

    return AllocationConfig(
        criterion=args.allocation_criterion,
        k_max=args.allocation_k_max,
        min_per_class=args.allocation_min,
        model=args.allocation_model or fallback_model,
        seed=args.seed,
    )


def distill_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    from server.methods.registry import list_methods

    parser.add_argument("--method", required=True, choices=list_methods(), help="distillation method")
    parser.add_argument("--dataset", default="digits", help="registry name, npz:PATH or imagefolder:PATH")
    parser.add_argument("--ipc", default="10", help="images per class, or ragged 'class:count,...'")
    parser.add_argument("--pipc", default="all", help="real images per class the method may see (int or 'all')")
    parser.add_argument("--out", required=True, help="artifact directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the artifact right after writing it")
    add_allocation_arguments(parser)
    add_data_arguments(parser)
    add_eval_arguments(
        parser,
        quick_help="smoke run: the method's small budgets (where it has a preset) and the 300-epoch protocol",
    )
    method = _method_from_argv(argv)
    if method in list_methods():
        _add_method_options(parser, method)


def distill_main(args: argparse.Namespace) -> int:
    from common.artifacts import save_distilled_set
    from common.datasets import load_dataset
    from common.errors import ArtifactError
    from common.runtime import resolve_device, seed_everything
    from server.methods.registry import distill, get_method, make_task

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite or choose another --out")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    data = load_dataset(args.dataset, data_root=args.data_root, download=args.download)
    task = make_task(
        data,
        args.ipc,
        args.pipc,
        seed=args.seed,
        device=device,
        dataset_spec=args.dataset,
        progress=not args.no_progress,
        workdir=out.with_name(out.name + ".work"),
    )
    options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    if args.quick:  # explicit options win over the preset
        options = {**get_method(args.method).quick, **options}
    if args.allocation == "adaptive":
        from server.methods.allocation import allocate_task, allocation_table

        task, allocation = allocate_task(task, allocation_config(args, str(options.get("global_model", ""))))
        print(allocation_table(allocation, data.info.class_names))
    started = time.perf_counter()
    dset = distill(args.method, task, options)
    dset.manifest["distill_seconds"] = round(time.perf_counter() - started, 2)
    save_distilled_set(out, dset, overwrite=args.overwrite)
    if task.workdir is not None and task.workdir.exists():
        shutil.rmtree(task.workdir)  # checkpoints are only needed until the artifact is safely written
    counts = sorted(set(dset.counts().values()))
    print(
        f"wrote {out}: {len(dset)} images ({args.method}, {data.info.name}, ipc {'/'.join(map(str, counts))}, "
        f"pipc {task.pipc or 'all'}) in {dset.manifest['distill_seconds']:.1f} s"
    )
    if args.evaluate:
        from common.commands import evaluate_main

        eval_args = argparse.Namespace(**{**vars(args), "artifacts": [str(out)], "json": None, "dataset": None})
        return evaluate_main(eval_args)
    return 0


# ------------------------------------------------------------------------------ generate
def generate_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("generator", help="GEN_DIR: the --out of 'distill --method generator' (or its generator/)")
    parser.add_argument("--ipc", default="10", help="images per class, or ragged 'class:count,...'")
    parser.add_argument(
        "--per-class", default=None, help='per-class counts as JSON: a file, or inline like \'{"0": 5, "1": 12}\''
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same images)")
    parser.add_argument("--out", required=True, help="artifact directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the generated set (fixed-set protocol)")
    parser.add_argument(
        "--dim-protocol",
        action="store_true",
        help="with --evaluate, also DiM's protocol: 1000 epochs (or --epochs) of fresh random-label batches of 64, "
        "constant lr, best of 5 tests (reported separately)",
    )
    parser.add_argument("--no-progress", action="store_true")
    add_allocation_arguments(parser)
    add_data_arguments(parser)
    add_eval_arguments(parser)


def read_per_class(text: str, num_classes: int) -> dict[int, int]:
    """Counts from a JSON file or inline JSON: ``{"0": 5, ...}``, ``[5, 12, ...]`` or ``{"counts": {...}}``."""
    import json

    from common.errors import ConfigError
    from common.subsets import parse_counts

    source = Path(text)
    try:
        data = json.loads(source.read_text() if source.is_file() else text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f'--per-class: not JSON ({exc.msg}); give a file or e.g. \'{{"0": 5, "1": 12}}\'') from None
    if isinstance(data, dict) and isinstance(data.get("counts"), dict | list):
        data = data["counts"]
    if isinstance(data, list):
        data = dict(enumerate(data))
    if not isinstance(data, dict):
        raise ConfigError("--per-class: expected a JSON object class -> count, or a list of counts")
    try:
        counts = {int(c): int(n) for c, n in data.items()}
    except (TypeError, ValueError):
        raise ConfigError("--per-class: classes and counts must be integers") from None
    return parse_counts(counts, num_classes)


def generate_main(args: argparse.Namespace) -> int:
    from common.artifacts import DistilledSet, save_distilled_set
    from common.errors import ArtifactError
    from common.runtime import resolve_device
    from common.subsets import parse_counts
    from server.methods.gan import find_generator_dir, load_generator, sample

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite or choose another --out")
    device = resolve_device(args.device)
    generator, info, meta = load_generator(args.generator)
    if args.per_class:
        counts = read_per_class(args.per_class, info.num_classes)
    else:
        counts = parse_counts(args.ipc, info.num_classes)
    allocation = None
    if args.allocation == "adaptive":
        counts, allocation = _generator_allocation(meta, counts, args, device)
    started = time.perf_counter()
    images, labels = sample(generator, counts, args.seed, info, device)
    manifest = {
        "generated_from": str(find_generator_dir(args.generator)),
        "generator_sha256": meta["sha256"],
        "generator_variant": meta.get("variant"),
        "sample_seed": args.seed,
        "pipc": meta.get("pipc"),
        "dataset_spec": meta.get("dataset_spec", info.name),
        "generate_seconds": round(time.perf_counter() - started, 3),
        "allocation": allocation or {"allocation": "fixed"},
    }
    save_distilled_set(out, DistilledSet(images, labels, info, "generator", manifest), overwrite=args.overwrite)
    print(f"wrote {out}: {len(labels)} images from the generator ({info.name}, seed {args.seed})")
    if not args.evaluate:
        return 0
    from common.commands import evaluate_main

    eval_args = argparse.Namespace(**{**vars(args), "artifacts": [str(out)], "json": None, "dataset": None})
    code = evaluate_main(eval_args)
    if args.dim_protocol:
        evaluate_dim_protocol(generator, info, meta, counts, args, out)
    return code


def _generator_allocation(meta: dict, counts: dict[int, int], args: argparse.Namespace, device):
    """Class-adaptive counts for a generator: measured on the real images its training saw."""
    from common.datasets import load_dataset
    from server.methods.allocation import allocate_task, allocation_table
    from server.methods.registry import make_task

    data = load_dataset(meta.get("dataset_spec", ""), data_root=args.data_root, download=args.download)
    task = make_task(data, counts, meta.get("pipc"), seed=int(meta.get("seed", 0)), device=device)
    task, allocation = allocate_task(task, allocation_config(args))
    print(allocation_table(allocation, data.info.class_names))
    return task.counts, task.allocation


def evaluate_dim_protocol(generator, info, meta, counts, args, out: Path) -> list[dict]:
    """DiM's protocol (fresh samples every epoch, best test epoch), recorded apart from the default."""
    from dataclasses import replace

    from common.artifacts import update_manifest
    from common.datasets import load_dataset
    from common.evaluation import DIM_PROTOCOL, evaluate_resampled
    from server.methods.gan import GeneratorSampler

    data = load_dataset(meta.get("dataset_spec") or info.name, data_root=args.data_root, download=args.download)
    sampler = GeneratorSampler.for_dim_protocol(generator, info, counts, args.seed)
    per_epoch = sampler.random_labels
    protocol = replace(DIM_PROTOCOL, epochs=args.epochs or DIM_PROTOCOL.epochs)
    results = []
    for arch in [a.strip() for a in args.models.split(",") if a.strip()]:
        result = evaluate_resampled(
            sampler,
            data.test,
            info,
            arch=arch,
            runs=args.runs,
            config=protocol,
            seed=args.seed,
            device=args.device,
            workers=args.workers,
            progress=not args.no_progress,
        )
        print(f"DiM protocol ({per_epoch} fresh random-label samples per epoch, best of 5 tests) {result}")
        results.append(result.to_dict())
    update_manifest(out, evaluation_dim_protocol={r["arch"]: r for r in results})
    return results


# ------------------------------------------------------------------------------ allocate
def allocate_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("--dataset", default="digits", help="registry name, npz:PATH or imagefolder:PATH")
    parser.add_argument("--ipc", type=int, default=10, help="images per class: the budget is ipc x classes")
    parser.add_argument("--pipc", default="all", help="real images per class to measure (int or 'all')")
    parser.add_argument("--model", dest="allocation_model", default="", help="trained model directory to embed with")
    parser.add_argument("--out", default="", help="directory for allocation.json and embedding.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    add_allocation_arguments(parser, with_switch=False)
    add_data_arguments(parser)


def allocate_main(args: argparse.Namespace) -> int:
    from common.datasets import load_dataset
    from common.fileio import atomic_write_json
    from common.runtime import resolve_device, seed_everything
    from server.methods.allocation import (
        allocation_of_features,
        allocation_table,
        class_embeddings,
        save_embedding_picture,
    )
    from server.methods.registry import make_task

    if args.ipc < 1:
        from common.errors import ConfigError

        raise ConfigError(f"--ipc {args.ipc}: use a positive integer")
    seed_everything(args.seed)
    data = load_dataset(args.dataset, data_root=args.data_root, download=args.download)
    task = make_task(data, args.ipc, args.pipc, seed=args.seed, device=resolve_device(args.device))
    config = allocation_config(args)
    features, description = class_embeddings(task, config)
    allocation = allocation_of_features(task, features, config, description)
    print(allocation_table(allocation, data.info.class_names))
    print(
        f"budget {sum(allocation.counts.values())} = ipc {args.ipc} x {data.info.num_classes} classes; "
        f"criterion {config.criterion}; embedded with {description}"
    )
    if args.out:
        out = Path(args.out)
        record = {"dataset": args.dataset, "ipc": args.ipc, "pipc": task.pipc, "seed": args.seed}
        record.update(allocation.to_dict())
        atomic_write_json(out / "allocation.json", record)
        save_embedding_picture(
            out / "embedding.png",
            features,
            task.real.labels.numpy(),
            allocation.chosen_k,
            args.seed,
            title=f"{data.info.name}: class embeddings (colour: class, marker: K-means cluster)",
        )
        print(f"wrote {out / 'allocation.json'} (use it with 'generate --per-class') and {out / 'embedding.png'}")
    return 0
