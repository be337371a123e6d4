"""Training objectives: flow matching, original MeanFlow and the two iMF variants (paper, Sec. 4).

All four share one loss: the compound velocity V = u + (t - r) sg(du/dt) regressed onto the
(guided) velocity target, with MF's adaptive weighting loss / sg((loss + eps)^p). What differs
is the JVP tangent, and so what the loss means:

  fm            r = t for every row, so V = u: plain flow matching (v-prediction).
  mf            tangent = the target velocity itself (e - x, or MF's guided one): the same
                number as MF's ||u - sg(v - (t - r) du/dt)||^2, a network-dependent target.
  imf_boundary  tangent = the model's marginal-velocity estimate u(z_t, t, t) (boundary).
  imf_aux       tangent = an auxiliary v-head's estimate, plus that head's own FM loss.

    >>> spec = LossSpec(ObjectiveConfig(), GuidanceConfig(), num_classes=10)
    >>> loss, parts = imf_loss(model, x, y, spec)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from imf_core.guidance import (
    ConditionDraws,
    Conditions,
    GuidanceConfig,
    guided_target,
    sample_conditions,
)
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


@dataclass(frozen=True)
class LossSpec:
    """What the loss computes: its objective, the guidance it trains, and the number of classes
    (the label num_classes is the null class). Made once per run and handed to every draw and
    loss, which read nothing else of the configuration."""

    objective: ObjectiveConfig
    guidance: GuidanceConfig
    num_classes: int


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


@dataclass(frozen=True)
class DrawKey:
    """What a batch's random draws are a function of, with the global row: the run's seed and
    the step. tasks.train_loop passes train.seed and the optimizer step, so that a run resumed at a
    step, on any number of ranks, draws what it would have drawn had it never stopped."""

    seed: int = 0
    step: int = 0

    def stream(self, row: int | None = None) -> int:
        """The generator seed of global row `row` (its noise), or of the step itself (the
        batch's O(B) numbers). torch's CPU generator (mt19937) keeps 32 bits of a seed."""
        words = (self.seed, self.step) if row is None else (self.seed, self.step, row)
        return hash(words) & (2**63 - 1)  # ints hash alike in every process (no salt)

    def generator(self) -> torch.Generator:
        """The step's generator: the whole batch's (t, r) and conditions, in that order."""
        return torch.Generator().manual_seed(self.stream())


def row_noise(key: DrawKey, rows: Sequence[int], shape: Sequence[int]) -> Tensor:
    """(len(rows), *shape) standard normal noise of these global rows, each row from its own
    stream: what a rank draws is its rows' alone, and the same as any other split draws."""
    out = torch.empty(len(rows), *shape)
    gen = torch.Generator()
    for i, row in enumerate(rows):
        torch.randn(shape, generator=gen.manual_seed(key.stream(row)), out=out[i])
    return out


def to_device(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """CPU tensors (floats of one dtype, or bool) on `device` in one copy that does not block
    the host: packed into one buffer (page-locked on CUDA, so the copy runs asynchronously),
    then split into views."""
    if device.type == "cpu":
        return list(tensors)
    dtype = next(t.dtype for t in tensors if t.is_floating_point())
    packed = torch.empty(
        sum(t.numel() for t in tensors), dtype=dtype, pin_memory=device.type == "cuda"
    )
    torch.cat([t.reshape(-1).to(dtype) for t in tensors], out=packed)
    chunks = packed.to(device, non_blocking=True).split([t.numel() for t in tensors])
    return [c.view(t.shape).to(t.dtype) for c, t in zip(chunks, tensors, strict=True)]


def draw(
    x: Tensor,
    y: Tensor,
    spec: LossSpec,
    key: DrawKey = DrawKey(),
    shard: tuple[int, int] = (0, 1),
) -> Draws:
    """The batch's random draws at rows rank::world of the global batch, shard=(rank, world):
    the rows a DistributedSampler gives this rank (its row i is global row rank + world i).

    Every draw is a function of (key, global row), the same on any number of ranks: the step's
    generator draws the O(B) numbers of the whole global batch in the official code's order,
    (t, r) then the conditions, and this rank keeps its rows; the noise, O(B C S S), comes
    from each global row's own stream and is drawn for this rank's rows only (row_noise). All
    on the CPU, then one copy to x's device that the host does not wait for (no sync).
    """
    n = x.shape[0]
    rank, world = shard
    batch = key.generator()
    t, r = (s[rank::world] for s in sample_t_r(n * world, spec.objective, batch))
    # The first int(N * share) global rows have r = t; this rank's among them are a prefix.
    jvp_from = len(range(rank, boundary_rows(n * world, spec.objective), world))
    drawn = sample_conditions(spec.guidance, torch.arange(n) < jvp_from, batch, shard)
    e = row_noise(key, range(rank, n * world, world), x.shape[1:])
    t, r, e, *on_device = to_device([t, r, e, *drawn], x.device)
    drawn = ConditionDraws(*on_device)
    return Draws(t, r, e, drawn.conditions(y, spec.num_classes), drawn.dropped, jvp_from)


def imf_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: LossSpec,
    *,
    key: DrawKey = DrawKey(),
    compile_jvp: str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[Tensor, dict[str, Tensor]]:
    """One batch of any objective. Returns the scalar loss and its named parts (detached).

    `model` is called as model(z, t, h, cond, heads) with h = t - r, and du/dt comes from
    model.u_and_tangent where it has one; `compile_jvp` (a torch.compile backend) compiles
    the JVP pass alone (meanflow.compound_velocity). The draws are those of `key`; with
    shard=(rank, world) under data parallelism, each rank draws its rows' (see `draw`): W ranks
    then compute exactly the loss one process computes on the whole global batch.
    Parts: `loss` (the optimised, weighted loss), `mse_u` (unweighted ||V - target||^2 per
    element: with adaptive weighting the loss sits near 1, so this is what shows learning) and,
    for imf_aux, `loss_v`, `mse_v`.
    """
    draws = draw(x, y, spec, key, shard)
    return loss_of_draws(model, x, y, draws, spec, compile_jvp=compile_jvp)


def loss_of_draws(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    draws: Draws,
    spec: LossSpec,
    *,
    compile_jvp: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """imf_loss given its draws: no randomness, no data-dependent shapes, no host syncs, so that
    torch.compile can take it whole, with its backward (imf_core.training, compile=step).
    The model is the bare module: data parallelism averages gradients after the backward
    (training.average_gradients), so no DDP hook sits in the no-grad or JVP passes."""
    cfg, guidance = spec.objective, spec.guidance
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

    # The training forward first: on the r = t rows it is also the guidance's conditional call
    # (guided_target's v_c_known), so the no-grad pass skips those rows.
    out = model(z, t, t - r, cond, "uv" if aux else "u")
    u, v = out if aux else (out, None)
    tangent = v_data
    if guidance.mode == "none":
        target = v_data
        if cfg.name in ("imf_boundary", "imf_aux"):
            with torch.no_grad():
                v_rows = v_boundary(z[jvp_rows], t[jvp_rows], cond.select(jvp_rows))
            tangent = torch.cat([torch.zeros_like(z[:jvp_from]), v_rows.to(z.dtype)])
    else:
        own = (v if aux else u)[:jvp_from].detach()
        target, v_c = guided_target(
            guidance, v_boundary, z, t, v_data, cond, y, dropped, spec.num_classes, v_c_known=own
        )
        tangent = target if cfg.name == "mf" else v_c

    cond_jvp_rows = cond.select(jvp_rows)

    def u_fn_jvp_rows(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model(z_, t_, t_ - r_, cond_jvp_rows)

    def du_dt_jvp_rows(z_: Tensor, r_: Tensor, t_: Tensor, v_: Tensor) -> Tensor:
        return model.u_and_tangent(z_, v_, t_, t_ - r_, cond_jvp_rows)[1]

    # Our networks' explicit tangent pass; torch.func.jvp for any other module
    explicit = hasattr(model, "u_and_tangent")

    if cfg.name == "fm":
        V = u
    else:
        V, _ = compound_velocity(
            u_fn_jvp_rows,
            z,
            r,
            t,
            tangent,
            jvp_rows=jvp_rows,
            du_dt_fn=du_dt_jvp_rows if explicit else None,
            compile_jvp=compile_jvp,
            u=u,
        )

    sq_u = _sq_err(V, target)
    loss = adaptive_weighted(sq_u, cfg)
    numel = x[0].numel()
    parts = {"mse_u": sq_u.detach().mean() / numel}
    if aux:
        sq_v = _sq_err(v, target)
        loss_v = adaptive_weighted(sq_v, cfg)
        parts |= {"loss_v": loss_v.detach().mean(), "mse_v": sq_v.detach().mean() / numel}
        loss = loss + loss_v
    loss = loss.mean()
    parts["loss"] = loss.detach()
    return loss, parts
