"""The optimisation step shared by the CPU demo and the distributed trainer.

>>> opt = make_optimizer(model, OptimConfig())
>>> spec = LossSpec(ObjectiveConfig(), GuidanceConfig(), num_classes=10)
>>> parts = train_step(model, opt, ema, x, y, spec, step, optim_cfg)
>>> parts = train_step(..., runtime=Runtime(compile="step"))  # loss and backward compiled
>>> parts = train_step(..., runtime=Runtime(micro_batch=64))  # accumulated over rows k::K
>>> parts = train_step(..., runtime=Runtime(sdpa_backend="cudnn"))  # plain passes' SDPA kernel

Compile modes (Runtime.compile): "none" runs eagerly; "jvp" compiles the JVP pass alone;
"step" compiles the whole loss -- the guidance passes, the JVP on the r != t rows, the forward
of u (and the aux head) -- with its backward (AOTAutograd), as one graph with no breaks. The
random draws stay outside it (objectives.draw), so one graph serves every step of a run.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from imf_core.ema import EMA
from imf_core.objectives import DrawKey, LossSpec, draw, loss_of_draws
from imf_core.sdpa import plain_attention

COMPILE_MODES = ("none", "jvp", "step")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # constant after warmup (Tab. 4)
    beta1: float = 0.9  # Adam betas (Tab. 4: 0.9, 0.95)
    beta2: float = 0.95  # (beta1 above)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (Tab. 4: 0)
    warmup_steps: int = 0  # linear warmup from 0 ...
    warmup_epochs: float = 0.0  # ... or in epochs (Tab. 4: 10), steps derived from data and batch
    grad_clip: float = 0.0  # 0 = off
    # lr falls linearly to 0 over this last share of the steps; 0 = constant (Tab. 4). Short
    # CPU runs end better with a cooldown (configs/experiment/demo.yaml); long runs keep EMA.
    decay_fraction: float = 0.0
    ema_decay: float = 0.9999  # EMA of the weights that are exported and evaluated
    # The condition embedders' lr as a multiple of lr (1 = one group, as the paper): an
    # ablation of why small in-context networks ignore omega (issue 26).
    embedder_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.warmup_steps and optim.warmup_epochs must be >= 0")
        if self.warmup_steps and self.warmup_epochs:
            raise ValueError("set optim.warmup_steps or optim.warmup_epochs, not both")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.embedder_lr_scale <= 0:
            raise ValueError(f"optim.embedder_lr_scale must be > 0, got {self.embedder_lr_scale}")


def with_warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> OptimConfig:
    """cfg with warmup_epochs turned into steps (steps_per_epoch: ceil(images / global batch))."""
    steps = cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)
    return replace(cfg, warmup_steps=steps, warmup_epochs=0.0)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (Tab. 4: Adam, no weight decay, which AdamW with weight_decay 0 is), with the fused
    single-kernel update on CUDA. With embedder_lr_scale != 1 the condition embedders form a
    second group at that multiple of the lr."""
    cuda = next(model.parameters()).is_cuda
    params = list(model.parameters())
    groups: list[dict] = [{"params": params, "lr_scale": 1.0}]
    if cfg.embedder_lr_scale != 1.0:
        embedders = list(model.embedders.parameters())
        ids = {id(p) for p in embedders}
        groups = [
            {"params": [p for p in params if id(p) not in ids], "lr_scale": 1.0},
            {"params": embedders, "lr_scale": cfg.embedder_lr_scale},
        ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        fused=cuda or None,
    )


# train.compile=auto: the whole step, on CUDA and on the CPU. Measured for the default objective
# and guidance (imf_aux, omega-interval CFG): B/2 at batch 256 on an H200, 309 ms a step against
# 927 eager; `tiny` at batch 256 on 2 CPU cores, 288 ms against 321 with the JVP alone compiled
# and 414 eager (benchmarks/RESULTS.md). The price is the first step's compile: 136 s for B/2 on
# the H200, ~40 s an objective for `tiny` on the CPU, which short runs set aside (compile=none).
DEFAULT_COMPILE = "step"


