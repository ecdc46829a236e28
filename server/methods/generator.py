"""The ``generator`` method: a conditional GAN tuned by global + local matching (DESIGN s.6).

Stage 1 trains an AC-GAN with WGAN-GP on the real images the server may use (``--pipc``).
Stage 2 keeps the CGAN loss and adds, per generator step, matching against a live model of the
pool, on a real batch and generated images of the same labels:

    L_total = L_CGAN + w_global * L_global + w_local * L_local
    L_global = mean over samples and classes of (log_softmax f(A(G(z_i, y_i))) - log_softmax f(A(x_i)))^2
    L_local  = mean over samples and entries of (f_mid(A(G(z_i, y_i))) - f_mid(A(x_i)))^2

Both are *means*, DiM's scale for w_global 0.01 / w_local 0.001: summed over a batch and a
feature map the terms were hundreds to thousands of times the CGAN loss and pulled every z to its
class prototype. ``local_match=class-mean`` matches per-class mean features instead of pairs
(ours, a departure from both papers). A is DSA drawn per pair and applied identically to the
real image and its generated partner (``match_dsa``).

``match_scale=cgan-gradient`` (ours): the weights become fractions of the CGAN term's gradient on
the generator, step by step: each matching term is multiplied by
``w * |grad_G L_CGAN| / |grad_G L_term|`` (a detached factor, logged as ``weight_global`` /
``weight_local``), so its pull on the generator is ``w`` times the CGAN's whatever the terms'
raw scale. At DiM's weights the terms' gradients are 1.6 % and 0.007 % of the CGAN's on MNIST, too
little for Adam's lr-sized steps to follow; this sets their share directly (two extra gradient
passes through the generator per step).

DiM's pool schedule: one live model, re-drawn (architecture from ``pool``, fresh initialisation)
every ``pool_reinit_every`` generator steps (default: one epoch of the real data), trained
``pool_steps`` SGD steps with per-sample DSA on real batches before each generator step. Stage 2
runs Adam at ``lr_stage2`` (5e-6) for the generator *and* the discriminator.

Checkpoint selection (``select_every`` > 0): ``select_per_class`` real images per class are held
out of training; every ``select_every`` steps a ConvNet-3 trained on a fixed sample of the
generator is scored on them, and each stage ends on its best-scoring state among those its own
steps reached (stage 2 starts from stage 1's choice but cannot hand it back unchanged: as in DiM,
the matching stage picks among its own checkpoints). The test split is never used.
``w_local = 0`` is DiM-style logit matching; both weights 0 is the plain CGAN (no pool). Every
weighted term is logged per step (curves in the manifest, a plot in the generator directory).
The artifact holds ``ipc`` images per class sampled from the final generator plus the generator
itself (``generator/``), from which ``edgedistill generate`` draws any counts later. Two seeded
random streams (below) drive all randomness and are checkpointed with everything else: ``--resume``
continues an interrupted run exactly.

Two random streams, so that variants differ only in their method: the main stream draws the
critic's and the generator's real batches, the noise and the gradient penalty, the same draws for
every variant; the matching stream draws everything only matching uses (pool re-draws, the pool's
batches and DSA, the shared augmentation). Without the split, a variant that trains no pool model
(``cgan``) saw other batches and noise than the matching variants, and that difference alone moved
ipc-1 accuracy by 3.5 points. Both streams are re-seeded from ``stage2_seed`` when stage 2
starts, so stage-2 repeats of one CGAN differ only in their seed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.augment import DSA, strategy_for_dataset
from common.checkpoint import load_checkpoint, save_checkpoint
from common.datasets import Split
from common.errors import ConfigError
from common.models import build_model, list_models
from common.runtime import derive_seed, make_generator
from common.subsets import held_out_fold
from server.methods.gan import (
    ARCH_WIDTHS,
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
# Options stage 1 never reads (its trainer builds no pool without stage-2 steps): one CGAN serves every
# stage-2 ablation of them, and a kept stage-1 state is not retrained for a new w_local or lr_stage2.
STAGE2_OPTIONS = (
    "stage2_steps", "match_batch", "lr_stage2", "w_global", "w_local", "local_match", "match_scale", "pool",
    "local_layers", "pool_steps", "pool_lr", "pool_reinit_every", "pool_dsa", "match_dsa", "stage2_seed",
)  # fmt: skip
GRID_PER_CLASS = 10
LOCAL_MATCHES = ("pair", "class-mean")
MATCH_SCALES = ("weight", "cgan-gradient")
TERMS_PLOT = "stage2-terms.png"


@dataclass
class GeneratorConfig:
    noise_dim: int = 100
    arch: str = "small"  # small (CPU budgets) | dim (DiM's size: width 196, 7 + 8 convolutions)
    width: int = 0  # base channels of generator and discriminator (0: the arch's, small 64 / dim 196)
    stage1_steps: int = 20000  # generator steps of the CGAN stage
    stage2_steps: int = 2000  # generator steps of the matching stage
    batch_size: int = 128  # stage 1 batch (real and fake)
    match_batch: int = 64  # stage 2 batch
    lr_stage1: float = 1e-4  # Adam (betas 0, 0.9) of G and D
    lr_stage2: float = 5e-6  # Adam of G *and* D in stage 2 (DiM)
    critic_steps: int = 1  # discriminator steps per generator step
    gp_weight: float = 10.0
    ac_weight: float = 1.0  # weight of the class-head cross-entropy (AC-GAN)
    w_global: float = 0.01  # x mean squared log-softmax difference
    w_local: float = 0.001  # x mean squared mid-layer feature difference
    local_match: str = "pair"  # pair (each fake vs its real partner) | class-mean (ours: per-class means)
    match_scale: str = "weight"  # weight: w x term | cgan-gradient (ours): w = the term's gradient / the CGAN's
    pool: str = "convnet3,resnet10,resnet18"
    local_layers: str = "auto"  # 'auto' (each model's middle stage) or 'arch:layer,...'
    pool_steps: int = 16  # SGD steps (with DSA) of the live pool model before each generator step
    pool_lr: float = 0.01
    pool_reinit_every: int = 0  # generator steps between fresh pool models (0: one epoch of the real data)
    pool_dsa: str = "color_crop"  # per-sample DSA while training pool models ('none': off)
    match_dsa: str = "color_crop_cutout"  # DSA shared by each real/generated pair when matching ('none': off)
    stage2_seed: int = 0  # re-seeds both random streams when stage 2 starts (generator-training repeats)
    select_every: int = 0  # steps between held-out checkpoint scores (0: no selection, keep the last state)
    select_per_class: int = 10  # real images per class held out of training for the selection
    select_ipc: int = 10  # generated images per class the selection network trains on
    select_epochs: int = 100  # epochs of that ConvNet-3 (the fixed-set protocol, shortened)
    checkpoint_every: int = 500  # generator steps between checkpoints (0: never)
    resume: bool = False
    log_every: int = 50
    time_limit: float = 0.0  # seconds of training before stopping early with a note (0: no limit)

    def __post_init__(self) -> None:
        counts = (self.stage1_steps, self.stage2_steps, self.pool_steps, self.checkpoint_every)
        if min(*counts, self.pool_reinit_every, self.select_every, self.width, self.stage2_seed) < 0:
            raise ConfigError(
                "generator step counts, width, pool_reinit_every, select_every and stage2_seed must be >= 0"
            )
        sizes = (self.batch_size, self.match_batch, self.critic_steps, self.log_every, self.select_ipc)
        if min(*sizes, self.select_per_class, self.select_epochs) < 1:
            raise ConfigError("generator batch sizes, critic_steps, log_every and select_* sizes must be >= 1")
        if min(self.lr_stage1, self.lr_stage2, self.pool_lr) <= 0 or min(self.w_global, self.w_local) < 0:
            raise ConfigError("generator learning rates must be > 0 and matching weights >= 0")
        if self.arch not in ARCH_WIDTHS:
            raise ConfigError(f"generator arch {self.arch!r} is unknown; use {' or '.join(ARCH_WIDTHS)}")
        if self.local_match not in LOCAL_MATCHES:
            raise ConfigError(f"local_match {self.local_match!r} is unknown; use {' or '.join(LOCAL_MATCHES)}")
        if self.match_scale not in MATCH_SCALES:
            raise ConfigError(f"match_scale {self.match_scale!r} is unknown; use {' or '.join(MATCH_SCALES)}")
        for name in ("pool_dsa", "match_dsa"):
            if getattr(self, name) not in ("", "none"):
                DSA(getattr(self, name))  # raises a ConfigError naming the families
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

    @property
    def variant(self) -> str:
        if self.w_global > 0 and self.w_local > 0:
            return "global+local"
        return "logit" if self.w_global > 0 else ("local" if self.w_local > 0 else "cgan")


# A smoke-run preset (``edgedistill distill --method generator --quick``): a minute or two on digits.
QUICK = {"stage1_steps": 600, "stage2_steps": 30, "pool": "convnet3", "pool_steps": 2, "log_every": 20}


def layer_choice(spec: str, arch: str, stage_names: tuple[str, ...]) -> str:
    """The mid layer matched for ``arch``: from ``'arch:layer,...'``, else its middle stage."""
    chosen = dict(item.split(":", 1) for item in spec.split(",") if ":" in item) if spec != "auto" else {}
    layer = chosen.get(arch, stage_names[len(stage_names) // 2])
    if layer not in stage_names:
        raise ConfigError(f"local layer {layer!r} is not a layer of {arch}; choose one of {', '.join(stage_names)}")
    return layer


def make_dsa(strategy: str, dataset_name: str) -> DSA | None:
    """The DSA of a strategy option ('' or 'none': no augmentation); flips dropped for digits."""
    if strategy in ("", "none"):
        return None
    return DSA(strategy_for_dataset(dataset_name, strategy))


def shared_augment(
    dsa: DSA | None, real: torch.Tensor, fake: torch.Tensor, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DSA draw per pair, applied identically to ``real[i]`` and ``fake[i]`` (DiM's matching aug)."""
    if dsa is None:
        return real, fake
    params = dsa.sample(real.shape[0], real.shape[-1], rng)
    return dsa.apply(real, params), dsa.apply(fake, params)


