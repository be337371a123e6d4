"""Exponential moving average of a model's parameters, swapped in for sampling.

>>> ema = EMA(model, decay=0.9999)
>>> ema.update(model)                 # after each optimizer step
>>> with ema.swap_in(model): sample(...)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copy theta_ema <- decay * theta_ema + (1 - decay) * theta, kept in float32."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        names, params = zip(*model.named_parameters(), strict=True)
        shadow = [self.shadow[k] for k in names]
        # One fused kernel per group of tensors on a GPU, not one per parameter tensor.
        torch._foreach_lerp_(shadow, [p.detach().float() for p in params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k])

    @contextmanager
    def swap_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily loads the EMA weights into `model`; restores the live ones afterwards."""
        live = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(live[k])

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        self.shadow = {k: v.float().clone() for k, v in state.items()}