@functools.cache
def compiled_loss(backend: str = "inductor") -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
    """objectives.loss_of_draws under torch.compile as one graph (fullgraph: a graph break is an
    error, not a silent slowdown). Static shapes: one compile per batch shape and variant.
    `backend` "aot_eager" traces the same graph without code generation (cheap, for tests)."""
    return torch.compile(loss_of_draws, fullgraph=True, dynamic=False, backend=backend)


def lr_at(step: int, cfg: OptimConfig, total_steps: int = 0) -> float:
    """Linear warmup to cfg.lr over warmup_steps (see with_warmup_steps), constant, and with
    decay_fraction > 0 a linear fall towards 0 over the last decay_fraction * total_steps."""
    if cfg.warmup_epochs:
        raise ValueError("lr_at needs warmup in steps: with_warmup_steps(cfg, steps_per_epoch)")
    lr = cfg.lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    if cfg.decay_fraction:
        if total_steps < 1:
            raise ValueError("lr_at needs total_steps when optim.decay_fraction > 0")
        decay = cfg.decay_fraction * total_steps
        lr *= min(1.0, max(0.0, total_steps - step) / decay)
    return lr


@dataclass(frozen=True)
class Runtime:
    """How a step runs on this process, not what it computes: every setting gives the same
    step, to float rounding. `compile`: one of COMPILE_MODES (module docstring), with
    `compile_backend` (torch.compile's; "aot_eager" traces without code generation, for tests);
    `sdpa_backend`: the plain passes' attention kernel (imf_core.sdpa; a compiled step takes
    the one set when it compiles); `micro_batch`: rows per micro-step, 0 for one (micro_steps);
    `shard`: (rank, world), this process's rows rank::world of the global batch."""

    compile: str = "none"
    compile_backend: str = "inductor"
    sdpa_backend: str = "auto"
    micro_batch: int = 0
    shard: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    x: Tensor,
    y: Tensor,
    spec: LossSpec,
    step: int,
    optim: OptimConfig,
    *,
    seed: int = 0,
    total_steps: int = 0,
    runtime: Runtime = Runtime(),
) -> dict[str, Tensor]:
    """Loss, backward, (clip), AdamW step and EMA update. Returns the detached loss parts.

    The batch's draws are made once, a function of (seed, step) and the global row
    (objectives.draw, DrawKey), with no host sync; with runtime.micro_batch the loss and
    backward run on rows k::K, k < K = micro_steps(len(x), micro_batch), accumulating the
    gradient of the batch's mean loss, before the one optimizer step: the same step as without,
    to float rounding, in the memory of one micro-batch. The lr is lr_at(step, optim,
    total_steps).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, optim, total_steps) * group["lr_scale"]
    steps = micro_steps(x.shape[0], runtime.micro_batch)
    draws = draw(x, y, spec, DrawKey(seed, step), runtime.shard)
    compile, backend = runtime.compile, runtime.compile_backend
    loss_fn = compiled_loss(backend) if compile == "step" else loss_of_draws
    optimizer.zero_grad(set_to_none=True)
    parts: dict[str, Tensor] = {}
    for k in range(steps):
        # Every part is a mean over the batch's rows (the adaptive weight is per row): the
        # micro-batches' means, each weighted by its share of the rows, add up to the batch's.
        rows = slice(k, None, steps)
        share = len(range(k, x.shape[0], steps)) / x.shape[0]
        with plain_attention(runtime.sdpa_backend):
            loss, micro = loss_fn(
                model,
                x[rows],
                y[rows],
                draws.micro(k, steps),
                spec,
                compile_jvp=backend if compile == "jvp" else None,
            )
        (loss * share).backward()
        for name, value in micro.items():
            parts[name] = parts.get(name, 0.0) + value * share
    # Data parallelism: gradients are averaged once, after the last micro-step (DDP's no_sync)
    world = runtime.shard[1]
    if world > 1:
        average_gradients(model, world)
    max_norm = optim.grad_clip if optim.grad_clip > 0 else float("inf")
    parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).detach()
    optimizer.step()
    if ema is not None:
        ema.update(model)
    return parts


def micro_steps(batch: int, micro_batch: int) -> int:
    """How many micro-steps of at most `micro_batch` rows make a step of `batch` rows (one for
    micro_batch 0). An epoch's last, smaller batch may not divide: its micro-batches then differ
    by a row, each weighted by its size."""
    if micro_batch < 0:
        raise ValueError(f"micro-batch must be >= 0, got {micro_batch}")
    return -(-batch // micro_batch) if micro_batch else 1


def step_flops_per_image(model: nn.Module, spec: LossSpec, batch: int = 4) -> float:
    """FLOPs of one training step per image (2 per multiply-add, as PyTorch counts them): the
    forward, the guidance passes, the JVP and the backward, what MFU is measured against.
    Counted by PyTorch on a model on the meta device (instant, no memory) or a real one."""
    device = next(model.parameters()).device
    cfg = model.cfg
    x = torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    draws = draw(x, y, spec)
    with FlopCounterMode(display=False) as counter:
        loss, _ = loss_of_draws(model, x, y, draws, spec)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def average_gradients(model: nn.Module, world: int, bucket: int = 2**26) -> None:
    """Data parallelism: the mean of every rank's gradients, in flat buckets of <= `bucket`
    elements (one all-reduce each), on every rank.

    In place of DDP: a compiled step's backward is one graph, which DDP cannot overlap with
    its all-reduces from inside, and DDP called within a compiled function does not trace
    (torch 2.14: "Dynamo does not know how to trace method set_runtime_stats_and_log"). Ranks
    skip the same parameters (those without a gradient, e.g. an unused aux head), so the
    buckets match.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    start = 0
    while start < len(grads):
        group, size = [], 0
        while start < len(grads) and (not group or size + grads[start].numel() <= bucket):
            group.append(grads[start])
            size += grads[start].numel()
            start += 1
        flat = torch.cat([g.flatten() for g in group])
        torch.distributed.all_reduce(flat)
        flat /= world
        for g, synced in zip(group, flat.split([g.numel() for g in group]), strict=True):
            g.copy_(synced.view_as(g))