class ModelPool:
    """DiM's schedule: one live matching model, re-drawn every ``reinit_every`` generator steps.

    A draw picks the architecture from the pool with the run's generator and initialises it from
    a seed derived from the draw's number, so a resumed run rebuilds exactly the same model.
    """

    def __init__(self, task: DistillTask, config: GeneratorConfig, reinit_every: int) -> None:
        self.task, self.config, self.reinit_every = task, config, reinit_every
        self.names = config.pool_names
        self.dsa = make_dsa(config.pool_dsa, task.info.name)
        self.draws, self.arch_index = 0, -1
        self.drawn: list[str] = []  # the architecture of every draw, for the manifest
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.layer = ""

    @property
    def arch(self) -> str:
        return self.names[self.arch_index]

    def _build(self, arch_index: int, draw: int) -> None:
        info, arch = self.task.info, self.names[arch_index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.task.seed, "pool", draw, arch))
            model = build_model(arch, info.channels, info.num_classes, info.image_size).to(self.task.device)
        self.model, self.arch_index = model.train(), arch_index
        self.optimizer = torch.optim.SGD(model.parameters(), lr=self.config.pool_lr, momentum=0.9, weight_decay=5e-4)
        self.layer = layer_choice(self.config.local_layers, arch, model.stage_names)

    def maybe_redraw(self, stage2_step: int, rng: torch.Generator) -> None:
        """A fresh model at stage-2 step 0 and every ``reinit_every`` steps after."""
        if self.model is None or stage2_step % self.reinit_every == 0:
            self._build(int(torch.randint(len(self.names), (1,), generator=rng)), self.draws)
            self.draws += 1
            self.drawn.append(self.arch)

    def train(self, batches: list[tuple[torch.Tensor, torch.Tensor]], rng: torch.Generator) -> float:
        loss = torch.zeros(())
        for x, y in batches:
            if self.dsa is not None:
                x = self.dsa(x, rng)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss.item()

    def state_dict(self) -> dict:
        live = self.model is not None
        return {
            "draws": self.draws,
            "drawn": self.drawn,
            "arch_index": self.arch_index,
            "model": self.model.state_dict() if live else None,
            "optimizer": self.optimizer.state_dict() if live else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.draws, self.drawn = state["draws"], list(state.get("drawn", []))
        if state["model"] is not None:
            self._build(state["arch_index"], state["draws"] - 1)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])


