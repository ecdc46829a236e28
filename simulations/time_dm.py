"""Seconds per DM and DM+DKKT iteration, side by side with the DM reference code in one run.

    python -m simulations.time_dm --dataset mnist --data-root ../shared/data --reference DIR

``DIR`` is a checkout of VICO-UoE/DatasetCondensation, which is not part of this project: its
``main_DM.py`` runs in a subprocess (unmodified but for a ``.view`` -> ``.reshape`` shim newer
torch needs, see :data:`REFERENCE_SHIM`; no evaluation, one experiment, ``--Iteration``
iterations, a private copy of the dataset files), and its seconds per iteration come from the
arrival times of the ``iter = `` lines it prints every 10 iterations. This project's DM runs in
this process with the same threads, ipc and real batch, before and after the reference, and the
table reports every ratio to the reference's time. A second table times DM against DM+DKKT at
``--kkt-pipc`` public images per class (a random ConvNet-3 stands in for the global model: the
cost does not depend on its weights). Writes ``timing.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.datasets import load_dataset
from common.fileio import atomic_write_json
from common.modelio import save_model
from common.models import build_model
from common.report import markdown_table
from common.runtime import peak_memory_mib, resolve_device
from server.methods.dkkt import DKKTLoss
from server.methods.dm import DMConfig, DMLoss, initial_images
from server.methods.dsv import DMDKKTConfig
from server.methods.registry import make_task

REFERENCE_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# Runs the reference's main_DM.py as its own __main__, with one compatibility change: its
# ConvNet.embed flattens with .view, which torch >= 2.x refuses on the strided tensors its own
# augmentation returns; .reshape gives the same values (copying only when it must).
REFERENCE_SHIM = """
import runpy, sys
import networks
def embed(self, x):
    out = self.features(x)
    return out.reshape(out.size(0), -1)