class StopAgreement:
    """Whether every rank goes on, agreed without stalling each step: a step's flags [loss not
    finite, stop asked] are summed over the ranks (an all-reduce queued behind the step's work)
    and copied to page-locked host memory without waiting, then read once that step's work is
    done -- one step later, while the device runs the next (`settle()`), or at once before a
    checkpoint, an evaluation, a log line or the end (`settle(everything=True)`), so that none
    of those ever follows a non-finite step. Every rank reads the same sums after the same
    step: all stop at the same step and report the same number of times.
    """

    def __init__(self, world: int):
        self.world = world
        self.pending: deque[tuple[int, Tensor, torch.cuda.Event | None]] = deque()
        self.bad_step: int | None = None  # the first step whose loss was not finite on a rank
        self.stop = False  # a stop was asked (on any rank)

    def post(self, step: int, loss: Tensor, stop_asked: bool) -> None:
        """Queues the flags of `step` (its loss: a device tensor, never read here)."""
        bad = (~torch.isfinite(loss.detach())).float()
        flags = torch.stack([bad, torch.full_like(bad, float(stop_asked))])
        if self.world > 1:
            torch.distributed.all_reduce(flags)
        host, event = flags, None
        if flags.is_cuda:
            host = torch.empty(2, pin_memory=True).copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending.append((step, host, event))

    def settle(self, everything: bool = False) -> None:
        """Reads the flags of the steps posted before the last (of all with `everything`)."""
        while len(self.pending) > (0 if everything else 1):
            step, host, event = self.pending.popleft()
            if event is not None:
                event.synchronize()  # that step's work alone, not the one queued after it
            bad, asked = host.tolist()
            if bad > 0 and self.bad_step is None:
                self.bad_step = step
            self.stop = self.stop or asked > 0
