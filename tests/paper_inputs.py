"""Stand-ins for the paper-scale input files (tasks.inputs checks them before any work): ImageNet
as 3 synset-named classes of 2 images, SD-VAE, Inception and the FID reference as small files,
with the expectations (class and image counts, published digests) scaled to them."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from tasks import input_checks, input_digests
from tasks.input_checks import DatasetSpec
from tasks.input_digests import KnownFile

VAE_BYTES = {"mse": b"sd-vae-ft-mse weights", "ema": b"sd-vae-ft-ema weights"}
INCEPTION_BYTES = b"inception weights"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scale_expectations(monkeypatch) -> None:
    """ImageNet is these 3 classes of 2 images; the published files are these bytes."""
    monkeypatch.setitem(
        input_checks.DATASETS, "imagenet1k", DatasetSpec(3, 6, re.compile(r"n\d{8}"), "synset ids")
    )
    known = (
        KnownFile("sd_vae:mse", "diffusion_pytorch_model.bin", "u", digest(VAE_BYTES["mse"]), ""),
        KnownFile("sd_vae:ema", "diffusion_pytorch_model.bin", "u", digest(VAE_BYTES["ema"]), ""),
        KnownFile("inception", "w.pth", "u", digest(INCEPTION_BYTES), ""),
    )
    monkeypatch.setattr(input_digests, "KNOWN_FILES", known)


def make_image_folder(train: Path) -> Path:
    for i in range(3):
        folder = train / f"n{i:08d}"
        folder.mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8), (40 * i, 60 * j, 0)).save(folder / f"img{j}.JPEG")
    return train


def make_vae(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(input_checks.SD_VAE_CONFIG))
    (folder / "diffusion_pytorch_model.bin").write_bytes(VAE_BYTES["mse"])
    return folder


def make_inception(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(INCEPTION_BYTES)
    return path


def write_reference(path: Path, dim: int = 2048, images: tuple | None = (2, 256, 256, 3)) -> Path:
    """mu, sigma (and, as ADM's batches hold them, the images' array arr_0)."""
    arrays = {"mu": np.zeros(dim), "sigma": np.eye(dim)}
    if images is not None:
        arrays["arr_0"] = np.zeros(images, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


MAKERS = {
    "data.root": make_image_folder,
    "tokenizer.path": make_vae,
    "eval.inception_weights": make_inception,
    "eval.reference": write_reference,
}


def make_paper_inputs(root: Path) -> dict[str, Path]:
    """Every file imagenet_b2 names, each one as the checks want it, by its config key."""
    names = {
        "data.root": "imagenet/train",
        "tokenizer.path": "sd-vae-ft-mse",
        "eval.inception_weights": "weights-inception-2015-12-05-6726825d.pth",
        "eval.reference": "VIRTUAL_imagenet256_labeled.npz",
    }
    return {key: MAKERS[key](root / name) for key, name in names.items()}
