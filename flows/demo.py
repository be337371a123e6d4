"""The README's demo: train the `tiny` iMF model on scikit-learn's digits with imf_core alone.

    python -m flows.demo [steps=1200] [out=artifacts/demo] [key=value ...]

Writes a PNG grid of 1-NFE samples (one row per class) for each CFG scale and prints where,
with the share of samples a logistic-regression digit classifier assigns to the asked class.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression
from torchvision.utils import save_image

from imf_core.ema import EMA
from imf_core.guidance import GuidanceConfig, generate
from imf_core.models import count_params, create
from imf_core.objectives import ObjectiveConfig
from imf_core.training import OptimConfig, make_optimizer, train_step
from tasks.datasets import digits


@dataclass
class DemoConfig:
    steps: int = 1200
    batch_size: int = 64
    seed: int = 0
    out: str = "artifacts/demo"
    omegas: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # CFG scales to sample
    samples_per_class: int = 10
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50, ema_decay=0.995)
    )


def main(argv: list[str] | None = None) -> None:
    overrides = OmegaConf.from_dotlist(sys.argv[1:] if argv is None else argv)
    cfg: DemoConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(DemoConfig), overrides)
    )
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images, labels = digits()
    model = create("tiny")
    print(
        f"iMF demo: tiny model ({count_params(model) / 1e6:.2f} M inference params), "
        f"{cfg.objective.name} + {cfg.guidance.mode}, {cfg.steps} steps of {cfg.batch_size} digits"
    )
    optimizer, ema = make_optimizer(model, cfg.optim), EMA(model, cfg.optim.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        parts = train_step(
            model,
            optimizer,
            ema,
            images[idx],
            labels[idx],
            cfg.objective,
            cfg.guidance,
            10,
            step,
            cfg.optim,
            generator=gen,
        )
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            rate = (step + 1) / (time.perf_counter() - start)
            print(
                f"step {step + 1:5d}/{cfg.steps}  loss {parts['loss']:.3f}  "
                f"mse_u {parts['mse_u']:.3f}  "
                f"{rate:.1f} it/s  eta {(cfg.steps - step - 1) / rate:.0f}s",
                flush=True,
            )

    classifier = LogisticRegression(max_iter=2000).fit(images.flatten(1).numpy(), labels.numpy())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    y = torch.arange(10).repeat_interleave(cfg.samples_per_class)
    noise = torch.randn(len(y), 1, 8, 8, generator=torch.Generator().manual_seed(cfg.seed + 1))
    with ema.swap_in(model):
        for omega in cfg.omegas:
            x = generate(model, noise, y, omega=omega).clamp(-1, 1)
            accuracy = (classifier.predict(x.flatten(1).numpy()) == y.numpy()).mean()
            path = out / f"samples_1nfe_omega{omega:g}.png"
            big = F.interpolate((x + 1) / 2, scale_factor=4, mode="nearest")
            save_image(big, path, nrow=cfg.samples_per_class, padding=2, pad_value=0.5)
            print(f"omega {omega:g}: classifier accuracy {accuracy:.1%} -> {path.resolve()}")


if __name__ == "__main__":
    main()
