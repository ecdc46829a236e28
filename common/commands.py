"""CLI subcommands that need only the shared library: ``datasets`` and ``evaluate``."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from common.report import format_accuracy, markdown_table


def named_lists(text: str, flag: str) -> list[tuple[str, str]]:
    """``'a: x=1,y=2 | b: x=3'`` -> [("a", "x=1,y=2"), ("b", "x=3")], the syntax of the benchmarks'
    named recipe lists (``--candidates``, ``--extra-variants``); a nameless item exits naming ``flag``."""
    items = []
    for part in filter(None, (p.strip() for p in text.split("|"))):
        name, sep, body = part.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"{flag} item {part!r}: use NAME: OPTION=VALUE,...")
        items.append((name.strip(), body))
    return items


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-root",
        default=None,
        help="where dataset files are (default: $EDGEDISTILL_DATA, else the user cache dir)",
    )
    parser.add_argument("--download", action="store_true", help="let torchvision download missing files")


def add_eval_arguments(
    parser: argparse.ArgumentParser, quick_help: str = "300 epochs instead of the paper's 1000"
) -> None:
    parser.add_argument("--models", default="convnet3", help="comma-separated architectures (default convnet3)")
    parser.add_argument("--runs", type=int, default=5, help="fresh networks per architecture (default 5)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--no-eval-dsa", action="store_true", help="train evaluation networks without DSA")
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel runs (default: one per CPU core on CPU, 1 on CUDA)"
    )


def eval_config_from_args(args: argparse.Namespace):
    from common.evaluation import PRESETS

    config = PRESETS["quick" if args.quick else "paper"]
    if args.epochs:
        config = replace(config, epochs=args.epochs)
    if getattr(args, "no_eval_dsa", False):
        config = replace(config, dsa=False)
    return config


# ------------------------------------------------------------------------------ datasets
def datasets_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("--data-root", default=None, help="where to look (default: $EDGEDISTILL_DATA or cache)")


def datasets_main(args: argparse.Namespace) -> int:
    from common.datasets import dataset_availability, resolve_data_roots

    roots = resolve_data_roots(args.data_root)
    rows = [
        (name, "yes" if where else "no", where or "-", text)
        for name, where, text in dataset_availability(args.data_root)
    ]
    print(f"data root: {roots.root}   cache: {roots.cache}\n")
    print(markdown_table(["dataset", "local", "where", "description"], rows))
    print("\nalso: npz:PATH (x_train, y_train, x_test, y_test) and imagefolder:PATH (train/ and val/ class folders)")
    return 0


# ------------------------------------------------------------------------------ evaluate
def evaluate_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("artifacts", nargs="+", help="artifact directories written by 'edgedistill distill'")
    add_eval_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--dataset", default=None, help="test split to use (default: the artifact's dataset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--json", default=None, help="write results here (default: ARTIFACT/eval.json)")
    parser.add_argument("--no-progress", action="store_true")


def evaluate_artifact(path: str | Path, args: argparse.Namespace, dataset_cache: dict) -> list[dict]:
    """Evaluate one artifact for every requested model; records the results in its manifest."""
    from common.artifacts import load_distilled_set, read_manifest
    from common.datasets import load_dataset
    from common.evaluation import evaluate_recorded

    manifest = read_manifest(path)
    spec = args.dataset or manifest.get("dataset_spec") or manifest["dataset"]["name"]
    if spec not in dataset_cache:
        dataset_cache[spec] = load_dataset(spec, data_root=args.data_root, download=args.download)
    data = dataset_cache[spec]
    dset = load_distilled_set(path, expect=data.info)
    config = eval_config_from_args(args)
    results = []
    for arch in [m.strip() for m in args.models.split(",") if m.strip()]:
        result = evaluate_recorded(
            path,
            dset.images,
            dset.labels,
            data.test,
            data.info,
            arch=arch,
            runs=args.runs,
            config=config,
            seed=args.seed,
            device=args.device,
            workers=args.workers,
            progress=not args.no_progress,
        )
        print(f"  {path}: {result}", flush=True)
        results.append({"artifact": str(path), "method": dset.method, "images": len(dset), **result.to_dict()})
    return results


def evaluate_main(args: argparse.Namespace) -> int:
    from common.fileio import atomic_write_json

    cache: dict = {}
    results = []
    for path in args.artifacts:
        results += evaluate_artifact(path, args, cache)
    rows = [
        (r["artifact"], r["method"], r["images"], r["arch"], format_accuracy(r["mean"], r["std"]), r["runs"])
        for r in results
    ]
    print()
    print(markdown_table(["artifact", "method", "images", "model", "test accuracy %", "runs"], rows))
    out = Path(args.json) if args.json else Path(args.artifacts[0]) / "eval.json"
    atomic_write_json(out, {"results": results})
    print(f"\nwrote {out}")
    return 0


# ------------------------------------------------------------------------------ train
def train_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("--dataset", default="digits", help="registry name, npz:PATH or imagefolder:PATH")
    parser.add_argument("--model", default="convnet3", help="registry architecture")
    parser.add_argument("--pipc", default="all", help="train only on the public subset of K images per class")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="coupled L2 (recorded for DKKT)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", required=True, help="model directory to write (model.safetensors + model.json)")
    parser.add_argument("--overwrite", action="store_true")
    add_data_arguments(parser)


def train_main(args: argparse.Namespace) -> int:
    """Train a model centrally and save it where DKKT methods take it (``--global-model DIR``)."""
    import torch

    from common.datasets import load_dataset
    from common.errors import ArtifactError
    from common.modelio import save_model
    from common.models import build_model
    from common.runtime import derive_seed, resolve_device
    from common.subsets import parse_pipc, public_subset_indices
    from common.training import LocalTrainConfig, evaluate_model, train_central_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite or choose another --out")
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, data_root=args.data_root, download=args.download)
    info = data.info
    indices = public_subset_indices(data.train.labels, info.num_classes, parse_pipc(args.pipc), args.seed)
    train = data.train.subset(indices)
    torch.manual_seed(derive_seed("train-init", args.seed))
    model = build_model(args.model, info.channels, info.num_classes, info.image_size)
    config = LocalTrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
    )
    stats = train_central_model(model, train.images, train.labels, config, seed=args.seed, device=device)
    _, accuracy = evaluate_model(model, data.test.images, data.test.labels, device=device)
    meta = {
        "weight_decay": args.weight_decay,
        "optimizer": args.optimizer,
        "dataset_spec": args.dataset,
        "epochs": args.epochs,
        "train_images": len(train),
        "test_accuracy": accuracy,
        **stats,
    }
    digest = save_model(out, model.cpu(), info, meta, overwrite=args.overwrite)
    print(f"wrote {out}: {args.model} on {len(train)} {info.name} images, test accuracy {100 * accuracy:.2f} %")
    print(f"  sha256 {digest[:16]}...  use it with: edgedistill distill --method dsv --global-model {out} ...")
    return 0
