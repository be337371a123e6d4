"""1-NFE sampling throughput, images/s, decode included.

    python -m benchmarks.sampling [--model tiny] [--batch 256] [--vae none|sd] [--bf16]

Generates with `imf_core.guidance.generate` (one network evaluation per image) and decodes:
`--vae sd` runs a randomly initialised SD-VAE decoder (the ft-mse architecture, so its cost
is the real one; no download) on 32x32x4 latents, `none` keeps the pixels. The last line is
JSON with `images_per_s` and the share of time in the decoder.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from imf_core.guidance import generate
from imf_core.models import create


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5, help="timed batches")
    parser.add_argument("--vae", choices=("none", "sd"), default="none")
    parser.add_argument("--omega", type=float, default=2.0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create(args.model).to(device).eval()
    cfg = model.cfg
    decoder = None
    if args.vae == "sd":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(  # the SD ft-mse architecture (diffusers' config of it)
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=256,
        )
        decoder = vae.to(device).eval()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def batch() -> tuple[float, float]:
        noise = torch.randn(args.batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        y = torch.arange(args.batch) % cfg.num_classes
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            sync()
            start = time.perf_counter()
            x = generate(model, noise.to(device), y.to(device), omega=args.omega, steps=1)
            sync()
            mid = time.perf_counter()
            if decoder is not None:
                x = decoder.decode(x / 0.18215).sample
            (127.5 * x.float() + 128).clamp(0, 255).to(torch.uint8)
            sync()
        return mid - start, time.perf_counter() - mid

    batch()  # warm-up
    timings = [batch() for _ in range(args.batches)]
    generate_s = statistics.median(t[0] for t in timings)
    decode_s = statistics.median(t[1] for t in timings)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    )
    result = {
        "model": args.model,
        "batch": args.batch,
        "vae": args.vae,
        "bf16": args.bf16,
        "device": device_name or "cpu",
        "images_per_s": round(args.batch / (generate_s + decode_s), 1),
        "decode_share": round(decode_s / (generate_s + decode_s), 3),
    }
    print(
        f"{args.model} 1-NFE, batch {args.batch}, decode {args.vae}: "
        f"{result['images_per_s']} images/s ({100 * result['decode_share']:.0f} % decoding)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
