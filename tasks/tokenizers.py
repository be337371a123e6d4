"""Tokenizers: images in [-1, 1] <-> the space the model is trained in.

pixel   identity (the embedded digits); a latent row is the image itself
sd_vae  diffusers AutoencoderKL (SD-VAE, ft-mse or ft-ema) from a local folder or a hub id;
        a latent row is the posterior's (mean, std) times the VAE's scaling factor, so
        training samples mean + std * eps each time it reads a row
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from imf_core.decoding import DecodeOptions, LatentDecoder

HUB_IDS = {"mse": "stabilityai/sd-vae-ft-mse", "ema": "stabilityai/sd-vae-ft-ema"}


def pick_device(device: str = "auto") -> torch.device:
    return torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else "cpu"
        if device == "auto"
        else device
    )


class PixelTokenizer:
    name = "pixel"
    stores_std = False

    def fingerprint(self) -> dict:
        return {"name": "pixel"}

    def encode(self, images: Tensor) -> Tensor:
        """(n, C, H, W) images -> (n, 1, C, H, W) rows (mean only: the map is deterministic)."""
        return images[:, None].float()

    def decode(self, latents: Tensor) -> Tensor:
        return latents


class SDVAETokenizer:
    """Stable Diffusion's VAE through diffusers' AutoencoderKL."""

    name = "sd_vae"
    stores_std = True

    def __init__(self, path: str = "", variant: str = "mse", device: str = "auto"):
        from diffusers import AutoencoderKL

        if variant not in HUB_IDS:
            raise ValueError(f"tokenizer.variant must be one of {sorted(HUB_IDS)}, got {variant!r}")
        source = path or HUB_IDS[variant]
        local = Path(source)
        if local.exists():
            config_file = local / "config.json"
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            if config.get("_class_name") != "AutoencoderKL":
                raise ValueError(
                    f"tokenizer.path {source!r} is not a diffusers AutoencoderKL folder "
                    f"(its config.json names {config.get('_class_name')!r})"
                )
        self.device = pick_device(device)
        try:
            self.vae = AutoencoderKL.from_pretrained(source).to(self.device).eval()
        except OSError as err:
            raise OSError(
                f"could not load the VAE {source!r}: pass a local folder with tokenizer.path "
                "(model weights cannot be downloaded at run time here)"
            ) from err
        self.scale = float(self.vae.config.scaling_factor)
        self._decoder: LatentDecoder | None = None  # made at the first decode
        self.source, self.variant = source, variant
        self._fingerprint = {
            "name": "sd_vae",
            "variant": variant,
            "source": source,
            "scale": self.scale,
        }
        if local.exists():  # content, not location, identifies local weights
            digest = hashlib.sha256()
            for f in sorted(local.iterdir()):
                if f.suffix in {".json", ".safetensors", ".bin"}:
                    digest.update(f.name.encode() + f.read_bytes())
            self._fingerprint |= {"source": "local", "sha256": digest.hexdigest()}

    def fingerprint(self) -> dict:
        return self._fingerprint

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(n, 3, H, W) in [-1, 1] -> (n, 2, 4, H/8, W/8): scaled posterior mean and std."""
        posterior = self.vae.encode(images.to(self.device)).latent_dist
        return torch.stack([posterior.mean, posterior.std], dim=1).float().cpu() * self.scale

    def decode(self, latents: Tensor) -> Tensor:
        """(n, 4, h, w) latents -> (n, 3, 8h, 8w) images in [-1, 1] (not clipped), float32 on
        the VAE's device: evaluation converts and embeds them there, with no trip to the host.
        On CUDA the decoder runs channels-last in bf16 (imf_core.decoding: the same uint8
        images to a level); on the CPU in float32 as it always did."""
        if self._decoder is None:
            options = DecodeOptions.fastest(self.device)
            self._decoder = LatentDecoder(self.vae, self.scale, options)
        return self._decoder(latents)


def open_tokenizer(name: str, path: str = "", variant: str = "mse", device: str = "auto"):
    if name == "pixel":
        return PixelTokenizer()
    if name == "sd_vae":
        return SDVAETokenizer(path, variant, device)
    raise ValueError(f"unknown tokenizer.name {name!r}: pixel | sd_vae")
