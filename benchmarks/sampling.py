"""1-NFE sampling throughput, images/s: generation, decode and feature extraction, each timed.

    python -m benchmarks.sampling [--model tiny] [--batch 256] [--vae none|sd] [--inception]
                                  [--bf16]

Generates with `imf_core.guidance.generate` (one network evaluation per image) and decodes:
`--vae sd` runs a randomly initialised SD-VAE decoder (the ft-mse architecture, so its cost
is the real one; no download) on 32x32x4 latents as the evaluation decodes them on the device
(imf_core.decoding), `none` keeps the pixels. `--inception` adds torch-fidelity's InceptionV3
features of the uint8 images (what every FID point computes).
The last line is JSON with `images_per_s` overall and per stage.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from imf_core.guidance import generate
from imf_core.models import create


def uint8_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 as the evaluation converts (tasks.features.to_uint8)."""
    return (((x.float() + 1) / 2) * 255).clamp(0, 255).round().to(torch.uint8)


@torch.no_grad()
def sampling_rates(
    model: nn.Module,
    batch: int,
    batches: int = 5,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    extractor: nn.Module | None = None,
    bf16: bool = False,
    omega: float = 2.0,
) -> dict[str, float]:
    """Median seconds per batch of each stage, as images/s: generate (1-NFE), decode (latents ->
    images, e.g. imf_core.decoding.LatentDecoder), features (uint8 -> extractor) and all of them
    in a row."""
    device = next(model.parameters()).device
    cfg = model.cfg

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one() -> list[float]:
        noise = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        y = torch.arange(batch, device=device) % cfg.num_classes
        marks = [time.perf_counter()]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = generate(model, noise, y, omega=omega, steps=1)
            sync()
            marks.append(time.perf_counter())
            if decoder is not None:
                x = decoder(x)
                sync()
            marks.append(time.perf_counter())
        if extractor is not None:
            images = uint8_images(x)
            if images.shape[1] == 1:
                images = images.repeat(1, 3, 1, 1)
            extractor(images)
            sync()
        marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    one()  # warm-up
    stages = list(zip(*(one() for _ in range(batches)), strict=True))
    names = ("generate", "decode", "features")
    ran = (True, decoder is not None, extractor is not None)
    seconds = {n: statistics.median(s) for n, s, r in zip(names, stages, ran, strict=True) if r}
    return {"all": batch / sum(seconds.values())} | {n: batch / s for n, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5, help="timed batches")
    parser.add_argument("--vae", choices=("none", "sd"), default="none")
    parser.add_argument("--inception", action="store_true", help="InceptionV3 features too")
    parser.add_argument("--omega", type=float, default=2.0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from benchmarks.random_weights import inception_extractor, sd_vae
    from imf_core.decoding import DecodeOptions, LatentDecoder

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create(args.model).to(device).eval()
    decoder = None
    if args.vae == "sd":  # as the evaluation decodes on this device
        decoder = LatentDecoder(sd_vae().to(device).eval(), 0.18215, DecodeOptions.fastest(device))
    extractor = inception_extractor().to(device) if args.inception else None
    rates = sampling_rates(model, args.batch, args.batches, decoder, extractor, args.bf16)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    )
    result = {
        "model": args.model,
        "batch": args.batch,
        "vae": args.vae,
        "inception": args.inception,
        "bf16": args.bf16,
        "device": device_name or "cpu",
        "images_per_s": round(rates["all"], 1),
        "images_per_s_by_stage": {k: round(v, 1) for k, v in rates.items() if k != "all"},
    }
    print(
        f"{args.model} 1-NFE, batch {args.batch}, decode {args.vae}, inception "
        f"{args.inception}: {result['images_per_s']} images/s "
        f"(by stage: {result['images_per_s_by_stage']})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
