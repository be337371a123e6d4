"""The feature extractors for evaluation, both behind torch-fidelity's FeatureExtractorBase.

inception   torch-fidelity's InceptionV3 (2048-d pool features, logits for IS) loaded from a
            local weights file; it is never downloaded at run time
classifier  the pixel classifier (tasks.features), registered with torch-fidelity as a custom
            extractor

A module of its own, imported only where features are extracted: torch-fidelity imports
torchvision, ~1.5 s of CPU that every process importing the config (each `imf` command, each
Ray worker unpickling one) paid for nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from tasks.features import CLASSIFIER_NAME, PixelClassifier, check_weights


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
