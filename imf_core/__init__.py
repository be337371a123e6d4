"""Improved MeanFlow in pure torch: the networks, the objectives, guidance, sampling, metrics.

METHOD_VERSION names the numbers this package computes (draws, losses, gradients, samples,
metrics). Bump it, and add a line to METHOD_HISTORY, with any change that moves them -- even by
rounding: a training or evaluation made by another version is then reported as such wherever
the pipeline reuses it (`imf ... --recompute-stale` recomputes it). tests/test_method_version.py
pins the loss and gradients of a fixed batch and fails, asking for the bump, when the math or
the draws change; a change that only rounds differently (a kernel, a compiled grouping) it
cannot see: bump it when a fixed-seed training's numbers move.
"""

METHOD_VERSION = 3

# Versions 1 and 2 were assigned afterwards, from the commit log (outputs of that code record
# no version: the pipeline reports them as "made before method versions were recorded").
METHOD_HISTORY = {
    1: "2026-11-24 to 2026-12-03: the official token order, init and class-drop rows",
    2: "2026-12-04 (1864595): draws outside the loss, patch embedding as patchify + matmul, "
    "EMA and JVP reworked for one compiled graph; rounds differently from 1",
    3: "2026-12-06 (issue 35): draws keyed by (seed, step, global row), so a seed's noise "
    "differs from 2; du/dt from an explicit tangent pass; the r = t rows' guidance from the "
    "training forward",
}
