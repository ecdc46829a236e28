"""The ``generator`` method: a conditional GAN tuned by global + local matching (DESIGN s.6).

Stage 1 trains an AC-GAN with WGAN-GP on the real images the server may use (``--pipc``).
Stage 2 keeps the CGAN loss and adds, per generator step, matching against a model drawn from a
pool (randomly initialised, trained online on real data a few SGD steps between generator steps):

    L_total = w_global * L_global + w_local * L_local + L_CGAN
    L_global = sum_i || log_softmax(f(G(z_i, y_i))) - log_softmax(f(x_i)) ||^2   (paired with real x_i, y_i)
    L_local  = sum_i || f_mid(G(z_i, y_i)) - f_mid(x_i) ||^2                        (a named mid layer)

Both are sums over the batch and the entries, as published, which is what gives the published
weights (0.01, 0.001) their scale next to the CGAN loss.

``w_local = 0`` is DiM-style logit matching; both weights 0 is the plain CGAN baseline (the pool
is then never built). The method's output is a fixed set of ``ipc`` images per class sampled from
the final generator, plus the generator itself (``generator/`` inside the artifact), from which
``edgedistill generate`` draws any other ipc or per-class counts without retraining.
All randomness goes through one seeded generator whose state is checkpointed: ``--resume``
continues an interrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import ConfigError
from common.models import build_model, list_models
from common.runtime import derive_seed, make_generator
from server.methods.gan import (
    ACDiscriminator,
    ConditionalGenerator,
    GeneratorShape,
    from_unit,
    gradient_penalty,
    sample,
    save_generator,
    to_unit,
)
from server.methods.registry import DistillTask, MethodOutput, job_identity, register_method

CHECKPOINT_FILE = "generator-checkpoint.pt"
NON_IDENTITY_OPTIONS = ("resume", "checkpoint_every", "log_every", "time_limit")
GRID_PER_CLASS = 10


@dataclass
class GeneratorConfig:
    noise_dim: int = 100
    width: int = 64  # generator/discriminator base channels
    stage1_steps: int = 20000  # generator steps of the CGAN stage
    stage2_steps: int = 2000  # generator steps of the matching stage
    batch_size: int = 128  # stage 1 batch (real and fake)
    match_batch: int = 64  # stage 2 batch
    lr_stage1: float = 1e-4  # Adam (betas 0, 0.9) of G and D
    lr_stage2: float = 5e-6  # G's lr in stage 2 (D keeps lr_stage1)
    critic_steps: int = 1  # discriminator steps per generator step
    gp_weight: float = 10.0
    ac_weight: float = 1.0  # weight of the class-head cross-entropy (AC-GAN)
    w_global: float = 0.01
    w_local: float = 0.001
    pool: str = "convnet3,resnet10,resnet18"
    local_layers: str = "auto"  # 'auto' (each model's middle stage) or 'arch:layer,...'
    pool_steps: int = 5  # SGD steps of the drawn model on real data before each generator step
    pool_lr: float = 0.01
    checkpoint_every: int = 500  # generator steps between checkpoints (0: never)
    resume: bool = False
    log_every: int = 50
    time_limit: float = 0.0  # seconds of training before stopping early with a note (0: no limit)

    def __post_init__(self) -> None:
        if min(self.stage1_steps, self.stage2_steps, self.pool_steps, self.checkpoint_every) < 0:
            raise ConfigError("generator step counts and checkpoint_every must be >= 0")
        if min(self.batch_size, self.match_batch, self.critic_steps, self.log_every) < 1:
            raise ConfigError("generator batch sizes, critic_steps and log_every must be >= 1")
        if min(self.lr_stage1, self.lr_stage2, self.pool_lr) <= 0 or min(self.w_global, self.w_local) < 0:
            raise ConfigError("generator learning rates must be > 0 and matching weights >= 0")
        unknown = [name for name in self.pool_names if name not in list_models()]
        if self.matching and (not self.pool_names or unknown):
            raise ConfigError(
                f"generator pool {self.pool!r}: unknown model(s) {unknown}; use {', '.join(list_models())}"
            )

    @property
    def pool_names(self) -> list[str]:
        return [name.strip() for name in self.pool.split(",") if name.strip()]

    @property
    def matching(self) -> bool:
        """Whether stage 2 uses the model pool at all (both weights 0 = plain CGAN)."""
        return self.w_global > 0 or self.w_local > 0


# A smoke-run preset (``edgedistill distill --method generator --quick``): a minute or two on digits.
QUICK = {"stage1_steps": 600, "stage2_steps": 30, "pool": "convnet3", "pool_steps": 2, "log_every": 20}


def layer_choice(spec: str, arch: str, stage_names: tuple[str, ...]) -> str:
    """The mid layer matched for ``arch``: from ``'arch:layer,...'``, else its middle stage."""
    chosen = dict(item.split(":", 1) for item in spec.split(",") if ":" in item) if spec != "auto" else {}
    layer = chosen.get(arch, stage_names[len(stage_names) // 2])
    if layer not in stage_names:
        raise ConfigError(f"local layer {layer!r} is not a layer of {arch}; choose one of {', '.join(stage_names)}")
    return layer


class ModelPool:
    """Randomly initialised models trained online on real data; one is drawn per generator step."""

    def __init__(self, task: DistillTask, config: GeneratorConfig) -> None:
        info = task.info
        self.models, self.optimizers, self.layers = [], [], []
        for i, arch in enumerate(config.pool_names):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(task.seed, "pool", i, arch))
                model = build_model(arch, info.channels, info.num_classes, info.image_size).to(task.device)
            self.models.append(model.train())
            self.optimizers.append(
                torch.optim.SGD(model.parameters(), lr=config.pool_lr, momentum=0.9, weight_decay=5e-4)
            )
            self.layers.append(layer_choice(config.local_layers, arch, model.stage_names))

    def __len__(self) -> int:
        return len(self.models)

    def train(self, index: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        model, optimizer = self.models[index], self.optimizers[index]
        loss = torch.zeros(())
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.item()

    def state_dict(self) -> dict:
        return {
            "models": [m.state_dict() for m in self.models],
            "optimizers": [o.state_dict() for o in self.optimizers],
        }

    def load_state_dict(self, state: dict) -> None:
        for model, optimizer, ms, os_ in zip(self.models, self.optimizers, state["models"], state["optimizers"]):
            model.load_state_dict(ms)
            optimizer.load_state_dict(os_)


def matching_losses(
    model: torch.nn.Module, layer: str, fake: torch.Tensor, real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_global, L_local) of normalised fake images against the paired real batch."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to the generator only
    try:
        with torch.no_grad():
            mid_real, logits_real = model.features_and_logits(real, layer)
        mid_fake, logits_fake = model.features_and_logits(fake, layer)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    global_term = (F.log_softmax(logits_fake, 1) - F.log_softmax(logits_real, 1)).pow(2).sum()
    local_term = (mid_fake - mid_real).pow(2).sum()
    return global_term, local_term


class GeneratorTrainer:
    """Both stages of the method, step by step, with its whole state checkpointable."""

    def __init__(self, task: DistillTask, config: GeneratorConfig) -> None:
        if len(task.real) == 0:
            raise ConfigError("the generator needs real images; use --pipc >= 1 or all")
        self.task, self.config = task, config
        self.shape = GeneratorShape.for_dataset(task.info, config.noise_dim, config.width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(task.seed, "gan"))
            self.gen = ConditionalGenerator(self.shape).to(task.device)
            self.disc = ACDiscriminator(self.shape).to(task.device)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=config.lr_stage1, betas=(0.0, 0.9))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config.lr_stage1, betas=(0.0, 0.9))
        self.pool = ModelPool(task, config) if config.matching and config.stage2_steps else None
        self.rng = make_generator(derive_seed(task.seed, "generator-steps"))
        self.real_x = task.real.images.to(task.device)
        self.real_y = task.real.labels.to(task.device)
        self.step = 0
        self.curves: dict[str, list] = {}
        self.window: dict[str, list[float]] = {}
        self.seconds = [0.0, 0.0]  # per stage
        self.stage1_grid: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stopped_early = ""

    @property
    def total_steps(self) -> int:
        return self.config.stage1_steps + self.config.stage2_steps

    def stage_of(self, step: int) -> int:
        return 1 if step < self.config.stage1_steps else 2

    def real_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.real_y), (size,), generator=self.rng).to(self.task.device)
        return self.real_x[idx], self.real_y[idx]

    def noise(self, size: int) -> torch.Tensor:
        return torch.randn(size, self.shape.noise_dim, generator=self.rng).to(self.task.device)

    def critic_step(self, size: int) -> dict[str, float]:
        x, y = self.real_batch(size)
        real = to_unit(x, self.task.info)
        with torch.no_grad():
            fake = self.gen(self.noise(size), y)
        critic_real, classes_real = self.disc(real)
        critic_fake, _ = self.disc(fake)
        class_loss = F.cross_entropy(classes_real, y)
        penalty = gradient_penalty(self.disc, real, fake, self.rng)
        loss = (
            critic_fake.mean()
            - critic_real.mean()
            + self.config.gp_weight * penalty
            + self.config.ac_weight * class_loss
        )
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return {
            "d_loss": loss.item(),
            "d_class": class_loss.item(),
            "wasserstein": (critic_real.mean() - critic_fake.mean()).item(),
        }

    def generator_objective(
        self, x: torch.Tensor, y: torch.Tensor, model_index: int | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_total and its terms for a real batch; matching terms only when a pool model is given."""
        fake = self.gen(self.noise(len(y)), y)
        critic, classes = self.disc(fake)
        terms = {"cgan": -critic.mean() + self.config.ac_weight * F.cross_entropy(classes, y)}
        total = terms["cgan"]
        if model_index is not None:
            model, layer = self.pool.models[model_index], self.pool.layers[model_index]
            terms["global"], terms["local"] = matching_losses(model, layer, from_unit(fake, self.task.info), x)
            total = total + self.config.w_global * terms["global"] + self.config.w_local * terms["local"]
        return total, terms

    def train_step(self) -> dict[str, float]:
        stage, config = self.stage_of(self.step), self.config
        size = config.batch_size if stage == 1 else config.match_batch
        values: dict[str, float] = {}
        for _ in range(config.critic_steps):
            values = self.critic_step(size)
        model_index = None
        if stage == 2 and self.pool is not None:
            model_index = int(torch.randint(len(self.pool), (1,), generator=self.rng))
            batches = [self.real_batch(config.match_batch) for _ in range(config.pool_steps)]
            values["pool_ce"] = self.pool.train(model_index, batches)
        x, y = self.real_batch(size)
        total, terms = self.generator_objective(x, y, model_index)
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        self.opt_g.step()
        values.update({f"g_{name}": value.item() for name, value in terms.items()})
        values["g_total"] = total.item()
        return values

    def record(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.window.setdefault(name, []).append(value)
        if len(self.window.get("g_total", [])) >= self.config.log_every:
            self.flush()

    def flush(self) -> None:
        for name, vals in self.window.items():
            if vals:
                self.curves.setdefault(name, []).append([self.step, sum(vals) / len(vals)])
        self.window = {}

    def grid_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = dict.fromkeys(range(self.task.info.num_classes), GRID_PER_CLASS)
        images, labels = sample(self.gen, counts, derive_seed(self.task.seed, "grid"), self.task.info, self.task.device)
        self.gen.train()
        return images, labels

    def begin_stage2(self) -> None:
        self.stage1_grid = self.grid_samples()
        for group in self.opt_g.param_groups:
            group["lr"] = self.config.lr_stage2
        if self.task.workdir is not None:
            from common.visualize import save_grid

            Path(self.task.workdir).mkdir(parents=True, exist_ok=True)
            save_grid(*self.stage1_grid, self.task.info, Path(self.task.workdir) / "stage1.png")

    def state_dict(self) -> dict:
        return {
            "gen": self.gen.state_dict(),
            "disc": self.disc.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "pool": self.pool.state_dict() if self.pool is not None else None,
            "rng": self.rng.get_state(),
            "step": self.step,
            "curves": self.curves,
            "window": self.window,
            "seconds": self.seconds,
            "stage1_grid": self.stage1_grid,
        }

    def load_state_dict(self, state: dict) -> None:
        self.gen.load_state_dict(state["gen"])
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.pool is not None and state["pool"] is not None:
            self.pool.load_state_dict(state["pool"])
        self.rng.set_state(state["rng"])
        self.step, self.curves, self.window = state["step"], state["curves"], state["window"]
        self.seconds, self.stage1_grid = list(state["seconds"]), state["stage1_grid"]


def train_generator(
    task: DistillTask,
    config: GeneratorConfig,
    on_step: Callable[[int], None] | None = None,
    start_from: dict | None = None,
) -> GeneratorTrainer:
    """Run (or resume) both stages; returns the trainer holding the final generator.

    ``start_from`` is another trainer's ``state_dict()`` at the end of stage 1 (same data, seed
    and stage-1 options): stage-2 variants then share one CGAN, as the benchmark does.
    """
    trainer = GeneratorTrainer(task, config)
    identity = job_identity("generator", task, config, NON_IDENTITY_OPTIONS, with_counts=False)
    ckpt = Path(task.workdir) / CHECKPOINT_FILE if task.workdir else None
    resumed_from = None
    if start_from is not None:
        if start_from["step"] != config.stage1_steps:
            raise ConfigError(
                f"start_from holds step {start_from['step']}, not the end of stage 1 ({config.stage1_steps})"
            )
        trainer.load_state_dict({**start_from, "pool": None})
    if config.resume:
        if ckpt is None or not ckpt.exists():
            raise ConfigError(f"--resume: no generator checkpoint at {ckpt}; run without --resume to start fresh")
        trainer.load_state_dict(load_checkpoint(ckpt, identity))
        resumed_from = trainer.step
    trainer.gen.train()
    for stage, steps, first in ((1, config.stage1_steps, 0), (2, config.stage2_steps, config.stage1_steps)):
        done = min(max(trainer.step - first, 0), steps)
        if done == steps:
            continue
        bar = tqdm(total=steps, initial=done, desc=f"generator stage {stage}", disable=None if task.progress else True)
        while trainer.step < first + steps:
            if config.time_limit and sum(trainer.seconds) >= config.time_limit:
                trainer.stopped_early = f"time limit {config.time_limit:g} s reached after {trainer.step} steps"
                break
            if stage == 2 and trainer.step == first and trainer.stage1_grid is None:
                trainer.begin_stage2()
            started = time.perf_counter()
            values = trainer.train_step()
            trainer.seconds[stage - 1] += time.perf_counter() - started
            trainer.step += 1
            trainer.record(values)
            if trainer.step % config.log_every == 0:
                bar.set_postfix(
                    {k: f"{v[-1][1]:.3g}" for k, v in trainer.curves.items() if k != "wasserstein"}, refresh=False
                )
            bar.update(1)
            if ckpt is not None and config.checkpoint_every and trainer.step % config.checkpoint_every == 0:
                save_checkpoint(ckpt, {**identity, **trainer.state_dict()})
            if on_step is not None:
                on_step(trainer.step)
        bar.close()
        if trainer.stopped_early:
            break
    trainer.flush()
    trainer.resumed_from = resumed_from
    return trainer


def _summary(trainer: GeneratorTrainer) -> dict:
    config, s1, s2 = trainer.config, trainer.seconds[0], trainer.seconds[1]
    done1 = min(trainer.step, config.stage1_steps)
    done2 = trainer.step - done1
    return {
        "loss_curves": trainer.curves,
        "stage1_steps": config.stage1_steps,
        "stage2_steps": config.stage2_steps,
        "seconds_per_step_stage1": round(s1 / done1, 4) if done1 else 0.0,
        "seconds_per_step_stage2": round(s2 / done2, 4) if done2 else 0.0,
        "variant": "global+local"
        if config.w_local > 0 and config.w_global > 0
        else ("logit" if config.w_global > 0 else ("local" if config.w_local > 0 else "cgan")),
        "pool": config.pool_names if trainer.pool is not None else [],
        "local_layers": dict(zip(config.pool_names, trainer.pool.layers)) if trainer.pool is not None else {},
        "resumed_from": trainer.resumed_from,
        "steps_done": trainer.step,
        **({"stopped_early": trainer.stopped_early} if trainer.stopped_early else {}),
    }


@register_method(
    "generator",
    GeneratorConfig,
    "conditional GAN tuned by global (logit) + local (mid-layer) matching; the artifact keeps the generator",
    quick=QUICK,
)
def distill_generator(task: DistillTask, config: GeneratorConfig) -> MethodOutput:
    trainer = train_generator(task, config)
    images, labels = sample(trainer.gen, task.counts, task.seed, task.info, task.device)
    summary = _summary(trainer)
    pictures = {"stage1.png": trainer.stage1_grid} if trainer.stage1_grid is not None else {}
    pictures["stage2.png" if config.stage2_steps else "stage1.png"] = trainer.grid_samples()
    meta = {
        "method_options": dataclasses.asdict(config),
        "seed": task.seed,
        "pipc": task.pipc,
        "dataset_spec": task.dataset_spec,
        **summary,
    }
    meta.pop("loss_curves")

    def write_generator(where: Path) -> None:
        save_generator(where, trainer.gen.cpu(), task.info, meta, pictures)

    summary["generator"] = "generator/"
    summary["sample_seed"] = task.seed
    return MethodOutput(images, labels, summary, attachments={"generator": write_generator})
