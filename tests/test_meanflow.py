"""The MeanFlow identity and the sampler, checked on a distribution with a closed-form flow.

For data x ~ N(mu, sigma^2 I) the marginal p_t is N((1 - t) mu, s_t^2 I), s_t^2 = (1 - t)^2 sigma^2
+ t^2, and the probability-flow ODE maps z_t to z_r = (1 - r) mu + (s_r / s_t)(z_t - (1 - t) mu).
So the average velocity u = (z_t - z_r) / (t - r) and the marginal velocity v are exact.
"""

import pytest
import torch

from imf_core.meanflow import compound_velocity, interpolate, sample, time_derivative

MU, SIGMA = 0.7, 0.3


def s(t):
    return ((1 - t) ** 2 * SIGMA**2 + t**2).sqrt()


def exact_u(z, r, t):
    r, t = r[:, None], t[:, None]
    z_r = (1 - r) * MU + s(r) / s(t) * (z - (1 - t) * MU)
    return (z - z_r) / (t - r)


def marginal_v(z, t):
    t = t[:, None]
    ds_dt = (-(1 - t) * SIGMA**2 + t) / s(t)
    return -MU + ds_dt / s(t) * (z - (1 - t) * MU)


def points(n=64, dim=5):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.1
    r = t * torch.rand(n, generator=g, dtype=torch.float64) * 0.95
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return z, r, t


def test_identity_holds_for_exact_average_velocity():
    z, r, t = points()
    V, u = compound_velocity(exact_u, z, r, t, marginal_v(z, t))
    torch.testing.assert_close(V, marginal_v(z, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u, exact_u(z, r, t))


def test_identity_fails_with_a_wrong_tangent():
    # The identity needs the marginal velocity as tangent; the conditional e - x is not it.
    z, r, t = points()
    V, _ = compound_velocity(exact_u, z, r, t, marginal_v(z, t) + 1.0)
    assert (V - marginal_v(z, t)).abs().max() > 1e-2


def test_jvp_term_carries_no_gradient():
    z, r, t = points()
    theta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)

    def u_fn(z_, r_, t_):
        return theta * exact_u(z_, r_, t_)

    V, u = compound_velocity(u_fn, z, r, t, marginal_v(z, t))
    V.sum().backward()
    # dV/dtheta = u_exact only; a gradient through the JVP would add (t - r) du/dt.
    torch.testing.assert_close(theta.grad, exact_u(z, r, t).sum())
    assert u.requires_grad


def test_jvp_on_a_subset_of_rows_matches_the_full_batch():
    z, r, t = points()
    v = marginal_v(z, t)
    rows = torch.arange(z.shape[0]) % 3 == 0
    V_full, _ = compound_velocity(exact_u, z, r, t, v)
    V_sub, _ = compound_velocity(exact_u, z, r, t, v, jvp_rows=rows)
    torch.testing.assert_close(V_sub[rows], V_full[rows])
    torch.testing.assert_close(V_sub[~rows], exact_u(z, r, t)[~rows])  # no JVP term there


def test_time_derivative_matches_finite_differences():
    z, r, t = points()
    v = marginal_v(z, t)
    eps = 1e-6
    fd = (exact_u(z + eps * v, r, t + eps) - exact_u(z - eps * v, r, t - eps)) / (2 * eps)
    torch.testing.assert_close(time_derivative(exact_u, z, r, t, v), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_with_exact_u_lands_on_the_data_distribution(steps):
    noise = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = sample(exact_u, noise, steps=steps)
    torch.testing.assert_close(x, MU + SIGMA * noise)  # the exact flow map, in any number of steps


def test_sampler_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        sample(exact_u, torch.zeros(1, 2), steps=0)


def test_interpolate_endpoints():
    x, e = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(interpolate(x, e, torch.zeros(4)), x)
    torch.testing.assert_close(interpolate(x, e, torch.ones(4)), e)
