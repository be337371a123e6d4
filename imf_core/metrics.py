"""Evaluation math in float64: mergeable feature statistics, FID, Inception Score.

Shards of samples are reduced to sums (n, sum x, sum x x^T; for IS, sum p and sum p log p),
which add exactly; merged sums give the same FID and IS as one pass over all samples.

    >>> stats = FeatureStats.of(features)           # one shard
    >>> total = FeatureStats.merge([a, b, c])
    >>> fid = frechet_distance(*total.mean_cov(), mu_ref, sigma_ref)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class FeatureStats:
    """Sufficient statistics of a set of feature vectors, in float64."""

    n: int
    total: np.ndarray  # (D,) sum of x
    outer: np.ndarray  # (D, D) sum of x x^T

    @classmethod
    def of(cls, features: Tensor | np.ndarray) -> FeatureStats:
        x = torch.as_tensor(features).to(torch.float64).reshape(len(features), -1)
        return cls(len(x), x.sum(0).numpy(), (x.T @ x).numpy())

    @classmethod
    def weighted(cls, features: Tensor | np.ndarray, counts: Tensor | np.ndarray) -> FeatureStats:
        """The statistics of a multiset: feature row k repeated counts[k] times."""
        x = torch.as_tensor(features).to(torch.float64).reshape(len(features), -1)
        c = torch.as_tensor(counts).to(torch.float64)
        return cls(int(c.sum()), (c[:, None] * x).sum(0).numpy(), (x.T @ (c[:, None] * x)).numpy())

    @classmethod
    def merge(cls, parts: list[FeatureStats]) -> FeatureStats:
        if not parts:
            raise ValueError("no statistics to merge")
        return cls(
            sum(p.n for p in parts), sum(p.total for p in parts), sum(p.outer for p in parts)
        )

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (as numpy.cov, which ADM's and torch-fidelity's use)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are
    real and non-negative for covariance matrices (tiny negative round-off is clipped).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


@dataclass
class ScoreStats:
    """Sums for the Inception Score over class probabilities p(y|x): n, sum p, sum p log p."""

    n: int
    p_sum: np.ndarray  # (K,)
    plogp_sum: float

    @classmethod
    def of(cls, logits: Tensor | np.ndarray) -> ScoreStats:
        logp = torch.log_softmax(torch.as_tensor(logits).to(torch.float64), dim=1)
        p = logp.exp()
        return cls(len(p), p.sum(0).numpy(), float((p * logp).sum()))

    @classmethod
    def merge(cls, parts: list[ScoreStats]) -> ScoreStats:
        return cls(
            sum(p.n for p in parts), sum(p.p_sum for p in parts), sum(p.plogp_sum for p in parts)
        )

    def inception_score(self) -> float:
        """exp(E_x KL(p(y|x) || p(y))) over all samples (one split)."""
        p_y = self.p_sum / self.n
        kl = self.plogp_sum / self.n - float((p_y * np.log(np.clip(p_y, 1e-300, None))).sum())
        return float(np.exp(kl))


def did_not_learn(
    fid: float, ceiling_fid: float | None, accuracy: float | None, num_classes: int
) -> bool:
    """The flag a model gets before any number of it stands beside the paper's: its samples'
    class accuracy is near chance (at most twice 1/K), or its FID is above half of what a
    generator of class-mean images scores on the same features (the ceiling)."""
    near_chance = accuracy is not None and accuracy <= 2.0 / num_classes
    above_ceiling = ceiling_fid is not None and fid > ceiling_fid / 2
    return near_chance or above_ceiling
