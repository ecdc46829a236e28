"""CLI subcommands of the server: ``distill``."""

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
    from server.registry import get_method

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


def distill_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    from server.registry import list_methods

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
    add_data_arguments(parser)
    add_eval_arguments(parser)
    method = _method_from_argv(argv)
    if method in list_methods():
        _add_method_options(parser, method)


def distill_main(args: argparse.Namespace) -> int:
    from common.artifacts import save_distilled_set
    from common.datasets import load_dataset
    from common.errors import ArtifactError
    from common.runtime import resolve_device, seed_everything
    from server.registry import distill, make_task

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