def matching_losses(
    model: torch.nn.Module,
    layer: str,
    fake: torch.Tensor,
    real: torch.Tensor,
    labels: torch.Tensor,
    local_match: str = "pair",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_global, L_local), both means, of normalised fake images against their paired real batch."""
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
    global_term = (F.log_softmax(logits_fake, 1) - F.log_softmax(logits_real, 1)).pow(2).mean()
    if local_match == "class-mean":
        classes = labels.unique()
        gaps = [(mid_fake[labels == c].mean(0) - mid_real[labels == c].mean(0)).pow(2).mean() for c in classes]
        local_term = torch.stack(gaps).mean()
    else:
        local_term = (mid_fake - mid_real).pow(2).mean()
    return global_term, local_term


def hold_out(real: Split, per_class: int, seed: int) -> tuple[Split, Split]:
    """(training images, ``per_class`` held-out images per class), split with a seeded permutation."""
    try:
        keep, held = held_out_fold(real.labels, per_class, 0, (seed, "select"))
    except ConfigError as exc:
        raise ConfigError(f"select_per_class {per_class}: {exc}; lower select_per_class or raise --pipc") from None
    return real.subset(keep), real.subset(held)


class HeldOutSelector:
    """Scores generator states on held-out real images and keeps each stage's best state."""

    def __init__(self, task: DistillTask, config: GeneratorConfig, held: Split) -> None:
        self.task, self.config, self.held = task, config, held
        self.history: list[list] = []  # [step, stage, held-out accuracy]
        self.best: dict | None = None  # {"step", "score", "state"} of the current stage

    def score(self, gen: ConditionalGenerator) -> float:
        from common.evaluation import EvalConfig, evaluate_set

        info, config = self.task.info, self.config
        counts = dict.fromkeys(range(info.num_classes), config.select_ipc)
        images, labels = sample(gen, counts, derive_seed(self.task.seed, "select-sample"), info, self.task.device)
        gen.train()
        protocol = EvalConfig(epochs=config.select_epochs)
        result = evaluate_set(
            images, labels, self.held, info, "convnet3", 1, protocol, self.task.seed, self.task.device, 1, False
        )
        return result.mean

    def consider(self, trainer: GeneratorTrainer, stage: int) -> None:
        score = self.score(trainer.gen)
        self.history.append([trainer.step, stage, score])
        if self.best is None or score > self.best["score"]:
            self.best = {"step": trainer.step, "score": score, "state": copy.deepcopy(trainer.network_state())}

    def end_stage(self, trainer: GeneratorTrainer, stage: int) -> dict:
        """Score the last state, restore the stage's best into the trainer; returns its step and score.

        The next stage starts from scratch (``best`` None): the state it starts from is not a candidate.
        """
        if not self.history or self.history[-1][:2] != [trainer.step, stage]:
            self.consider(trainer, stage)
        chosen = {"step": self.best["step"], "score": self.best["score"]}
        trainer.load_network_state(self.best["state"])
        self.best = None
        return chosen

    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best = state["history"], state["best"]


