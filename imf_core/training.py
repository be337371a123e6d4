"""The optimisation step shared by the CPU demo and the distributed trainer.

>>> opt = make_optimizer(model, OptimConfig())
>>> parts = train_step(model, opt, ema, x, y, objective, guidance, 10, step, optim_cfg)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from imf_core.ema import EMA
from imf_core.guidance import GuidanceConfig
from imf_core.objectives import ObjectiveConfig, imf_loss


@dataclass
class OptimConfig:
    lr: float = 1e-4  # constant after warmup (Tab. 4)
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup from 0 ...
    warmup_epochs: float = 0.0  # ... or in epochs (Tab. 4: 10), steps derived from data and batch
    grad_clip: float = 0.0  # 0 = off
    # lr falls linearly to 0 over this last share of the steps; 0 = constant (Tab. 4). Short
    # CPU runs end better with a cooldown (configs/experiment/demo.yaml); long runs keep EMA.
    decay_fraction: float = 0.0
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.warmup_steps and optim.warmup_epochs must be >= 0")
        if self.warmup_steps and self.warmup_epochs:
            raise ValueError("set optim.warmup_steps or optim.warmup_epochs, not both")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")


def with_warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> OptimConfig:
    """cfg with warmup_epochs turned into steps (steps_per_epoch: ceil(rows / global batch))."""
    steps = cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)
    return replace(cfg, warmup_steps=steps, warmup_epochs=0.0)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )


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


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    x: Tensor,
    y: Tensor,
    objective: ObjectiveConfig,
    guidance: GuidanceConfig,
    num_classes: int,
    step: int,
    optim: OptimConfig,
    *,
    generator: torch.Generator | None = None,
    inner: nn.Module | None = None,
    compile_jvp: bool = False,
    shard: tuple[int, int] = (0, 1),
    total_steps: int = 0,
) -> dict[str, Tensor]:
    """Loss, backward, (clip), Adam step and EMA update. Returns the detached loss parts.

    `model` may be DDP-wrapped; `inner` is then the bare module, used for the no-grad and JVP
    passes so that DDP's hooks only see the one ordinary forward/backward.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, optim, total_steps)
    loss, parts = imf_loss(
        model,
        x,
        y,
        objective,
        guidance,
        num_classes,
        generator=generator,
        inner=inner,
        compile_jvp=compile_jvp,
        shard=shard,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = (inner or model).parameters()
    max_norm = optim.grad_clip if optim.grad_clip > 0 else float("inf")
    parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    optimizer.step()
    if ema is not None:
        ema.update(inner or model)
    return parts
