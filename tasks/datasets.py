"""Image datasets as (images in [-1, 1], labels) tensors, before any tokenizer."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).

    Returns images (N, 1, 8, 8) in [-1, 1] and labels (N,).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # pixel values are 0..16
    return torch.from_numpy(images)[:, None], torch.from_numpy(data.target.astype(np.int64))