class GeneratorTrainer:
    """Both stages of the method, step by step, with its whole state checkpointable."""

    def __init__(self, task: DistillTask, config: GeneratorConfig) -> None:
        if len(task.real) == 0:
            raise ConfigError("the generator needs real images; use --pipc >= 1 or all")
        self.task, self.config = task, config
        self.shape = GeneratorShape.for_dataset(task.info, config.noise_dim, config.width, config.arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(task.seed, "gan"))
            self.gen = ConditionalGenerator(self.shape).to(task.device)
            self.disc = ACDiscriminator(self.shape).to(task.device)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=config.lr_stage1, betas=(0.0, 0.9))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config.lr_stage1, betas=(0.0, 0.9))
        train = task.real
        self.selector = None
        if config.select_every:
            train, held = hold_out(task.real, config.select_per_class, task.seed)
            self.selector = HeldOutSelector(task, config, held)
        self.real_x = train.images.to(task.device)
        self.real_y = train.labels.to(task.device)
        self.reinit_every = config.pool_reinit_every or math.ceil(len(train) / config.match_batch)
        self.pool = ModelPool(task, config, self.reinit_every) if config.matching and config.stage2_steps else None
        self.match_dsa = make_dsa(config.match_dsa, task.info.name)
        self.rng = make_generator(derive_seed(task.seed, "generator-steps"))
        self.match_rng = make_generator(derive_seed(task.seed, "matching-steps"))
        self.match_weights: dict[str, float] = {}  # the last step's factor per matching term
        self.step = 0
        self.curves: dict[str, list] = {}
        self.window: dict[str, list[float]] = {}
        self.seconds = [0.0, 0.0]  # per stage
        self.stage1_grid: tuple[torch.Tensor, torch.Tensor] | None = None
        self.chosen: dict[str, dict] = {}  # stage -> {"step", "score"} of the held-out selection
        self.stopped_early = ""

    @property
    def total_steps(self) -> int:
        return self.config.stage1_steps + self.config.stage2_steps

    def stage_of(self, step: int) -> int:
        return 1 if step < self.config.stage1_steps else 2

    def real_batch(self, size: int, rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.real_y), (size,), generator=rng or self.rng).to(self.task.device)
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
        self, x: torch.Tensor, y: torch.Tensor, match: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_total and its *weighted* terms for a real batch; matching only when ``match`` (a live pool model)."""
        fake = self.gen(self.noise(len(y)), y)
        critic, classes = self.disc(fake)
        terms = {"cgan": -critic.mean() + self.config.ac_weight * F.cross_entropy(classes, y)}
        total = terms["cgan"]
        if match:
            real_aug, fake_aug = shared_augment(self.match_dsa, x, from_unit(fake, self.task.info), self.match_rng)
            global_term, local_term = matching_losses(
                self.pool.model, self.pool.layer, fake_aug, real_aug, y, self.config.local_match
            )
            raw = {"global": (self.config.w_global, global_term), "local": (self.config.w_local, local_term)}
            if self.config.match_scale == "cgan-gradient":
                self.match_weights = self.gradient_shares(terms["cgan"], raw)
            else:
                self.match_weights = {name: weight for name, (weight, _) in raw.items()}
            for name, (_, term) in raw.items():
                terms[name] = self.match_weights[name] * term
            total = total + terms["global"] + terms["local"]
        return total, terms

    def gradient_shares(self, cgan: torch.Tensor, raw: dict[str, tuple[float, torch.Tensor]]) -> dict[str, float]:
        """``match_scale=cgan-gradient``: the factor that makes each term's gradient on the generator
        ``w`` times the CGAN term's (0 for a weightless term or one with no gradient)."""
        params = [p for p in self.gen.parameters() if p.requires_grad]

        def norm(term: torch.Tensor) -> float:
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            return float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads if g is not None)))

        reference = norm(cgan)
        shares = {}
        for name, (weight, term) in raw.items():
            size = norm(term) if weight > 0 else 0.0
            shares[name] = weight * reference / size if size > 0 else 0.0
        return shares

    def train_step(self, inspect: Callable[[dict[str, torch.Tensor]], None] | None = None) -> dict[str, float]:
        """One generator step (and its critic and pool steps); ``inspect`` sees the weighted terms, graphs
        intact, before the update (``simulations.generator_gradients`` measures their gradients there)."""
        stage, config = self.stage_of(self.step), self.config
        size = config.batch_size if stage == 1 else config.match_batch
        values: dict[str, float] = {}
        for _ in range(config.critic_steps):
            values = self.critic_step(size)
        match = stage == 2 and self.pool is not None
        if match:
            self.pool.maybe_redraw(self.step - config.stage1_steps, self.match_rng)
            batches = [self.real_batch(config.match_batch, self.match_rng) for _ in range(config.pool_steps)]
            values["pool_ce"] = self.pool.train(batches, self.match_rng)
        x, y = self.real_batch(size)
        total, terms = self.generator_objective(x, y, match)
        if inspect is not None:
            inspect(terms)
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        self.opt_g.step()
        values.update({f"g_{name}": value.item() for name, value in terms.items()})
        if match and config.match_scale != "weight":
            values.update({f"weight_{name}": weight for name, weight in self.match_weights.items()})
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
        seed = self.config.stage2_seed
        self.rng.manual_seed(derive_seed(self.task.seed, "stage2", seed))
        self.match_rng.manual_seed(derive_seed(self.task.seed, "stage2-matching", seed))
        for optimizer in (self.opt_g, self.opt_d):
            for group in optimizer.param_groups:
                group["lr"] = self.config.lr_stage2
        if self.task.workdir is not None:
            from common.visualize import save_grid

            Path(self.task.workdir).mkdir(parents=True, exist_ok=True)
            save_grid(*self.stage1_grid, self.task.info, Path(self.task.workdir) / "stage1.png")

    def network_state(self) -> dict:
        """What checkpoint selection keeps: both networks and their optimisers."""
        return {
            "gen": self.gen.state_dict(),
            "disc": self.disc.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load_network_state(self, state: dict) -> None:
        self.gen.load_state_dict(state["gen"])
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])

    def state_dict(self) -> dict:
        return {
            **self.network_state(),
            "pool": self.pool.state_dict() if self.pool is not None else None,
            "selector": self.selector.state_dict() if self.selector is not None else None,
            "chosen": self.chosen,
            "rng": self.rng.get_state(),
            "match_rng": self.match_rng.get_state(),
            "step": self.step,
            "curves": self.curves,
            "window": self.window,
            "seconds": self.seconds,
            "stage1_grid": self.stage1_grid,
        }

    def load_state_dict(self, state: dict) -> None:
        # a copy: one stage-1 state may seed several stage-2 trainers (the benchmark's variants), and
        # appending to it would leak one variant's selection history and curves into the next
        state = copy.deepcopy(state)
        self.load_network_state(state)
        if self.pool is not None and state["pool"] is not None:
            self.pool.load_state_dict(state["pool"])
        if self.selector is not None and state.get("selector") is not None:
            self.selector.load_state_dict(state["selector"])
        self.chosen = dict(state.get("chosen", {}))
        self.rng.set_state(state["rng"])
        if "match_rng" in state:  # a stage-1 state kept before the streams split (stage 2 re-seeds both)
            self.match_rng.set_state(state["match_rng"])
        self.step, self.curves, self.window = state["step"], state["curves"], state["window"]
        self.seconds, self.stage1_grid = list(state["seconds"]), state["stage1_grid"]