networks.ConvNet.embed = embed
sys.argv[0] = "main_DM.py"
runpy.run_path("main_DM.py", run_name="__main__")
"""
# the DM defaults before issue 12 (padded 28 -> 32 px psi, NCHW, whole real batch) and what each change adds
VARIANTS = {
    "before (psi on 32 px, NCHW)": {"embed_fit": "pad", "channels_last": False, "real_chunk": 0},
    "psi on the images' own size": {"embed_fit": "floor", "channels_last": False, "real_chunk": 0},
    "+ channels_last (earlier default)": {"channels_last": True, "real_chunk": 0},
    "NCHW, real forward in chunks of 32 (default)": {},
}


def seconds_per_iteration(objectives, syn: torch.Tensor, iterations: int) -> float:
    """Mean wall time of ``backward`` over every objective, after one warm-up iteration."""
    seconds = []
    for t in range(iterations + 1):
        if syn.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        syn.grad = None
        for objective in objectives:
            objective.backward(syn, t)
        if syn.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return sum(seconds[1:]) / iterations


def time_dm(task, config: DMConfig, iterations: int) -> float:
    images, _ = initial_images(task, "real")
    syn = images.to(task.device).requires_grad_(True)
    return seconds_per_iteration([DMLoss(task, config)], syn, iterations)


def time_dm_dkkt(task, config: DMDKKTConfig, iterations: int) -> float:
    images, labels = initial_images(task, "real")
    syn = images.to(task.device).requires_grad_(True)
    objectives = [DMLoss(task, config), DKKTLoss(task, config, labels, weight=config.w_kkt)]
    return seconds_per_iteration(objectives, syn, iterations)


def reference_seconds(reference: Path, dataset: str, data_root: Path, args) -> float:
    """s / iteration of the reference ``main_DM.py``, from when its ``iter = `` lines arrive."""
    name = REFERENCE_DATASETS.get(dataset)
    if name is None:
        raise SystemExit(f"--reference times {', '.join(REFERENCE_DATASETS)} only (the files it reads are here)")
    if not (reference / "main_DM.py").exists():
        raise SystemExit(f"--reference {reference}: no main_DM.py (a checkout of VICO-UoE/DatasetCondensation)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "data" / name / "raw"
        raw.mkdir(parents=True)
        for f in (data_root / name / "raw").glob("*.gz"):  # it extracts next to them: never into shared data
            shutil.copy(f, raw / f.name)
        (Path(tmp) / "result").mkdir()
        command = [sys.executable, "-u", "-c", REFERENCE_SHIM, "--dataset", name, "--model", "ConvNet"]
        command += ["--ipc", str(args.ipc), "--batch_real", str(args.batch_real), "--Iteration", str(args.iterations)]
        command += ["--num_eval", "0", "--num_exp", "1", "--init", "real"]
        command += ["--data_path", str(Path(tmp) / "data"), "--save_path", str(Path(tmp) / "result")]
        arrivals = {}
        with subprocess.Popen(command, cwd=reference, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:
                if " iter = " in line:
                    arrivals[int(line.split("iter = ")[1].split(",")[0])] = time.perf_counter()
        if p.returncode != 0 or len(arrivals) < 2:
            raise SystemExit(f"the reference main_DM.py failed (exit {p.returncode}); run it by hand in {reference}")
    first, last = min(arrivals), max(arrivals)  # from iteration 0's line on: iteration 0 is the warm-up
    return (arrivals[last] - arrivals[first]) / (last - first)


def global_model_stand_in(task, directory: Path) -> Path:
    info = task.info
    model = build_model("convnet3", info.channels, info.num_classes, info.image_size)
    save_model(directory, model, info, {"weight_decay": 5e-4, "arch": "convnet3"})
    return directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--pipc", default="all", help="public images per class for the reference comparison")
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--kkt-pipc", default="50", help="public images per class of the DM vs DM+DKKT table")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--reference", default="", help="checkout of VICO-UoE/DatasetCondensation ('' to skip)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/time-dm")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, data_root=args.data_root)
    task = make_task(data, args.ipc, args.pipc, device=device, progress=False)
    base = DMConfig(batch_real=args.batch_real)
    header = (
        f"{args.dataset} ipc {args.ipc}, {args.batch_real} real images per class, {args.iterations} iterations "
        f"on {device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(header + "\n", flush=True)

    ours = {name: time_dm(task, replace(base, **change), args.iterations) for name, change in VARIANTS.items()}
    reference = None
    if args.reference:
        root = Path(args.data_root or ".").expanduser()
        reference = reference_seconds(Path(args.reference).expanduser().resolve(), args.dataset, root, args)
        # this project once more after the reference: a drift of the machine shows as a changed figure
        ours["default, again after the reference"] = time_dm(task, base, args.iterations)
    rows = [["reference main_DM.py", f"{reference:.3f}", "1.00"]] if reference else []
    for name, s in ours.items():
        rows.append([name, f"{s:.3f}", f"{s / reference:.2f}" if reference else "-"])
    print(markdown_table(["DM iteration", "s / iteration", "x reference"], rows))

    kkt_task = make_task(data, args.ipc, args.kkt_pipc, device=device, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(global_model_stand_in(kkt_task, Path(tmp) / "model"))
        dm_s = time_dm(kkt_task, base, args.iterations)
        published = DMDKKTConfig(global_model=model, batch_real=args.batch_real)
        kkt = {
            "dm+dkkt (published: one augmented KKT pass)": published,
            "dm+dkkt + un-augmented KKT pass (before)": replace(published, kkt_clean_term=True),
            "dm+dkkt, kkt_batch 50": replace(published, kkt_batch=50),
            "dm+dkkt, kkt_batch 32": replace(published, kkt_batch=32),
            "dm+dkkt, kkt_params last (classifier only)": replace(published, kkt_params="last"),
        }
        kkt_s = {name: time_dm_dkkt(kkt_task, config, args.iterations) for name, config in kkt.items()}
    rows = [["dm", f"{dm_s:.3f}", "1.00"]] + [[n, f"{s:.3f}", f"{s / dm_s:.2f}"] for n, s in kkt_s.items()]
    print(f"\n{args.dataset} ipc {args.ipc}, pipc {args.kkt_pipc}\n")
    print(markdown_table(["iteration", "s / iteration", "x dm"], rows))
    peak = peak_memory_mib(device)
    print(f"\npeak memory: {peak:.0f} MiB")
    atomic_write_json(
        Path(args.out) / "timing.json",
        {
            **vars(args),
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor(),
            "reference_seconds_per_iteration": reference,
            "dm_seconds_per_iteration": ours,
            "kkt_pipc_dm_seconds": dm_s,
            "kkt_pipc_dm_dkkt_seconds": kkt_s,
            "peak_memory_mib": round(peak, 1),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
