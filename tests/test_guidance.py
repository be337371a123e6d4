"""CFG-conditioning: the samplers' distributions and the guided target's algebra."""

import pytest
import torch
from torch import nn

from imf_core.guidance import (
    SENSITIVITY_OMEGA,
    Conditions,
    GuidanceConfig,
    guided_target,
    ignores_omega,
    input_sensitivity,
    sample_conditions,
    sample_interval,
    sample_omega,
)
from imf_core.models import create
from imf_core.models.config import ModelConfig

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


def conditions(cfg: GuidanceConfig, y, boundary, g) -> tuple[Conditions, torch.Tensor]:
    """The training conditions of labels y and the dropped rows' mask."""
    drawn = sample_conditions(cfg, boundary, g)
    return drawn.conditions(y, 10), drawn.dropped


def test_conditions_per_mode():
    y = torch.randint(0, 10, (N,))
    boundary = torch.arange(N) < N // 2
    g = torch.Generator().manual_seed(0)
    cond, dropped = conditions(GuidanceConfig(mode="none"), y, boundary, g)
    # Both official codes drop labels whatever their guidance (MF's guidance_eq="none" too).
    assert dropped.double().mean().item() == pytest.approx(0.1, abs=0.005)
    assert (cond.omega == 1).all() and (cond.y[~dropped] == y[~dropped]).all()
    cond, _ = conditions(GuidanceConfig(mode="none", class_drop=0.0), y, boundary, g)
    assert (cond.y == y).all()

    cond, dropped = conditions(GuidanceConfig(mode="omega_interval"), y, boundary, g)
    assert dropped.double().mean().item() == pytest.approx(0.1, abs=0.005)
    assert (cond.y[dropped] == 10).all() and (cond.y[~dropped] == y[~dropped]).all()
    assert (cond.t_min[boundary] == 0).all() and (cond.t_max[boundary] == 1).all()  # r = t rows
    assert (cond.t_min[~boundary] <= 0.5).all() and (cond.t_max[~boundary] >= 0.5).all()
    assert cond.omega.min() >= 1 and cond.omega.max() <= 8

    cond, _ = conditions(GuidanceConfig(mode="omega"), y, boundary, g)
    assert (cond.t_min == 0).all() and (cond.t_max == 1).all() and cond.omega.std() > 0.5


def test_the_first_rows_lose_their_label_as_in_the_official_code():
    """num_drop ~ Binomial(B, 0.1), then rows 0..num_drop-1: the r = t rows (sample_t_r puts
    them first), so no r != t row is ever unconditional."""
    b, trials = 256, 400
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (b,))
    boundary = torch.arange(b) < b // 2
    counts = []
    for _ in range(trials):
        cond, dropped = conditions(GuidanceConfig(), y, boundary, g)
        k = int(dropped.sum())
        assert dropped[:k].all() and not dropped[k:].any()  # a prefix of the batch
        assert not (dropped & ~boundary).any()  # only r = t rows
        assert (cond.y[:k] == 10).all() and (cond.y[k:] == y[k:]).all()
        counts.append(k)
    counts = torch.tensor(counts, dtype=torch.float64)
    # Binomial(256, 0.1): mean 25.6, sd 4.8; the mean of 400 draws within ~4 standard errors.
    assert counts.mean().item() == pytest.approx(25.6, abs=1.0)
    assert counts.std().item() == pytest.approx((b * 0.1 * 0.9) ** 0.5, rel=0.15)


def test_random_rows_are_the_named_ablation():
    b = 4096
    g = torch.Generator().manual_seed(0)
    boundary = torch.arange(b) < b // 2
    cfg = GuidanceConfig(drop_rows="random")
    dropped = sample_conditions(cfg, boundary, g).dropped
    # Independent rows: r != t rows lose labels too, at the same rate.
    assert dropped[~boundary].double().mean().item() == pytest.approx(0.1, abs=0.02)
    assert dropped[boundary].double().mean().item() == pytest.approx(0.1, abs=0.02)


def test_the_row_rule_splits_over_ranks_like_one_process():
    b, world = 64, 4
    boundary = torch.arange(b) < b // 2
    whole = sample_conditions(GuidanceConfig(), boundary, torch.Generator().manual_seed(3))
    for rank in range(world):
        part = sample_conditions(
            GuidanceConfig(),
            boundary[rank::world],
            torch.Generator().manual_seed(3),
            shard=(rank, world),
        )
        assert torch.equal(part.dropped, whole.dropped[rank::world])


def test_bad_guidance_config_is_named():
    with pytest.raises(ValueError, match="guidance.mode"):
        GuidanceConfig(mode="cfg")
    with pytest.raises(ValueError, match="class_drop"):
        GuidanceConfig(class_drop=1.5)
    with pytest.raises(ValueError, match="drop_rows"):
        GuidanceConfig(drop_rows="last")
    with pytest.raises(ValueError, match="kappa"):
        GuidanceConfig(mode="fixed", kappa=1.0)
    with pytest.raises(ValueError, match="t_start"):
        GuidanceConfig(mode="fixed", t_start=0.6, t_end=0.4)
    with pytest.raises(ValueError, match="guidance.kappa applies to guidance.mode=fixed"):
        GuidanceConfig(mode="omega", kappa=0.5)


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


def fixed_target(cfg, t, v_data):
    n = t.shape[0]
    z = torch.zeros(n, 2)
    fake = FakeV(10)
    target, v_c = guided_target(
        cfg,
        fake,
        z,
        t,
        v_data,
        Conditions.unguided(torch.arange(n)),
        torch.arange(n),
        torch.zeros(n, dtype=torch.bool),
        10,
    )
    return target, v_c, fake


