"""Training objectives: flow matching, original MeanFlow and the two iMF variants (paper, Sec. 4).

All four share one loss: the compound velocity V = u + (t - r) sg(du/dt) regressed onto the
(guided) velocity target, with MF's adaptive weighting loss / sg((loss + eps)^p). What differs
is the JVP tangent, and so what the loss means:

  fm            r = t for every row, so V = u: plain flow matching (v-prediction).
  mf            tangent = the target velocity itself (e - x, or MF's guided one): the same
                number as MF's ||u - sg(v - (t - r) du/dt)||^2, a network-dependent target.
  imf_boundary  tangent = the model's marginal-velocity estimate u(z_t, t, t) (boundary).
  imf_aux       tangent = an auxiliary v-head's estimate, plus that head's own FM loss.

    >>> loss, parts = imf_loss(model, x, y, cfg, guidance, num_classes=10)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from imf_core.guidance import Conditions, GuidanceConfig, guided_target, sample_conditions
from imf_core.meanflow import compound_velocity, interpolate

OBJECTIVES = ("fm", "mf", "imf_boundary", "imf_aux")


@dataclass
class ObjectiveConfig:
    name: str = "imf_aux"  # fm | mf | imf_boundary | imf_aux
    p_mean: float = -0.4  # logit-normal time sampler: sigmoid(N(p_mean, p_std))
    p_std: float = 1.0  # (Tab. 4: -0.4, 1.0)
    boundary_share: float = 0.5  # share of rows with r = t (paper: 50 % have r != t)
    adaptive_p: float = 1.0  # adaptive weighting power p
    adaptive_eps: float = 0.01  # weight = 1 / (loss + eps)^p (MeanFlow)

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective.name must be one of {OBJECTIVES}, got {self.name!r}")
        if not 0.0 <= self.boundary_share <= 1.0:
            raise ValueError(
                f"objective.boundary_share must be in [0, 1], got {self.boundary_share}"
            )


def boundary_rows(n: int, cfg: ObjectiveConfig) -> int:
    """How many of n rows get r = t (all for flow matching): the first ones of the batch."""
    return int(n * (1.0 if cfg.name == "fm" else cfg.boundary_share))


def sample_t_r(
    n: int, cfg: ObjectiveConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(t, r): two logit-normal draws sorted so t >= r; the first boundary_share rows get r = t."""
    draws = torch.sigmoid(torch.randn(2, n, generator=generator) * cfg.p_std + cfg.p_mean)
    t, r = draws.max(dim=0).values, draws.min(dim=0).values
    k = boundary_rows(n, cfg)
    r[:k] = t[:k]
    return t, r


def adaptive_weighted(per_sample_sq_err: Tensor, cfg: ObjectiveConfig) -> Tensor:
    """MF's adaptive weighting: loss / sg((loss + eps)^p), per sample."""
    weight = (per_sample_sq_err.detach() + cfg.adaptive_eps) ** cfg.adaptive_p
    return per_sample_sq_err / weight


def _sq_err(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).flatten(1).sum(dim=1)


class Draws(NamedTuple):
    """Everything random in one batch, drawn before the loss so that the loss itself is a pure
    tensor function (what torch.compile captures whole, train.compile=step)."""

    t: Tensor  # (B,) time, t >= r
    r: Tensor  # (B,)
    e: Tensor  # (B, C, S, S) noise
    cond: Conditions  # the sampled network conditions (class drop, omega, interval)
    dropped: Tensor  # (B,) bool: rows whose label became the null class
    jvp_from: int  # rows [jvp_from, B) have r != t: the r = t rows are a prefix of the batch

    def micro(self, k: int, steps: int) -> Draws:
        """The draws of micro-step k of `steps` (gradient accumulation, train.micro_batch):
        rows k::steps, the rows a data-parallel split over `steps` more ranks would hold. The
        r = t rows stay a prefix, in the same share in every micro-batch (one compiled graph)."""
        rows = slice(k, None, steps)
        t, r, e, cond, dropped, jvp_from = self
        return Draws(
            t[rows],
            r[rows],
            e[rows],
            cond.select(rows),
            dropped[rows],
            len(range(k, jvp_from, steps)),
        )


