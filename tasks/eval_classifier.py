"""The evaluation classifier precompute trains on pixel data (digits, mnist5k): its features
stand in for Inception's, which knows nothing of 8x8 digits, and the training set's feature
statistics are the FID reference (`classifier.pt`, `reference.npz` in the precompute output).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from imf_core.metrics import FeatureStats
from tasks.features import save_classifier, to_uint8, train_classifier
from tasks.schema import DataConfig, PrecomputeConfig, TokenizerConfig
from tasks.storage import Output

CLASSIFIER_FILES = ("classifier.pt", "reference.npz")


def makes_classifier(data: DataConfig, tokenizer: TokenizerConfig, pre: PrecomputeConfig) -> bool:
    """Whether precompute trains the evaluation classifier: pixel data with classifier_steps."""
    return bool(pre.classifier_steps) and tokenizer.name == "pixel" and data.name != "parquet"


def fit_classifier(out: Output, names: list[str], num_classes: int, steps: int) -> float:
    """Trains the evaluation classifier on the shards' rows; writes it and the reference
    feature statistics of the training set (through the same uint8 path as samples)."""
    from tasks.extractors import open_extractor  # torch-fidelity: only when one is trained

    table = pa.concat_tables(out.read_table(n, columns=["latent", "label"]) for n in names)
    images = torch.from_numpy(table["latent"].combine_chunks().to_numpy_ndarray()[:, 0].copy())
    labels = torch.from_numpy(table["label"].to_numpy().astype(np.int64))
    model = train_classifier(images, labels, num_classes, steps, progress=True)
    with out.staged("classifier.pt") as tmp:
        save_classifier(model, tmp)
    extractor = open_extractor("classifier", out.local_path("classifier.pt"))
    with torch.no_grad():
        features, logits = extractor(to_uint8(images))
    stats = FeatureStats.of(features)
    mu, sigma = stats.mean_cov()
    out.write_arrays("reference.npz", mu=mu, sigma=sigma, n=stats.n)
    return float((logits.argmax(1) == labels).double().mean())
