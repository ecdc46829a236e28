"""How strongly each stage-2 term steers the generator: per-term gradient norms and cosines.

Stage 2 runs Adam, which scales every update to about the learning rate whatever the loss's size,
so what a matching term adds is its share of the summed gradient, not its value. From a kept
stage-1 state (the ``stage1.pt`` of a ``simulations.bench_generator`` ``--out``), this runs the first
``--steps`` stage-2 steps of the real schedule (critic step, pool draw and its DSA steps, matching)
once per ``--w-locals`` value and prints, per term, the mean norm of its gradient on the
generator's weights, its ratio to the CGAN term's and its cosine with it:

    python -m simulations.generator_gradients --dataset mnist --data-root DATA \\
        --stage1 runs/control/stage1.pt --set width=32 --set batch_size=64 --set pool_steps=4 \\
        --set select_every=500 --set lr_stage2=1e-4 --w-locals 0.001,0.1 --steps 100 --measure-every 10
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from common.checkpoint import load_checkpoint
from common.datasets import load_dataset
from common.fileio import atomic_write_json
from common.report import markdown_table
from common.runtime import resolve_device
from server.methods.generator import GeneratorTrainer
from server.methods.registry import make_task
from simulations.bench_generator import base_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--pipc", default="all", help="as the benchmark that wrote --stage1")
    p.add_argument("--stage1", required=True, help="a bench_generator --out's stage1.pt")
    p.add_argument("--stage1-steps", type=int, default=3000, help="as the benchmark that wrote --stage1")
    p.add_argument("--set", action="append", default=[], help="generator option key=value, as in the benchmark")
    p.add_argument("--w-locals", default="0.001,0.1")
    p.add_argument("--steps", type=int, default=10, help="stage-2 steps run per w_local")
    p.add_argument("--measure-every", type=int, default=1, help="measure every n-th of those steps (the last first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/generator-gradients")
    return p.parse_args(argv)


def term_gradients(trainer: GeneratorTrainer, steps: int, every: int = 1) -> dict[str, dict[str, float]]:
    """Mean gradient norm per weighted term (and cosine with the CGAN term's) over every ``every``-th of
    ``steps`` stage-2 steps; every step is the trainer's own, so they follow the method's schedule."""
    params = [p for p in trainer.gen.parameters() if p.requires_grad]
    measured = [t for t in range(steps) if (steps - 1 - t) % every == 0]
    sums: dict[str, dict[str, float]] = {}

    def measure(terms: dict[str, torch.Tensor]) -> None:
        flat = {}
        for name, term in terms.items():
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            zeros_if_unused = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            flat[name] = torch.cat([g.flatten() for g in zeros_if_unused])
        for name, g in flat.items():
            row = sums.setdefault(name, {"norm": 0.0, "ratio": 0.0, "cosine": 0.0, "value": 0.0})
            n = len(measured)
            row["norm"] += float(g.norm()) / n
            row["ratio"] += float(g.norm() / flat["cgan"].norm()) / n
            row["cosine"] += float(torch.nn.functional.cosine_similarity(g, flat["cgan"], dim=0)) / n
            row["value"] += float(terms[name].detach()) / n

    for t in range(steps):
        trainer.train_step(inspect=measure if t in measured else None)
        trainer.step += 1
    return sums


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, data_root=args.data_root)
    task = make_task(data, 1, args.pipc, seed=args.seed, device=device, dataset_spec=args.dataset, progress=False)
    budget = argparse.Namespace(stage1_steps=args.stage1_steps, stage2_steps=max(1, args.steps), set=args.set)
    base = base_config(budget)
    start = load_checkpoint(Path(args.stage1), {})
    if start.get("step") != base.stage1_steps:
        raise SystemExit(f"{args.stage1} holds step {start.get('step')}; pass its --stage1-steps")
    rows, results = [], {}
    for w_local in [float(w) for w in args.w_locals.split(",") if w]:
        trainer = GeneratorTrainer(task, replace(base, w_local=w_local))
        trainer.load_state_dict({**start, "pool": None})
        trainer.begin_stage2()
        results[str(w_local)] = sums = term_gradients(trainer, args.steps, args.measure_every)
        for name, row in sums.items():
            rows.append([f"{w_local:g}", name, f"{row['value']:.4g}", f"{row['norm']:.4g}", f"{row['ratio']:.2e}",
                         f"{row['cosine']:+.3f}"])  # fmt: skip
        print(f"w_local {w_local:g} done", flush=True)
    print(f"\n{args.dataset}, every {args.measure_every} of the first {args.steps} stage-2 steps from {args.stage1}\n")
    print(markdown_table(["w_local", "term", "weighted value", "|grad_G|", "/ |grad_G cgan|", "cos with cgan"], rows))
    atomic_write_json(Path(args.out) / "gradients.json", {**vars(args), "terms": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
