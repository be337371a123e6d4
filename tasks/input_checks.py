"""One check per input file of an experiment (tasks.inputs runs the ones a command reads): the
image folder, the SD-VAE folder, the Inception weights, the FID reference and given weights,
each returning a Finding."""

from __future__ import annotations

import functools
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.datasets import IMAGE_SUFFIXES
from tasks.input_digests import check_digest, known_by_digest, sha256_of


@dataclass(frozen=True)
class DatasetSpec:
    classes: int
    images: int
    class_name: re.Pattern  # every class folder's name
    named: str  # what the names are, for the message


DATASETS = {
    "imagenet1k": DatasetSpec(1000, 1_281_167, re.compile(r"n\d{8}"), "WordNet synset ids"),
}


# SD-VAE's architecture (config.json of sd-vae-ft-mse and sd-vae-ft-ema: the two are the same,
# so only the weights' digest tells the variants apart). scaling_factor: diffusers' default when
# the file (diffusers 0.4.2) does not set it.
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "scaling_factor": 0.18215,
}
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
INCEPTION_DIM = 2048  # the pool features FID uses


@dataclass
class Finding:
    """One input: what it is, its path, and "" when it is fine, else what is wrong."""

    what: str
    path: str
    key: str  # the config key that names it
    problem: str = ""
    note: str = ""  # what was verified, or what could not be
    missing: bool = False  # the file or folder is not there at all

    @property
    def ok(self) -> bool:
        return not self.problem

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.what:<22} {self.path}  {self.note}".rstrip()
        return f"FAIL  {self.what:<22} {self.path}  {self.problem} (set {self.key})"


def check_image_folder(root: str, dataset: str, sample: int = 0) -> Finding:
    """Class folders (names, count), the image count, and a decoded sample of `sample` images."""
    found = Finding(f"image folder{f' ({dataset})' if dataset else ''}", root, "data.root")
    base = Path(root)
    if not base.is_dir():
        found.problem, found.missing = "not a folder", True
        return found
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    spec = DATASETS.get(dataset)
    if spec is not None:
        odd = [c for c in classes if not spec.class_name.fullmatch(c)]
        if odd:
            found.problem = (
                f"{len(odd)} class folder(s) not named by {spec.named} (e.g. {odd[:3]}): "
                "labels come from the sorted names"
            )
            return found
        if len(classes) != spec.classes:
            found.problem = f"{len(classes):,} class folders, {dataset} has {spec.classes:,}"
            return found
    # memoised on each folder's mtime, which moves when an entry is added or removed
    stamps = tuple((c, (base / c).stat().st_mtime_ns) for c in classes)
    counts = _image_counts(str(base), stamps)
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if not classes or empty:
        found.problem = f"class folder(s) without images: {empty[:3]}" if empty else "no classes"
        return found
    total = sum(counts)
    if spec is not None and total != spec.images:
        found.problem = f"{total:,} images, {dataset} has {spec.images:,}: an incomplete copy?"
        return found
    found.note = f"{len(classes):,} classes, {total:,} images"
    if sample:
        bad = _undecodable(base, classes, sample)
        if bad:
            found.problem = f"{len(bad)} of {sample} sampled images do not decode: {bad[:3]}"
            return found
        found.note += f", {min(sample, len(classes))} sampled images decode"
    return found


@functools.lru_cache(maxsize=8)
def _image_counts(root: str, stamps: tuple[tuple[str, int], ...]) -> list[int]:
    """Images per class folder (by suffix, as tasks.datasets reads them; names only, no decode)."""
    counts = []
    for name, _ in stamps:
        with os.scandir(os.path.join(root, name)) as entries:
            counts.append(sum(Path(e.name).suffix in IMAGE_SUFFIXES for e in entries))
    return counts


