"""Feature extractors for evaluation, both behind torch-fidelity's FeatureExtractorBase.

inception   torch-fidelity's InceptionV3 (2048-d pool features, logits for IS) loaded from a
            local weights file; it is never downloaded at run time
classifier  a small CNN trained on the pixel-space dataset during precompute (digits,
            mnist5k), registered with torch-fidelity as a custom extractor; its penultimate
            layer gives FID features, its logits IS and the accuracy of conditional samples
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
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


class ClassifierExtractor(FeatureExtractorBase):
    """The pixel classifier as a torch-fidelity extractor: uint8 images -> features, logits."""

    def __init__(
        self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs
    ):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise ValueError(
                "the pixel classifier needs its weights path (made by the precompute stage)"
            )
        saved = torch.load(feature_extractor_weights_path, weights_only=True, map_location="cpu")
        self.model = PixelClassifier(**saved["meta"])
        self.model.load_state_dict(saved["state"])
        self.requires_grad_(False).eval()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = x.float() / 127.5 - 1.0  # uint8 back to [-1, 1], the range it was trained on
        feats = self.model.features(x)
        out = {"features": feats, "logits": self.model.head(feats)}
        return tuple(out[k] for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "features", "isc": "logits", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)


register_feature_extractor(CLASSIFIER_NAME, ClassifierExtractor)


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


def open_extractor(kind: str, weights: str | Path) -> FeatureExtractorBase:
    """(features, logits) extractor: "inception" from a local weights file, or "classifier"."""
    path = check_weights(kind, weights)
    if kind == "inception":
        return FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(path),
        )
    if kind == "classifier":
        return ClassifierExtractor(
            CLASSIFIER_NAME, ["features", "logits"], feature_extractor_weights_path=str(path)
        )


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
