"""Evaluation math: merged shard statistics equal one pass; FID and IS against references."""

import numpy as np
import pytest
import torch
from scipy import linalg

from imf_core.metrics import FeatureStats, ScoreStats, frechet_distance


def test_merged_shards_equal_a_single_pass():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 16)) @ rng.standard_normal((16, 16)) + 3.0
    whole = FeatureStats.of(x)
    merged = FeatureStats.merge(
        [FeatureStats.of(x[a:b]) for a, b in ((0, 1), (1, 400), (400, 1000))]
    )
    assert merged.n == whole.n
    for a, b in zip(merged.mean_cov(), whole.mean_cov(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    mu, sigma = whole.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    logits = rng.standard_normal((1000, 10)) * 3
    is_whole = ScoreStats.of(logits).inception_score()
    is_merged = ScoreStats.merge(
        [ScoreStats.of(logits[:300]), ScoreStats.of(logits[300:])]
    ).inception_score()
    assert is_merged == pytest.approx(is_whole, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((500, 8)), rng.standard_normal((500, 8)) * 1.5 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="dimension"):
        frechet_distance(mu1, s1, mu2[:4], s2[:4, :4])


def test_inception_score_bounds():
    k = 10
    confident_and_diverse = torch.eye(k).repeat(5, 1) * 100  # each class, certain
    assert ScoreStats.of(confident_and_diverse).inception_score() == pytest.approx(k, rel=1e-6)
    uniform = torch.zeros(50, k)
    assert ScoreStats.of(uniform).inception_score() == pytest.approx(1.0, rel=1e-9)
