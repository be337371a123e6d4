"""CFG-conditioning: the samplers' distributions and the guided target's algebra."""

import pytest
import torch

from imf_core.guidance import (
    Conditions,
    GuidanceConfig,
    guided_target,
    sample_conditions,
    sample_interval,
    sample_omega,
)

N = 200_000


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
def test_omega_follows_the_power_law(beta):
    omega_max = 8.0
    w = sample_omega(N, omega_max, beta, torch.Generator().manual_seed(0)).double()
    assert w.min() >= 1.0 and w.max() <= omega_max
    # CDF of p(w) ∝ w^-beta on [1, w_max]; compare at its quantiles (a KS-style bound).
    q = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    if beta == 1.0:
        exact = omega_max**q
    else:
        a = 1 - beta
        exact = (1 + q * (omega_max**a - 1)) ** (1 / a)
    empirical = (w[:, None] <= exact[None]).double().mean(0)
    assert (empirical - q).abs().max() < 0.005


def test_interval_bounds():
    t_min, t_max = sample_interval(N, torch.Generator().manual_seed(0))
    assert 0 <= t_min.min() and t_min.max() <= 0.5 and 0.5 <= t_max.min() and t_max.max() <= 1
    assert t_min.mean().item() == pytest.approx(0.25, abs=0.005)
    assert t_max.mean().item() == pytest.approx(0.75, abs=0.005)


def test_conditions_per_mode():
    y = torch.randint(0, 10, (N,))
    boundary = torch.arange(N) < N // 2
    g = torch.Generator().manual_seed(0)
    cond, dropped = sample_conditions(GuidanceConfig(mode="none"), y, boundary, 10, g)
    assert not dropped.any() and (cond.omega == 1).all() and (cond.y == y).all()

    cond, dropped = sample_conditions(GuidanceConfig(mode="omega_interval"), y, boundary, 10, g)
    assert dropped.double().mean().item() == pytest.approx(0.1, abs=0.005)
    assert (cond.y[dropped] == 10).all() and (cond.y[~dropped] == y[~dropped]).all()
    assert (cond.t_min[boundary] == 0).all() and (cond.t_max[boundary] == 1).all()  # r = t rows
    assert (cond.t_min[~boundary] <= 0.5).all() and (cond.t_max[~boundary] >= 0.5).all()
    assert cond.omega.min() >= 1 and cond.omega.max() <= 8

    cond, _ = sample_conditions(GuidanceConfig(mode="omega"), y, boundary, 10, g)
    assert (cond.t_min == 0).all() and (cond.t_max == 1).all() and cond.omega.std() > 0.5


def test_bad_guidance_config_is_named():
    with pytest.raises(ValueError, match="guidance.mode"):
        GuidanceConfig(mode="cfg")
    with pytest.raises(ValueError, match="class_drop"):
        GuidanceConfig(class_drop=1.5)


class FakeV:
    """A 'model' whose conditional velocity is omega + 1 and whose unconditional one is 0.5."""

    def __init__(self, null):
        self.null = null
        self.seen = None

    def __call__(self, z, t, cond):
        self.seen = cond
        cond_v = (cond.omega + 1.0)[:, None]
        uncond = torch.full_like(cond_v, 0.5)
        return torch.where((cond.y == self.null)[:, None], uncond, cond_v).expand_as(z)


def test_cfg_is_off_outside_the_interval_and_for_dropped_rows():
    n, null = 6, 10
    z = torch.zeros(n, 3)
    v_data = torch.randn(n, 3)
    t = torch.tensor([0.1, 0.5, 0.9, 0.5, 0.5, 0.5])
    omega = torch.tensor([3.0, 3.0, 3.0, 2.0, 4.0, 3.0])
    cond = Conditions(torch.arange(n), omega, torch.full((n,), 0.2), torch.full((n,), 0.8))
    dropped = torch.tensor([False, False, False, False, False, True])
    fake = FakeV(null)
    target, v_c = guided_target(
        GuidanceConfig(mode="omega_interval"),
        fake,
        z,
        t,
        v_data,
        cond,
        torch.arange(n),
        dropped,
        null,
    )
    inside = torch.tensor([False, True, False, True, True, True])
    omega_eff = torch.where(inside, omega, 1.0)
    expected = v_data + ((1 - 1 / omega_eff) * (omega_eff + 1 - 0.5))[:, None]
    expected[5] = v_data[5]  # a dropped label regresses onto e - x
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(target[[0, 2]], v_data[[0, 2]])  # outside [t_min, t_max]: no CFG
    # The tangent is v_c at omega'.
    torch.testing.assert_close(v_c, (omega_eff + 1)[:, None].expand_as(z))
    # One batched call: conditional rows at omega', then unconditional rows at omega = 1.
    torch.testing.assert_close(fake.seen.omega, torch.cat([omega_eff, torch.ones(n)]))
    assert (fake.seen.y[n:] == null).all()


def test_fixed_mode_is_meanflows_target():
    n, null, w = 4, 10, 2.5
    z, v_data, t = torch.zeros(n, 2), torch.randn(n, 2), torch.full((n,), 0.5)
    cond = Conditions.unguided(torch.arange(n))
    dropped = torch.zeros(n, dtype=torch.bool)
    target, _ = guided_target(
        GuidanceConfig(mode="fixed", omega=w),
        FakeV(null),
        z,
        t,
        v_data,
        cond,
        torch.arange(n),
        dropped,
        null,
    )
    torch.testing.assert_close(target, w * v_data + (1 - w) * 0.5)  # omega v + (1 - omega) v_uncond
