"""Distribution Matching (Zhao & Bilen, WACV 2023): the ``dm`` method.

Per iteration: a freshly initialised, frozen embedding network psi; for each class c a real
batch R_c, the synthetic images S_c, one Siamese DSA transform A applied to both, and

    L_DM = sum_c || mean_{x in R_c} psi(A(x)) - mean_{s in S_c} psi(A(s)) ||^2

minimised over the pixels of S by SGD (lr 1, momentum 0.5). Real embeddings need no autograd
graph, and where psi has no batch statistics (instance norm, the default) they are computed
``real_chunk`` images at a time: the same mean, but the first block's activations of a chunk fit
in the CPU's caches (a 256-image MNIST batch's are 100 MB), which halves the real forward there.
All randomness of iteration t comes from seeds derived from (seed, t), so a run resumed
from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.augment import DEFAULT_STRATEGY, DSA, AugParams, strategy_for_dataset
from common.errors import ConfigError
from common.models import build_model
from common.runtime import derive_seed, make_generator
from server.methods.pixel_loop import LoopSettings, optimise_pixels, slices_of
from server.methods.registry import DistillTask, MethodOutput, register_method
from server.methods.registry import job_identity as task_job_identity

CHECKPOINT_FILE = "dm-checkpoint.pt"  # written by the shared loop as f"{label}-checkpoint.pt"
# real_chunk changes the order of a float sum only, like a thread count
NON_IDENTITY_OPTIONS = ("resume", "iterations", "checkpoint_every", "time_limit", "real_chunk")


@dataclass(frozen=True)
class DMConfig:
    iterations: int = 20000
    lr_img: float = 1.0
    momentum: float = 0.5
    batch_real: int = 256  # real images per class per iteration (capped by what the class has)
    init: str = "real"  # real | noise
    embed_model: str = "convnet3"  # any registry model
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY  # flips are dropped for digit datasets
    batch_classes: bool = False  # one forward for all classes instead of one per class
    embed_fit: str = "floor"  # psi sees the images at their own size (floor) or padded (pad; 28 -> 32 px)
    channels_last: bool = False  # NHWC activations (faster whole-batch convolutions; slower GroupNorm once chunked)
    real_chunk: int = -1  # real images per no-grad forward (-1: 32 on CPUs, whole batch on GPUs; 0: whole batch)
    checkpoint_every: int = 500  # iterations between checkpoints (0: never)
    resume: bool = False  # continue from the last checkpoint in the task's workdir
    log_every: int = 10  # iterations averaged into one loss-curve point
    time_limit: float = 0.0  # seconds of optimisation before stopping early with a note (0: none)

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.batch_real < 1 or self.lr_img <= 0 or self.log_every < 1:
            raise ConfigError("dm needs iterations >= 0, batch_real >= 1, lr_img > 0 and log_every >= 1")
        if self.real_chunk < -1:
            raise ConfigError(f"dm real_chunk {self.real_chunk}: use -1 (auto), 0 (whole batch) or a chunk size")
        if self.init not in ("real", "noise"):
            raise ConfigError(f"dm init {self.init!r}: use real or noise")
        if self.embed_fit not in ("floor", "pad"):
            raise ConfigError(f"dm embed_fit {self.embed_fit!r}: use floor or pad")


def resolve_real_chunk(real_chunk: int, device: torch.device) -> int:
    """Real images per no-grad forward: -1 picks 32 on CPUs (cache-sized) and 0 (whole batch) on GPUs."""
    if real_chunk == -1:
        return 0 if torch.device(device).type == "cuda" else 32
    return real_chunk


def per_sample(net: torch.nn.Module) -> bool:
    """True when each embedding depends on its own image only (no batch statistics in train mode)."""
    return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def initial_images(task: DistillTask, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images per class from real images of the class (or Gaussian noise)."""
    info, images, labels = task.info, [], []
    for c, n in task.counts.items():
        g = make_generator(derive_seed("dm-init", task.seed, c))
        shape = (n, info.channels, info.image_size, info.image_size)
        members = task.real_of_class(c)
        if init == "noise" or len(members) == 0:
            images.append(torch.randn(shape, generator=g))
        else:
            picks = members[torch.randperm(len(members), generator=g)][:n]
            chosen = task.real.images[picks]
            if len(picks) < n:  # fewer public images than slots: repeat them, jittered so they can diverge
                repeats = chosen[torch.arange(n - len(picks)) % len(picks)]
                chosen = torch.cat([chosen, repeats + 0.1 * torch.randn(repeats.shape, generator=g)])
            images.append(chosen.clone())
        labels.append(torch.full((n,), c, dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


class DMLoss:
    """The DM objective (an :class:`~server.methods.pixel_loop.Objective`): one random network per iteration."""

    name = "dm"

    def __init__(self, task: DistillTask, config: DMConfig) -> None:
        self.task, self.config = task, config
        self.slices = slices_of(task.counts)
        self.real_images = task.real.images.to(task.device)
        self.real_by_class = {c: task.real_of_class(c) for c in task.counts}
        strategy = strategy_for_dataset(task.info.name, config.dsa_strategy)
        self.dsa = DSA(strategy) if config.dsa else None
        self.used = torch.zeros(len(task.real), dtype=torch.bool)  # which real images were ever drawn
        self.real_chunk = resolve_real_chunk(config.real_chunk, task.device)

    def used_train_indices(self) -> torch.Tensor:
        """Positions in the training split of every real image this objective has drawn."""
        return self.task.real_indices[self.used]

    def network(self, iteration: int) -> torch.nn.Module:
        info = self.task.info
        torch.manual_seed(derive_seed("dm-net", self.task.seed, iteration))
        options = {"fit": self.config.embed_fit} if self.config.embed_model == "convnet3" else {}
        net = build_model(self.config.embed_model, info.channels, info.num_classes, info.image_size, **options)
        net = net.to(self.task.device).train().requires_grad_(False)
        return net.to(memory_format=torch.channels_last) if self.config.channels_last else net

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def real_embedding_mean(self, net: torch.nn.Module, real: torch.Tensor, params: AugParams | None) -> torch.Tensor:
        """mean psi(A(x)) over a real batch, without an autograd graph, a chunk at a time where psi is per-sample."""
        chunk = self.real_chunk if self.real_chunk and per_sample(net) else len(real)
        with torch.no_grad():
            total = 0.0
            for part in real.split(max(chunk, 1)):
                if params is not None:
                    part = self.dsa.apply(part, params)
                total = total + net.embed(self.layout(part)).sum(0)
            return total / len(real)

    def class_batches(self, syn: torch.Tensor, g: torch.Generator):
        """(class, real batch, augmented synthetic batch, the Siamese transform the real batch still needs)."""
        for c, sl in self.slices.items():
            members = self.real_by_class[c]
            pick = members[torch.randperm(len(members), generator=g)[: self.config.batch_real]]
            self.used[pick] = True
            real = self.real_images[pick.to(self.real_images.device)]
            fake, params = syn[sl], None
            if self.dsa is not None:
                params = self.dsa.sample(1, self.task.info.image_size, g)
                fake = self.dsa.apply(fake, params)
            yield c, real, fake, params

    def backward(self, syn: torch.Tensor, iteration: int) -> float:
        """Accumulate d L_DM / d syn into ``syn.grad``; returns the loss."""
        net = self.network(iteration)
        g = make_generator(derive_seed("dm-iter", self.task.seed, iteration))
        batches = list(self.class_batches(syn, g))
        if self.config.batch_classes:
            real_means = [self.real_embedding_mean(net, r, a) for _, r, _, a in batches]
            fake_emb = net.embed(self.layout(torch.cat([f for _, _, f, _ in batches])))
            loss, f0 = 0.0, 0
            for real_mean, (_, _, f, _) in zip(real_means, batches, strict=True):
                loss = loss + ((real_mean - fake_emb[f0 : f0 + len(f)].mean(0)) ** 2).sum()
                f0 += len(f)
            loss.backward()
            return float(loss.detach())
        total = 0.0
        for _, real, fake, params in batches:  # one class at a time keeps activations in cache (DESIGN s.12)
            real_mean = self.real_embedding_mean(net, real, params)
            loss = ((real_mean - net.embed(self.layout(fake)).mean(0)) ** 2).sum()
            loss.backward()
            total += float(loss.detach())
        return total

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def job_identity(method: str, task: DistillTask, config) -> dict:
    """What a checkpoint of a pixel-optimising method must match to be resumed."""
    return task_job_identity(method, task, config, NON_IDENTITY_OPTIONS)


def loop_settings(config) -> LoopSettings:
    return LoopSettings(
        iterations=config.iterations,
        checkpoint_every=config.checkpoint_every,
        resume=config.resume,
        log_every=config.log_every,
        time_limit=config.time_limit,
    )


def dm_optimizer(config: DMConfig) -> Callable[[torch.Tensor], torch.optim.Optimizer]:
    return lambda syn: torch.optim.SGD([syn], lr=config.lr_img, momentum=config.momentum)


def run_dm(
    task: DistillTask,
    config: DMConfig,
    on_iteration: Callable[[int, float], None] | None = None,
) -> MethodOutput:
    """Optimise the synthetic set; ``on_iteration(t, loss)`` is called after each step."""
    images, labels = initial_images(task, config.init)
    objective = DMLoss(task, config)
    syn, extra = optimise_pixels(
        task,
        "dm",
        images,
        dm_optimizer(config),
        [objective],
        loop_settings(config),
        job_identity("dm", task, config),
        on_iteration,
    )
    extra["real_images_used_this_run"] = int(objective.used.sum())
    return MethodOutput(syn, labels, extra)


@register_method("dm", DMConfig, "Distribution Matching: match mean embeddings of random networks")
def distill_dm(task: DistillTask, config: DMConfig) -> MethodOutput:
    return run_dm(task, config)
