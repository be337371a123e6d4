"""What evaluation measures with, in plain torch: the pixel classifier (a small CNN trained on
the pixel-space dataset during precompute: digits, mnist5k; its penultimate layer gives FID
features, its logits IS and the accuracy of conditional samples), the extractors' weights files,
and how samples become uint8. Both extractors behind torch-fidelity: tasks.extractors."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

CLASSIFIER_NAME = "imf-pixel-classifier"


class PixelClassifier(nn.Module):
    """Two conv layers, a 128-d feature layer and class logits, for small pixel images."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return F.relu(self.fc(x))  # (B, 128)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    steps: int = 400,
    seed: int = 0,
    progress: bool = False,
) -> PixelClassifier:
    """Fits the classifier on images in [-1, 1] (a few seconds on CPU for digits; minutes for
    mnist5k, hence the optional progress bar)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PixelClassifier(images.shape[1], num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    bar = tqdm(range(steps), desc="evaluation classifier", unit="step", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(images), (128,), generator=gen)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def save_classifier(model: PixelClassifier, path: Path) -> None:
    meta = {"channels": model.conv1.in_channels, "num_classes": model.head.out_features}
    torch.save({"meta": meta, "state": model.state_dict()}, path)


def check_weights(kind: str, weights: str | Path) -> Path:
    """The extractor's local weights file, or an error saying how to provide it."""
    path = Path(weights)
    if kind not in ("inception", "classifier"):
        raise ValueError(f"unknown eval.features {kind!r}: inception | classifier")
    if not path.is_file():
        raise FileNotFoundError(
            f"feature extractor weights {str(path)!r} not found: set eval.inception_weights to a "
            "local torch-fidelity InceptionV3 file (weights are never downloaded at run time)"
            if kind == "inception"
            else f"classifier weights {str(path)!r} not found (made by precompute for pixel data)"
        )
    return path


# How samples become uint8, recorded in every results.json entry.
UINT8_RULE = "round(clip(255 * (x + 1) / 2, 0, 255)), half to even (iMF PyTorch release)"


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 exactly as the official PyTorch evaluation converts them:
    np.round(np.clip((x + 1) / 2 * 255, 0, 255)) in float32, ties to even.

    The JAX release writes clip(127.5 x + 128) cast to uint8, i.e. the same value rounded half
    up: the two differ only where 255 (x + 1) / 2 is exactly k + 1/2 (tested). ADM's sampling
    scripts truncate (x + 1) * 127.5 instead, half a level darker on average, which moves FID.
    """
    return (((x.float() + 1) / 2) * 255).clamp(0, 255).round().to(torch.uint8)