def _undecodable(base: Path, classes: list[str], sample: int) -> list[str]:
    from PIL import Image

    step = max(1, len(classes) // sample)
    bad = []
    for name in classes[::step][:sample]:
        first = min(p for p in (base / name).iterdir() if p.suffix in IMAGE_SUFFIXES)
        try:
            with Image.open(first) as image:
                image.convert("RGB").load()
        except Exception:  # PIL raises several types for broken files
            bad.append(str(first))
    return bad


def check_vae(path: str, variant: str, published: bool) -> Finding:
    """A diffusers AutoencoderKL folder of SD-VAE's architecture whose weights are `variant`'s."""
    found = Finding(f"SD-VAE ft-{variant}", path, "tokenizer.path")
    folder = Path(path)
    if not folder.is_dir():
        found.problem, found.missing = "not a folder", True
        return found
    config_file = folder / "config.json"
    if not config_file.is_file():
        found.problem = (
            "has no config.json: not a diffusers AutoencoderKL folder (save one with "
            "AutoencoderKL.save_pretrained)"
        )
        found.missing = True
        return found
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        found.problem = f"config.json is not JSON: {err}"
        return found
    if config.get("_class_name") != "AutoencoderKL":
        found.problem = f"config.json names {config.get('_class_name')!r}, not AutoencoderKL"
        return found
    if published:
        config.setdefault("scaling_factor", SD_VAE_CONFIG["scaling_factor"])
        wrong = {k: config.get(k) for k, v in SD_VAE_CONFIG.items() if config.get(k) != v}
        if wrong:
            found.problem = (
                f"config.json is not SD-VAE's architecture: {wrong} "
                f"(SD-VAE: { {k: SD_VAE_CONFIG[k] for k in wrong} })"
            )
            return found
    weights = [folder / name for name in VAE_WEIGHTS if (folder / name).is_file()]
    if not weights:
        found.problem, found.missing = f"no weights file ({' or '.join(VAE_WEIGHTS)})", True
        return found
    notes = []
    for file in weights:
        problem, note = check_digest(file, f"sd_vae:{variant}", False)
        if problem:
            hint = " (or tokenizer.variant)" if "published sd_vae" in problem else ""
            found.problem = f"{file.name}: {problem}{hint}"
            return found
        notes.append(f"{file.name}: {note}")
    # diffusers loads the .safetensors when both are there: that one must be verified
    if published and "not verified" in notes[0]:
        notes[0] += " (only the folder's architecture is checked)"
    found.note = "; ".join(notes)
    return found


def check_inception(path: str, published: bool) -> Finding:
    from tasks.features import check_weights

    found = Finding("Inception weights", path, "eval.inception_weights")
    try:
        weights = check_weights("inception", path)
    except FileNotFoundError as err:
        found.problem, found.missing = str(err), True
        return found
    found.problem, found.note = check_digest(weights, "inception", published)
    return found


def check_reference(path: str, image_size: int, features: str) -> Finding:
    """An npz with mu (d,) and sigma (d, d) (d = 2048 for Inception), finite, sigma symmetric;
    its images' resolution when it holds them (ADM's batches do, as arr_0)."""
    found = Finding("FID reference", path, "eval.reference")
    file = Path(path)
    if not file.is_file():
        found.problem, found.missing = "is not a file", True
        return found
    try:
        with np.load(file) as ref:
            if not {"mu", "sigma"} <= set(ref.files):
                found.problem = f"has no mu and sigma (keys: {ref.files})"
                return found
            mu, sigma = ref["mu"], ref["sigma"]
            shape = _stored_shape(file, "arr_0") if "arr_0" in ref.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        found.problem = f"is not a readable npz (truncated?): {err}"
        return found
    d = INCEPTION_DIM if features == "inception" else mu.shape[0] if mu.ndim == 1 else -1
    if mu.shape != (d,) or sigma.shape != (d, d):
        found.problem = (
            f"mu {mu.shape} and sigma {sigma.shape}: {features} features need ({d},) and ({d}, {d})"
        )
        return found
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        found.problem = "mu or sigma holds NaN or inf"
        return found
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8):
        found.problem = "sigma is not symmetric: not a covariance"
        return found
    found.note = f"mu ({d},), sigma ({d}, {d})"
    known = known_by_digest(sha256_of(file))
    if known is not None and known.role == "reference":
        if known.resolution != image_size:
            found.problem = (
                f"this is {known.name}, the {known.resolution} x {known.resolution} reference; "
                f"the experiment samples {image_size} x {image_size}"
            )
            return found
        found.note += f", SHA-256 is the published {known.name}'s"
    if shape is not None:
        if len(shape) != 4 or shape[1:3] != (image_size, image_size):
            found.problem = (
                f"its images are {shape[1:3]}, the experiment's {image_size} x {image_size} "
                "(a reference of another resolution)"
            )
            return found
        found.note += f", {shape[0]:,} images of {image_size} x {image_size}"
    elif known is None:
        found.note += ", resolution not recorded in the file (SHA-256 not a known reference's)"
    return found


def _stored_shape(file: Path, name: str) -> tuple[int, ...]:
    """An npz member's shape from its header, without reading its data."""
    with zipfile.ZipFile(file) as archive, archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, _ = read(member)
    return tuple(shape)


def check_checkpoint(path: str, full: bool = False, expect: dict | None = None) -> Finding:
    """A weights file evaluation can load; `full` also reads its architecture (memory-mapped)
    and compares what the data fixes (`expect`: num_classes, in_channels) with it."""
    found = Finding("checkpoint", path, "eval.checkpoint")
    file = Path(path).expanduser()
    if not file.is_file():
        found.problem, found.missing = "is not a file", True
        return found
    if file.suffix not in (".pth", ".pt", ".safetensors"):
        found.problem = "expected an official release .pth (or .pt) or one of our ema.safetensors"
        return found
    found.note = f"{file.stat().st_size / 1e9:.2f} GB; SHA-256 not verified (none published)"
    if not full:
        return found
    try:
        model = _checkpoint_config(file)
    except Exception as err:  # torch.load and safetensors raise several types
        found.problem = f"could not be read as weights: {err}"
        return found
    wrong = {k: getattr(model, k) for k, v in (expect or {}).items() if getattr(model, k) != v}
    if wrong:
        found.problem = f"its model has {wrong}, the experiment's data needs {expect}"
        return found
    found.note += f"; depth {model.depth}, width {model.width}, {model.num_classes} classes"
    return found


def _checkpoint_config(file: Path):
    """The ModelConfig of an official .pth (from its shapes) or of our ema.safetensors."""
    import torch

    from imf_core.models.config import ModelConfig
    from imf_core.models.official import _strip, official_config

    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            return ModelConfig(**json.loads(f.metadata()["model_config"]))
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return official_config(_strip(state))