def train_generator(
    task: DistillTask,
    config: GeneratorConfig,
    on_step: Callable[[int], None] | None = None,
    start_from: dict | None = None,
) -> GeneratorTrainer:
    """Run (or resume) both stages; returns the trainer holding the final (or selected) generator.

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
    selector = trainer.selector
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
            if selector is not None and trainer.step == first + steps:
                trainer.chosen[str(stage)] = selector.end_stage(trainer, stage)
            elif selector is not None and trainer.step % config.select_every == 0:
                selector.consider(trainer, stage)
            if ckpt is not None and config.checkpoint_every and trainer.step % config.checkpoint_every == 0:
                save_checkpoint(ckpt, {**identity, **trainer.state_dict()})
            if trainer.step % config.log_every == 0:
                task.report_progress(
                    trainer.step, trainer.total_steps, trainer.curves["g_total"][-1][1], "generator", "steps"
                )
            if on_step is not None:
                on_step(trainer.step)
        bar.close()
        if trainer.stopped_early:
            if selector is not None and trainer.step > first:  # a stage that ran no step keeps its start
                trainer.chosen[str(stage)] = selector.end_stage(trainer, stage)
            break
    trainer.flush()
    trainer.resumed_from = resumed_from
    return trainer


def selection_record(trainer: GeneratorTrainer) -> dict:
    """The held-out selection for a manifest: every score and the step chosen per stage ({} without one)."""
    if trainer.selector is None:
        return {}
    return {
        "held_out_per_class": trainer.config.select_per_class,
        "every": trainer.config.select_every,
        "history": trainer.selector.history,
        "chosen": trainer.chosen,
    }


def _summary(trainer: GeneratorTrainer) -> dict:
    config, s1, s2 = trainer.config, trainer.seconds[0], trainer.seconds[1]
    done1 = min(trainer.step, config.stage1_steps)
    done2 = trainer.step - done1
    selection = selection_record(trainer)
    return {
        "loss_curves": trainer.curves,
        "stage1_steps": config.stage1_steps,
        "stage2_steps": config.stage2_steps,
        "seconds_per_step_stage1": round(s1 / done1, 4) if done1 else 0.0,
        "seconds_per_step_stage2": round(s2 / done2, 4) if done2 else 0.0,
        "variant": config.variant,
        "generator_shape": dataclasses.asdict(trainer.shape),
        "pool": config.pool_names if trainer.pool is not None else [],
        "pool_reinit_every": trainer.reinit_every if trainer.pool is not None else 0,
        "pool_draws": trainer.pool.draws if trainer.pool is not None else 0,
        "pool_drawn": trainer.pool.drawn if trainer.pool is not None else [],
        "resumed_from": trainer.resumed_from,
        "steps_done": trainer.step,
        **({"selection": selection} if selection else {}),
        **({"stopped_early": trainer.stopped_early} if trainer.stopped_early else {}),
    }


def save_terms_plot(curves: dict[str, list], path: Path) -> None:
    """Stage 2's weighted generator terms (|value|, log scale) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.visualize import save_figure

    fig, ax = plt.subplots(figsize=(5, 3))
    for name, label in (("g_cgan", "CGAN"), ("g_global", "w_global * global"), ("g_local", "w_local * local")):
        points = curves.get(name, [])
        if points:
            ax.plot([p[0] for p in points], [max(abs(p[1]), 1e-12) for p in points], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("generator step")
    ax.set_ylabel("|term|")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


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
    figures = {TERMS_PLOT: lambda where: save_terms_plot(trainer.curves, where)} if config.stage2_steps else {}

    def write_generator(where: Path) -> None:
        save_generator(where, trainer.gen.cpu(), task.info, meta, pictures, figures=figures)

    summary["generator"] = "generator/"
    summary["sample_seed"] = task.seed
    return MethodOutput(images, labels, summary, attachments={"generator": write_generator})
