"""MeanFlow math: the interpolation path, the compound velocity and the few-step sampler.

Time convention (paper): z_t = (1 - t) x + t e, t = 0 is data, t = 1 is noise, and the
instantaneous velocity is v = e - x. u(z, r, t) is the average velocity over [r, t]:
z_r = z_t - (t - r) u(z_t, r, t).

    >>> V, u = compound_velocity(u_fn, z, r, t, v)   # iMF's V_theta, a v-prediction
    >>> x = sample(u_fn, noise, steps=1)              # 1-NFE generation
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# u_fn(z, r, t) -> u, with r and t of shape (B,) and u shaped like z.
UFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# du_dt_fn(z, r, t, v) -> du/dt along (v, 0, 1), computed by the network itself (explicitly).
DuDtFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def expand_like(s: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so that a per-sample scalar broadcasts over x."""
    return s.reshape(s.shape[0], *([1] * (x.ndim - 1)))


def interpolate(x: Tensor, e: Tensor, t: Tensor) -> Tensor:
    """z_t = (1 - t) x + t e (the flow-matching path)."""
    t = expand_like(t, x)
    return (1 - t) * x + t * e


def time_derivative(u_fn: UFn, z: Tensor, r: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """du/dt = v . d_z u + d_t u, the JVP of u_fn along the tangent (v, 0, 1).

    Computed without autograd history (the term is stop-gradient in every MeanFlow loss) and
    with the math SDPA backend: the fused kernels have no forward-mode AD rule.
    """
    # Fresh tensors, not views (the callers pass row slices): under torch.compile (torch 2.11)
    # a view of a dual tensor whose primal is itself a view fails an internal assert.
    z, r, t, v = z.clone(), r.clone(), t.clone(), v.to(z.dtype).clone()
    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, du_dt = torch.func.jvp(u_fn, (z, r, t), tangents)
    return du_dt


def explicit_time_derivative(
    du_dt_fn: DuDtFn, z: Tensor, r: Tensor, t: Tensor, v: Tensor
) -> Tensor:
    """du/dt by a network's own tangent pass (VelocityNet.u_and_tangent): what time_derivative
    computes, without forward-mode AD and its GEMMs by the weights' zero tangents."""
    with torch.no_grad():
        return du_dt_fn(z, r, t, v.to(z.dtype))


@functools.cache
def compiled_time_derivative(
    backend: str = "inductor", explicit: bool = False
) -> Callable[..., Tensor]:
    """(explicit_)time_derivative under torch.compile: fuses the JVP's many small element-wise
    ops, whose eager dispatch otherwise dominates its cost (one compile per input shape)."""
    derivative = explicit_time_derivative if explicit else time_derivative
    return torch.compile(derivative, dynamic=False, backend=backend)


def compound_velocity(
    u_fn: UFn,
    z: Tensor,
    r: Tensor,
    t: Tensor,
    v: Tensor,
    *,
    jvp_rows: Tensor | None = None,
    du_dt_fn: DuDtFn | None = None,
    compile_jvp: str | None = None,
    u: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """iMF's compound function V = u + (t - r) sg(du/dt), returned with u (paper, Sec. 4.1).

    By the MeanFlow identity, V equals the marginal velocity when u is the true average
    velocity and v the marginal velocity; iMF regresses V onto e - x. Only u carries gradient.

    The JVP term is multiplied by (t - r), so rows with r = t need none: pass `jvp_rows`
    (a bool mask or index) to differentiate only those rows. `du_dt_fn`, a network's explicit
    tangent pass for those rows, replaces the JVP of u_fn (torch.func.jvp, the reference for
    any u_fn). `compile_jvp`, a torch.compile
    backend ("inductor"), compiles that pass alone (for long runs: the first call compiles).
    `u`: u_fn(z, r, t) when the caller has it already (the training forward, run first to
    serve the guidance too); u_fn is then only differentiated, on `jvp_rows` (so it is the
    u_fn of those rows).
    """
    # `is None` tests, never a function's truth (`or`), which torch 2.11 cannot trace
    explicit = du_dt_fn is not None
    if explicit:
        fn, derivative = du_dt_fn, explicit_time_derivative
    else:
        fn, derivative = u_fn, time_derivative
    if compile_jvp:
        derivative = compiled_time_derivative(compile_jvp, explicit)
    if jvp_rows is None:
        du_dt = derivative(fn, z, r, t, v)
    else:
        sub = derivative(fn, z[jvp_rows], r[jvp_rows], t[jvp_rows], v[jvp_rows])
        du_dt = sub.new_zeros(z.shape)  # in the JVP's dtype (bf16 under autocast)
        du_dt[jvp_rows] = sub
    if u is None:
        u = u_fn(z, r, t)
    return u + expand_like(t - r, z) * du_dt, u


@torch.no_grad()
def sample(u_fn: UFn, noise: Tensor, steps: int = 1) -> Tensor:
    """Generate from noise at t = 1 with `steps` evaluations of u: z_r = z_t - (t - r) u(z_t, r, t).

    The steps split [0, 1] evenly; steps=1 is 1-NFE generation, steps=2 the paper's 2-NFE.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1, device=noise.device, dtype=noise.dtype)
    z = noise
    for t_now, r_next in zip(grid[:-1], grid[1:], strict=True):
        t = t_now.expand(z.shape[0])
        r = r_next.expand(z.shape[0])
        z = z - expand_like(t - r, z) * u_fn(z, r, t)
    return z


@torch.no_grad()
def sample_euler(v_fn: Callable[[Tensor, Tensor], Tensor], noise: Tensor, steps: int) -> Tensor:
    """Many-step Euler integration of an instantaneous velocity v_fn(z, t) from t = 1 to 0.

    With v_fn = the boundary u(z, t, t) of a MeanFlow network, this measures what the network
    knows about the data apart from its one-step map: a calibration for 1-NFE numbers.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1, device=noise.device, dtype=noise.dtype)
    z = noise
    for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
        z = z - (t_now - t_next) * v_fn(z, t_now.expand(z.shape[0]))
    return z