def test_fixed_mode_is_meanflows_target():
    n, w = 4, 2.5
    v_data, t = torch.randn(n, 2), torch.full((n,), 0.5)
    target, _, fake = fixed_target(GuidanceConfig(mode="fixed", omega=w), t, v_data)
    torch.testing.assert_close(target, w * v_data + (1 - w) * 0.5)  # omega v + (1 - omega) v_uncond
    assert (fake.seen.omega == 1).all()  # the network never sees omega in fixed mode


def test_kappa_target_is_meanflows_release_formula():
    """v_g = omega v + (1 - omega - kappa) v_u + kappa v_c inside [t_start, t_end] (MF's code,
    its release default omega 1, kappa 0.5), plain e - x outside."""
    v_data = torch.randn(5, 2)
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95])
    cfg = GuidanceConfig(mode="fixed", omega=1.0, kappa=0.5, t_start=0.1, t_end=0.9)
    target, v_c, _ = fixed_target(cfg, t, v_data)
    v_u, v_cond = 0.5, 2.0  # FakeV: unconditional 0.5, conditional omega_in + 1 = 2
    inside = torch.tensor([False, True, True, True, False])
    expected = torch.where(
        inside[:, None], 1.0 * v_data + (1 - 1.0 - 0.5) * v_u + 0.5 * v_cond, v_data
    )
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(v_c, torch.full_like(v_c, v_cond))
    # omega / (1 - kappa) is MF's effective scale: a model whose conditional prediction already
    # is the guided field 2 v + (1 - 2) v_u is a fixed point of both (omega 2, kappa 0) and
    # (omega 1, kappa 0.5) -- the release default trains towards the same field as omega = 2.
    perfect = GuidanceConfig(mode="fixed", omega=2.0)
    released = GuidanceConfig(mode="fixed", omega=1.0, kappa=0.5)
    z = torch.zeros(3, 2)
    v = torch.randn(3, 2)
    t3 = torch.full((3,), 0.5)

    def oracle(z_, t_, cond):
        guided = (2 * v - 0.3).repeat(2, 1)
        return torch.where((cond.y == 10)[:, None], torch.full_like(z_, 0.3), guided)

    args = (
        z,
        t3,
        v,
        Conditions.unguided(torch.arange(3)),
        torch.arange(3),
        torch.zeros(3, dtype=torch.bool),
        10,
    )
    a, _ = guided_target(perfect, oracle, *args)
    b, _ = guided_target(released, oracle, *args)
    torch.testing.assert_close(a, 2 * v - 0.3)
    torch.testing.assert_close(b, 2 * v - 0.3)


class ScaledByConditions(nn.Module):
    """u = z * (omega ** a) * (1 + b [class is null]): its sensitivities are known exactly."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.cfg = ModelConfig(input_size=8, in_channels=1, num_classes=10, width=64, heads=4)
        self.a, self.b = a, b

    def forward(self, z, t, h, cond):
        null = (cond.y == self.cfg.num_classes).to(z.dtype)
        return z * (cond.omega**self.a * (1 + self.b * null))[:, None, None, None]


def test_input_sensitivity_is_the_relative_change_of_u():
    noise, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    s = input_sensitivity(ScaledByConditions(a=1.0, b=0.5), noise, y)
    for point in ("one_step", "mid"):
        assert s["omega"][point] == pytest.approx(SENSITIVITY_OMEGA - 1.0)  # |2z - z| / |z|
        assert s["class"][point] == pytest.approx(0.5)
        assert s["interval"][point] == 0.0  # the toy takes no interval
    assert "t" not in s  # not an input of this network (cond_t is off)
    assert ignores_omega(s) is False
    blind = input_sensitivity(ScaledByConditions(a=0.0, b=0.5), noise, y)
    assert blind["omega"]["one_step"] == 0.0 and ignores_omega(blind) is True


def trained_like(model: nn.Module) -> nn.Module:
    """The official init, with the zero-initialised gates and output layers made random."""
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if not p.any():
            p.data = 0.5 * torch.randn(p.shape, generator=gen)
    return model.eval()


def test_a_network_without_an_omega_path_is_flagged_and_one_with_a_strong_path_is_not():
    noise, y = torch.randn(64, 1, 8, 8), torch.arange(64) % 10
    torch.manual_seed(0)
    model = trained_like(create("tiny"))
    omega_out = model.embedders.omega.mlp[2]
    with torch.no_grad():
        omega_out.weight.zero_(), omega_out.bias.zero_()  # the omega token is a constant
    blind = input_sensitivity(model, noise, y)
    assert blind["omega"] == {"one_step": 0.0, "mid": 0.0}
    assert blind["class"]["one_step"] > 0 and ignores_omega(blind) is True
    # The same network with omega's sinusoids spread over their periods (the embedder's input
    # x1000): omega moves u as much as the class does.
    torch.manual_seed(0)
    strong = input_sensitivity(trained_like(create("tiny", omega_input_scale=1000.0)), noise, y)
    assert strong["omega"]["one_step"] > 0.3 * strong["class"]["one_step"]
    assert ignores_omega(strong) is False


def test_sensitivity_covers_the_inputs_a_network_has():
    noise, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    mf = trained_like(
        create(
            "tiny",
            conditioning="adaln",
            blocks="plain",
            cond_t=True,
            cond_omega=False,
            cond_interval=False,
        )
    )
    s = input_sensitivity(mf, noise, y)
    assert set(s) == {"class", "t"} and set(s["t"]) == {"mid"} and s["t"]["mid"] > 0
    assert ignores_omega(s) is None  # no omega input: nothing to ignore
