"""Model presets of the paper and how to build and measure them.

>>> model = create("imf_b2")                      # iMF-B/2, Tab. 4
>>> meta = create("imf_xl2", device="meta")       # no memory: for counting
>>> count_params(meta) / 1e6, count_flops(meta) / 1e9
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from imf_core.guidance import Conditions
from imf_core.models.config import ModelConfig
from imf_core.models.dit import DiT
from imf_core.models.in_context import InContextTransformer

_IMF = dict(conditioning="in_context", blocks="advanced", aux_head_depth=8)
# MeanFlow's DiT: conditioned on t and h, no CFG inputs, DiT's initialisation (its own code).
_MF = dict(
    conditioning="adaln",
    blocks="plain",
    init="dit",
    cond_t=True,
    cond_omega=False,
    cond_interval=False,
)

PRESETS: dict[str, ModelConfig] = {
    # Tab. 4: iMF sizes (depth x width, heads); the aux v-head is 8 blocks deep.
    "imf_b2": ModelConfig(**_IMF, depth=12, width=768, heads=12),
    "imf_m2": ModelConfig(**_IMF, depth=24, width=768, heads=12),
    "imf_l2": ModelConfig(**_IMF, depth=32, width=1024, heads=16),
    "imf_xl2": ModelConfig(**_IMF, depth=48, width=1024, heads=16),
    # Original MeanFlow: DiT-B/2 and DiT-XL/2 conditioned on (t, t - r), CFG fixed at training.
    "mf_b2": ModelConfig(**_MF, depth=12, width=768, heads=12),
    "mf_xl2": ModelConfig(**_MF, depth=28, width=1152, heads=16),
    # Tab. 1c's path at B/2: adaLN-zero with CFG-conditioning -> in-context -> advanced (= imf_b2).
    "imf_b2_adaln": ModelConfig(
        conditioning="adaln", blocks="plain", aux_head_depth=8, depth=12, width=768, heads=12
    ),
    "imf_b2_in_context": ModelConfig(
        conditioning="in_context", blocks="plain", aux_head_depth=8, depth=12, width=768, heads=12
    ),
    # A debug-sized model for digits (8x8, one channel) on CPU. One token per condition: its
    # 16 image tokens shared attention with 10 condition tokens at (4, 2, 2, 1, 1), and these
    # models are overhead-bound (1 CPU thread, batch 64: 4.4 -> 6.0 steps/s with cond_t).
    "tiny": ModelConfig(
        **_IMF | dict(aux_head_depth=1),
        input_size=8,
        in_channels=1,
        depth=4,
        width=64,
        heads=4,
        num_classes=10,
        class_tokens=1,
        time_tokens=1,
        omega_tokens=1,
        interval_tokens=1,
    ),
}


def build(cfg: ModelConfig) -> nn.Module:
    """The network a ModelConfig describes."""
    return (InContextTransformer if cfg.conditioning == "in_context" else DiT)(cfg)


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    unknown = set(overrides) - set(asdict(PRESETS[name]))
    if unknown:
        raise TypeError(f"unknown model config keys {sorted(unknown)} for preset {name!r}")
    return replace(PRESETS[name], **overrides)


def create(name: str, device: str | torch.device | None = None, **overrides) -> nn.Module:
    """Builds preset `name` with config overrides, directly on `device` (e.g. "meta")."""
    cfg = preset(name, **overrides)
    with torch.device(device or "cpu"):
        return build(cfg)


def count_params(model: nn.Module, inference: bool = True) -> int:
    """Parameter count; with inference=True, only what 1-NFE sampling uses (no aux v-head)."""
    total = sum(p.numel() for p in model.parameters())
    if inference:
        total -= sum(p.numel() for m in model.aux_modules() for p in m.parameters())
    return total


def dummy_inputs(cfg: ModelConfig, batch: int, device: torch.device | str) -> tuple:
    """(x, t, h, cond) of the right shapes, for measuring a model."""
    x = torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    t = torch.full((batch,), 0.5, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    return x, t, t, Conditions.for_sampling(y, omega=2.0)


def count_flops(model: nn.Module) -> int:
    """Multiply-adds of one inference forward (u only) for one image, counted by PyTorch."""
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*dummy_inputs(model.cfg, 1, device))
    return counter.get_total_flops() // 2  # the counter reports 2 FLOPs per multiply-add
