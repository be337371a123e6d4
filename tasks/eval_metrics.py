"""Metrics from merged unit sums, shared by `imf evaluate` (tasks.evaluate) and the evaluation
during training (tasks.inrun_eval).

    >>> summarize(parts, ref, "inception")   # {"n_samples", "fid", "is"} of the units' sums
    >>> real_calibration(real_parts, runner, ref, summary, e, rows)   # floor and ceiling

FID and IS of the merged float64 sums are exactly the single-pass numbers (accuracy too, with
classifier features); the calibration beside every FID is the real-data floor and the
class-mean ceiling, and precision / recall compare the first samples' features with real ones.
"""

from __future__ import annotations

import numpy as np
import torch

from imf_core.metrics import FeatureStats, ScoreStats, frechet_distance
from tasks.eval_units import real_indices

# Bumped when results.json gains content, so that older evaluations are redone (2: input
# sensitivity).
RESULTS_FORMAT = 2


def summarize(parts: list[dict], ref, kind: str) -> dict:
    """FID against `ref` (mu, sigma), IS and, with classifier features, class accuracy of the
    merged sums of `parts` (units' npz contents): the single-pass numbers exactly."""
    feats = FeatureStats.merge([FeatureStats(int(p["n"]), p["total"], p["outer"]) for p in parts])
    scores = ScoreStats.merge(
        [ScoreStats(int(p["n"]), p["p_sum"], float(p["plogp_sum"])) for p in parts]
    )
    mu, sigma = feats.mean_cov()
    out = {"n_samples": feats.n, "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    out["is"] = scores.inception_score()
    if kind == "classifier":
        out["accuracy"] = float(sum(float(p["correct"]) for p in parts) / feats.n)
    return out


def real_calibration(parts, runner, ref, summary, e, rows: int) -> dict:
    """The real-data floor (n training images against the same reference) and the class-mean
    ceiling (every sample the decoded mean latent of its class over those n rows: for pixel
    data, the class's mean image), with how the rows were drawn."""
    floor = summary(parts) | {"rows": real_indices(rows, e.n_samples, e.seed)[1]}
    sums = sum(p["class_sum"] for p in parts)
    counts = sum(p["class_count"] for p in parts)
    means = torch.from_numpy(sums / np.maximum(counts, 1)[:, None, None, None]).float()
    feats, logits = runner.features(means)
    labels = torch.arange(e.n_samples) % runner.num_classes
    per_class = torch.bincount(labels, minlength=runner.num_classes)
    stats = FeatureStats.weighted(feats, per_class)
    mu, sigma = stats.mean_cov()
    ceiling = {"n_samples": stats.n, "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    correct = (logits.argmax(1) == torch.arange(len(logits))).double()
    ceiling["accuracy"] = float((correct * per_class).sum() / stats.n)
    return {"real_data_floor": floor, "class_mean_ceiling": ceiling}


def precision_recall(generated: np.ndarray, real: np.ndarray) -> dict:
    """torch-fidelity's precision and recall (k = 3) of generated against real features."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    m = min(len(generated), len(real))
    out = prc_features_to_metric(
        torch.from_numpy(generated[:m]).double(),
        torch.from_numpy(real[:m]).double(),
        prc_neighborhood=3,
        prc_batch_size=10_000,
        save_cpu_ram=False,
        verbose=False,
    )
    return {"precision": out["precision"], "recall": out["recall"]}