def draw(
    x: Tensor,
    y: Tensor,
    cfg: ObjectiveConfig,
    guidance: GuidanceConfig,
    num_classes: int,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Draws:
    """The batch's random draws, made for the global batch of shard=(rank, world) in a fixed
    order (the official code's: (t, r), noise, then the conditions) and kept at rows rank::world,
    which are the rows a DistributedSampler gives this rank."""
    device, n = x.device, x.shape[0]
    rank, world = shard
    t, r = (s[rank::world].to(device) for s in sample_t_r(n * world, cfg, generator))
    e = torch.randn((n * world, *x.shape[1:]), generator=generator)[rank::world].to(device)
    # The first int(N * share) global rows have r = t; this rank's among them are a prefix.
    jvp_from = len(range(rank, boundary_rows(n * world, cfg), world))
    boundary = torch.arange(n, device=device) < jvp_from
    cond, dropped = sample_conditions(guidance, y, boundary, num_classes, generator, shard)
    return Draws(t, r, e, cond, dropped, jvp_from)


def imf_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: ObjectiveConfig,
    guidance: GuidanceConfig,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
    compile_jvp: str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[Tensor, dict[str, Tensor]]:
    """One batch of any objective. Returns the scalar loss and its named parts (detached).

    `model` is called as model(z, t, h, cond, heads) with h = t - r, and du/dt comes from
    model.u_and_tangent where it has one; `compile_jvp` (a torch.compile backend) compiles
    the JVP pass alone (meanflow.compound_velocity). With shard=(rank, world) under data
    parallelism, every random draw is made for the global batch and this rank keeps its rows
    (see `draw`): W ranks then compute exactly the loss one process computes on the whole
    global batch.
    Parts: `loss` (the optimised, weighted loss), `mse_u` (unweighted ||V - target||^2 per
    element: with adaptive weighting the loss sits near 1, so this is what shows learning) and,
    for imf_aux, `loss_v`, `mse_v`.
    """
    draws = draw(x, y, cfg, guidance, num_classes, generator, shard)
    return loss_of_draws(model, x, y, draws, cfg, guidance, num_classes, compile_jvp=compile_jvp)


def loss_of_draws(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    draws: Draws,
    cfg: ObjectiveConfig,
    guidance: GuidanceConfig,
    num_classes: int,
    *,
    compile_jvp: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """imf_loss given its draws: no randomness, no data-dependent shapes, no host syncs, so that
    torch.compile can take it whole, with its backward (imf_core.training, compile=step).
    The model is the bare module: data parallelism averages gradients after the backward
    (training.average_gradients), so no DDP hook sits in the no-grad or JVP passes."""
    aux = cfg.name == "imf_aux"
    if aux and not getattr(model, "has_aux_head", False):
        raise ValueError(
            "objective imf_aux needs a model with an auxiliary v-head (aux_head_depth > 0)"
        )
    t, r, e, cond, dropped, jvp_from = draws
    z = interpolate(x, e, t)
    v_data = e - x
    jvp_rows = slice(jvp_from, None)

    def v_boundary(z_: Tensor, t_: Tensor, c: Conditions) -> Tensor:
        """The model's own marginal-velocity estimate: the aux head, else u at r = t."""
        return model(z_, t_, torch.zeros_like(t_), c, "v" if aux else "u")

    tangent = v_data
    if guidance.mode == "none":
        target = v_data
        if cfg.name in ("imf_boundary", "imf_aux"):
            with torch.no_grad():
                v_rows = v_boundary(z[jvp_rows], t[jvp_rows], cond.select(jvp_rows))
            tangent = torch.cat([torch.zeros_like(z[:jvp_from]), v_rows.to(z.dtype)])
    else:
        target, v_c = guided_target(
            guidance, v_boundary, z, t, v_data, cond, y, dropped, num_classes
        )
        tangent = target if cfg.name == "mf" else v_c

    outputs: dict[str, Tensor] = {}

    def u_fn(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        out = model(z_, t_, t_ - r_, cond, "uv" if aux else "u")
        if aux:
            outputs["v"] = out[1]
            return out[0]
        return out

    cond_jvp_rows = cond.select(jvp_rows)

    def u_fn_jvp_rows(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model(z_, t_, t_ - r_, cond_jvp_rows)

    def du_dt_jvp_rows(z_: Tensor, r_: Tensor, t_: Tensor, v_: Tensor) -> Tensor:
        return model.u_and_tangent(z_, v_, t_, t_ - r_, cond_jvp_rows)[1]

    # Our networks' explicit tangent pass; torch.func.jvp for any other module
    explicit = hasattr(model, "u_and_tangent")

    if cfg.name == "fm":
        V = u_fn(z, r, t)
    else:
        V, _ = compound_velocity(
            u_fn,
            z,
            r,
            t,
            tangent,
            jvp_rows=jvp_rows,
            jvp_u_fn=u_fn_jvp_rows,
            du_dt_fn=du_dt_jvp_rows if explicit else None,
            compile_jvp=compile_jvp,
        )

    sq_u = _sq_err(V, target)
    loss = adaptive_weighted(sq_u, cfg)
    numel = x[0].numel()
    parts = {"mse_u": sq_u.detach().mean() / numel}
    if aux:
        sq_v = _sq_err(outputs["v"], target)
        loss_v = adaptive_weighted(sq_v, cfg)
        parts |= {"loss_v": loss_v.detach().mean(), "mse_v": sq_v.detach().mean() / numel}
        loss = loss + loss_v
    loss = loss.mean()
    parts["loss"] = loss.detach()
    return loss, parts
