"""imf_core.METHOD_VERSION is pinned to the numbers the method computes, so that reuse knows
which code made an output (tasks.artifacts.begin, the report's "method version" column).

Two steps of the `tiny` network in float64 on the CPU (the draws of DrawKey(seed, step), the
iMF loss with its guidance passes, JVP and aux head, AdamW, EMA), then a one-step sample: the
numbers below belong to one method version. When this test fails, the change moved the
method's numbers: bump METHOD_VERSION in imf_core/__init__.py, say what changed in
METHOD_HISTORY, and record the new version's numbers here. (A change that only rounds
differently in float32 -- a kernel, a compiled grouping -- this float64 pin cannot see: bump
the version by hand when a fixed-seed training's numbers move.)
"""

import math

import torch

from imf_core import METHOD_HISTORY, METHOD_VERSION
from imf_core.ema import EMA
from imf_core.guidance import GuidanceConfig, generate
from imf_core.models import build, preset
from imf_core.objectives import LossSpec, ObjectiveConfig
from imf_core.training import OptimConfig, make_optimizer, train_step

# METHOD_VERSION -> the numbers of method_numbers()
PINNED: dict[int, dict[str, float]] = {
    3: {
        "step 0 loss": 1.9998413993755557,
        "step 0 mse_u": 2.019452986823545,
        "step 0 loss_v": 0.9999206996877779,
        "step 0 mse_v": 2.019452986823545,
        "step 0 grad_norm": 0.4396143907882792,
        "step 1 loss": 1.9998383730755882,
        "step 1 mse_u": 1.9949409934799391,
        "step 1 loss_v": 0.9999191865409698,
        "step 1 mse_v": 1.994941170046681,
        "step 1 grad_norm": 0.5478498248684434,
        "EMA weights": 935.7740317412837,
        "1-NFE sample": 13.619867163680638,
    },
}


def method_numbers() -> dict[str, float]:
    """Each step's loss parts and gradient norm, the EMA's weight sum, a 1-NFE sample's sum."""
    torch.manual_seed(0)
    model = build(preset("tiny")).double()
    optim = OptimConfig()
    optimizer = make_optimizer(model, optim)
    ema = EMA(model, decay=0.9)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(16) % 10
    numbers = {}
    for step in range(2):
        parts = train_step(
            model,
            optimizer,
            ema,
            x,
            y,
            LossSpec(ObjectiveConfig(), GuidanceConfig(), 10),
            step,
            optim,
            seed=5,
        )
        numbers |= {f"step {step} {name}": float(value) for name, value in parts.items()}
    numbers["EMA weights"] = sum(float(p.double().sum()) for p in ema.shadow.values())
    with torch.no_grad():
        noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        sample = generate(model, noise.double(), torch.arange(4), omega=2.0)
    numbers["1-NFE sample"] = float(sample.sum())
    return numbers


def test_the_method_version_names_the_methods_numbers():
    assert METHOD_VERSION in METHOD_HISTORY, "say in METHOD_HISTORY what the new version changed"
    assert METHOD_VERSION in PINNED, (
        f"METHOD_VERSION {METHOD_VERSION} has no pinned numbers: record method_numbers() in PINNED"
    )
    pinned = PINNED[METHOD_VERSION]
    measured = method_numbers()
    assert set(measured) == set(pinned), "pin every number method_numbers() measures"
    for name, got in measured.items():
        assert math.isclose(got, pinned[name], rel_tol=1e-9), (
            f"{name}: {got!r}, pinned {pinned[name]!r} for method version {METHOD_VERSION}: the "
            "method's numbers moved; bump imf_core.METHOD_VERSION, say why in METHOD_HISTORY and "
            "pin the new numbers here (outputs of the old version are then reported as stale)"
        )
