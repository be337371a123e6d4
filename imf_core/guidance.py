"""Classifier-free guidance, the way MF and iMF train it (paper, Sec. 4.3).

Modes (GuidanceConfig.mode):
  none            no guidance in the target: e - x.
  fixed           original MeanFlow: omega (and MF's kappa) fixed at training time and baked into
                  the target, v_g = omega (e - x) + (1 - omega - kappa) v_u + kappa v_c inside
                  MF's interval [t_start, t_end] (omega = 1, kappa = 0 outside); the network
                  never sees omega. MF's released default is omega 1, kappa 0.5.
  omega           CFG as conditioning: omega ~ p(omega) ∝ omega^-beta on [1, omega_max] per
                  sample and fed to the network; v_g = (e - x) + (1 - 1/omega)(v_c - v_u).
  omega_interval  as `omega`, plus a CFG interval t_min ~ U(0, .5), t_max ~ U(.5, 1) as inputs;
                  guidance is off (omega' = 1) where t is outside [t_min, t_max].

v_c and v_u are the model's own boundary (r = t) velocity predictions with (class, omega') and
(null class, omega = 1), computed without gradient. In every mode a share of labels becomes the
null class (both official codes drop labels whatever their guidance): by default the first
num_drop ~ Binomial(B, class_drop) rows of the batch, which are its r = t rows, so the null
class is trained at h = 0 only. At sampling time omega, t_min and t_max are plain inputs and
generation stays 1-NFE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from imf_core.meanflow import expand_like, sample, sample_euler

MODES = ("none", "fixed", "omega", "omega_interval")
DROP_ROWS = ("first", "random")


@dataclass
class GuidanceConfig:
    mode: str = "omega_interval"  # none | fixed | omega | omega_interval
    class_drop: float = 0.1  # share of labels replaced by the null class (id = num_classes)
    # first: num_drop ~ Binomial(B, class_drop) and the first num_drop rows lose their label
    # (official iMF and MF code; those are r = t rows); random: each row independently (ablation)
    drop_rows: str = "first"
    omega: float = 1.0  # `fixed` mode: the training-time CFG scale
    kappa: float = 0.0  # `fixed` mode: MF's kappa (its release: omega 1, kappa 0.5)
    t_start: float = 0.0  # `fixed` mode: MF's guidance interval [t_start, t_end]
    t_end: float = 1.0  # (t_start, t_end: MF's interval, `fixed` mode only)
    omega_max: float = 8.0  # omega in [1, omega_max] (official code)
    beta: float = 1.0  # p(omega) ∝ omega^-beta: 1 for B/2, 2 for M, L, XL (Tab. 4)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"guidance.mode must be one of {MODES}, got {self.mode!r}")
        if self.drop_rows not in DROP_ROWS:
            raise ValueError(
                f"guidance.drop_rows must be one of {DROP_ROWS}, got {self.drop_rows!r}"
            )
        if not 0.0 <= self.class_drop < 1.0:
            raise ValueError(f"guidance.class_drop must be in [0, 1), got {self.class_drop}")
        if self.omega_max < 1.0 or self.omega < 1.0:
            raise ValueError("guidance.omega and guidance.omega_max must be >= 1")
        if not 0.0 <= self.kappa < 1.0:
            raise ValueError(f"guidance.kappa must be in [0, 1), got {self.kappa}")
        if not 0.0 <= self.t_start <= self.t_end <= 1.0:
            raise ValueError(
                f"guidance.t_start, t_end must satisfy 0 <= t_start <= t_end <= 1, "
                f"got {self.t_start}, {self.t_end}"
            )
        mf_only = {"omega": 1.0, "kappa": 0.0, "t_start": 0.0, "t_end": 1.0}
        changed = [k for k, v in mf_only.items() if getattr(self, k) != v]
        if changed and self.mode != "fixed":
            raise ValueError(
                f"guidance.{changed[0]} applies to guidance.mode=fixed only (mode is {self.mode!r})"
            )

    @property
    def conditions_on_omega(self) -> bool:
        return self.mode in ("omega", "omega_interval")


class Conditions(NamedTuple):
    """Per-sample network conditions, each of shape (B,)."""

    y: Tensor  # class id; num_classes is the null class
    omega: Tensor  # CFG scale (1 = no guidance)
    t_min: Tensor  # CFG interval start
    t_max: Tensor  # CFG interval end

    def select(self, rows: Tensor) -> Conditions:
        return Conditions(*(c[rows] for c in self))

    @staticmethod
    def unguided(y: Tensor) -> Conditions:
        """Class-conditional with guidance off: omega = 1 over the whole interval [0, 1]."""
        ones = torch.ones(y.shape[0], device=y.device)
        return Conditions(y, ones, torch.zeros_like(ones), ones)

    @staticmethod
    def for_sampling(y: Tensor, omega: float, t_min: float = 0.0, t_max: float = 1.0) -> Conditions:
        full = torch.ones(y.shape[0], device=y.device)
        return Conditions(y, full * omega, full * t_min, full * t_max)


def sample_omega(
    n: int, omega_max: float, beta: float, generator: torch.Generator | None = None
) -> Tensor:
    """omega ~ p(omega) ∝ omega^-beta on [1, omega_max], by inverting the CDF."""
    u = torch.rand(n, generator=generator)
    if beta == 1.0:  # log-uniform
        return omega_max**u
    a = 1.0 - beta
    return (1.0 + u * (omega_max**a - 1.0)) ** (1.0 / a)


def sample_interval(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """t_min ~ U(0, 0.5), t_max ~ U(0.5, 1)."""
    t_min = 0.5 * torch.rand(n, generator=generator)
    t_max = 0.5 + 0.5 * torch.rand(n, generator=generator)
    return t_min, t_max


class ConditionDraws(NamedTuple):
    """The random part of a batch's training conditions, each of shape (B,)."""

    dropped: Tensor  # bool: the row's label becomes the null class
    omega: Tensor  # CFG scale (1 = no guidance)
    t_min: Tensor  # CFG interval start
    t_max: Tensor  # CFG interval end

    def conditions(self, y: Tensor, num_classes: int) -> Conditions:
        """The network conditions of labels y, the dropped rows' the null class: computed on
        y's device (these draws already there), so y is never read on the host."""
        return Conditions(
            torch.where(self.dropped, num_classes, y), self.omega, self.t_min, self.t_max
        )


def sample_conditions(
    cfg: GuidanceConfig,
    boundary: Tensor,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
) -> ConditionDraws:
    """Training conditions' draws for a batch, on the CPU: dropped labels, omega, the interval.

    `boundary` (CPU, bool) marks rows with r = t; they get no interval (official code). With
    shard=(rank, world) the draws are made for the global batch (O(B) numbers, in a fixed
    order) and this rank keeps rows rank::world. `ConditionDraws.conditions` applies them to
    the labels.
    """
    n = boundary.shape[0]
    rank, world = shard

    def draw(sampler, *args) -> Tensor:
        return sampler(n * world, *args, generator=generator)[rank::world]

    if cfg.drop_rows == "first":  # the first num_drop rows of the global batch, num_drop ~ Bin
        num_drop = (torch.rand(n * world, generator=generator) < cfg.class_drop).sum()
        dropped = (torch.arange(n * world) < num_drop)[rank::world]
    else:
        dropped = draw(torch.rand) < cfg.class_drop
    ones = torch.ones(n)
    omega = draw(sample_omega, cfg.omega_max, cfg.beta) if cfg.conditions_on_omega else ones
    t_min, t_max = torch.zeros(n), ones
    if cfg.mode == "omega_interval":
        t_min, t_max = (s[rank::world] for s in sample_interval(n * world, generator))
        t_min, t_max = torch.where(boundary, 0.0, t_min), torch.where(boundary, 1.0, t_max)
    return ConditionDraws(dropped, omega, t_min, t_max)


# v_fn(z, t, conditions) -> the model's boundary (r = t) velocity prediction.
VFn = Callable[[Tensor, Tensor, Conditions], Tensor]


@torch.no_grad()
def guided_target(
    cfg: GuidanceConfig,
    v_fn: VFn,
    z: Tensor,
    t: Tensor,
    v_data: Tensor,
    cond: Conditions,
    y: Tensor,
    dropped: Tensor,
    num_classes: int,
    v_c_known: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The regression target v_g and the conditional velocity v_c (iMF's JVP tangent).

    `y` are the labels before dropping; `cond` the sampled training conditions. Rows whose
    label was dropped regress onto e - x (`v_data`). Everything here is stop-gradient.

    `v_c_known`: v_c of the first k rows, when the caller has it already. On the r = t rows the
    conditional call is the training forward's own call (same z, t, h = 0, class, omega and the
    interval [0, 1], which the r = t rows get); only dropped rows differ (null class), and their
    target is `v_data` whatever v_c is. The loss passes that forward's detached output, so the
    no-grad pass runs the conditional rows [k, B) and the unconditional rows: 2B - k rows, not 2B.
    """
    n = z.shape[0]
    known = 0 if v_c_known is None else v_c_known.shape[0]
    null = torch.full_like(y, num_classes)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    if cfg.mode == "fixed":  # MF: omega, kappa baked in, on MF's interval [t_start, t_end]
        inside = (t >= cfg.t_start) & (t <= cfg.t_end)
        omega = torch.where(inside, cfg.omega, ones)
        kappa = torch.where(inside, cfg.kappa, zeros)
        omega_in = ones  # the network does not take omega
    else:  # omega' = omega inside [t_min, t_max], 1 outside (r = t rows have [0, 1])
        inside = (t >= cond.t_min) & (t <= cond.t_max)
        omega = omega_in = torch.where(inside, cond.omega, ones)
    rows = slice(known, None)  # the conditional rows still to compute
    both = v_fn(  # one batched call: conditional rows, then unconditional rows at omega = 1
        torch.cat([z[rows], z]),
        torch.cat([t[rows], t]),
        Conditions(
            torch.cat([y[rows], null]),
            torch.cat([omega_in[rows], ones]),
            torch.cat([zeros[rows], zeros]),
            torch.cat([ones[rows], ones]),
        ),
    )
    v_c, v_u = both[: n - known], both[n - known :]
    if v_c_known is not None:
        v_c = torch.cat([v_c_known.to(v_c.dtype), v_c])
    if cfg.mode == "fixed":  # MeanFlow's guided field with kappa
        w, k = expand_like(omega, z), expand_like(kappa, z)
        v_g = w * v_data + (1.0 - w - k) * v_u + k * v_c
    else:
        v_g = v_data + expand_like(1.0 - 1.0 / omega, z) * (v_c - v_u)
    return torch.where(expand_like(dropped, z), v_data, v_g), v_c


def generate(
    model: torch.nn.Module,
    noise: Tensor,
    y: Tensor,
    omega: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    steps: int = 1,
    euler: bool = False,
) -> Tensor:
    """Class-conditional generation with CFG as network inputs: still `steps` NFE, no extra pass.

    euler=True integrates the network's boundary velocity u(z, t, t) (h = 0) with `steps` Euler
    steps instead: the many-step calibration of a MeanFlow network.
    """
    cond = Conditions.for_sampling(y, omega, t_min, t_max)
    if euler:
        return sample_euler(lambda z, t: model(z, t, torch.zeros_like(t), cond), noise, steps)
    return sample(lambda z, r, t: model(z, t, t - r, cond), noise, steps)


# Does the network use its guidance inputs? CFG-conditioning (Sec. 4.3) only works if the
# network's output moves with omega; at small scale in-context networks can fail to learn that
# while their FID looks fine at omega 1, and nothing in an FID-vs-omega grid tells why.
SENSITIVITY_OMEGA = 2.0  # omega 1 -> this, interval [0, 1]
SENSITIVITY_INTERVAL = (0.25, 0.75)  # [0, 1] -> this, at SENSITIVITY_OMEGA
# (t, h) where it is measured: the 1-NFE map, and the second step of 2-NFE sampling (its input
# z_0.5 made by the first step at omega 1). t alone changes at "mid" (0.5 -> 0.75, r = 0.25 >= 0):
# at the 1-NFE point no other t keeps r = t - h >= 0.
SENSITIVITY_POINTS = {"one_step": (1.0, 1.0), "mid": (0.5, 0.5)}
SENSITIVITY_T = 0.75
# A network conditioned on omega whose omega-sensitivity at the 1-NFE point is below this share
# of its class sensitivity "ignores omega": measured at smoke scale, in-context networks that
# did not learn omega move 0.1-1.6 % vs ~40 % for the class (ratio <= 0.04), adaLN-zero 13-15 %
# (ratio ~0.35); 0.1 lies between.
IGNORES_OMEGA_BELOW = 0.1


def relative_change(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||a|| over the whole batch (0 where a is 0: a fresh network outputs zero)."""
    norm = float(torch.linalg.vector_norm(a.double()))
    return float(torch.linalg.vector_norm((a - b).double())) / norm if norm > 0 else 0.0


@torch.no_grad()
def input_sensitivity(model: torch.nn.Module, noise: Tensor, y: Tensor) -> dict[str, dict]:
    """How much u moves when one conditioning input changes and nothing else does.

    For each input the network takes -- the class (-> the null class, omega 1), omega (1 ->
    SENSITIVITY_OMEGA), the interval ([0, 1] -> SENSITIVITY_INTERVAL at that omega), t (mid only)
    -- the relative change of u over the batch (`noise`, classes `y`) at each of
    SENSITIVITY_POINTS: {input: {point: relative change}}.
    """
    cfg = model.cfg
    ones = torch.ones_like(noise[:, 0, 0, 0])
    conditions = {
        "plain": Conditions.for_sampling(y, 1.0),
        "null": Conditions.for_sampling(torch.full_like(y, cfg.num_classes), 1.0),
        "guided": Conditions.for_sampling(y, SENSITIVITY_OMEGA),
        "narrow": Conditions.for_sampling(y, SENSITIVITY_OMEGA, *SENSITIVITY_INTERVAL),
    }
    changes = {"class": ("plain", "null")}
    if cfg.cond_omega:
        changes["omega"] = ("plain", "guided")
    if cfg.cond_interval:
        changes["interval"] = ("guided", "narrow")
    needed = {c for pair in changes.values() for c in pair}
    mid = noise - 0.5 * model(noise, ones, 0.5 * ones, conditions["plain"])  # 2-NFE's z_0.5
    inputs = {"one_step": noise, "mid": mid}
    out: dict[str, dict] = {name: {} for name in changes}
    for point, (t, h) in SENSITIVITY_POINTS.items():
        z, t, h = inputs[point], t * ones, h * ones
        u = {c: model(z, t, h, conditions[c]) for c in needed}  # each condition set once
        for name, (a, b) in changes.items():
            out[name][point] = relative_change(u[a], u[b])
        if cfg.cond_t and point == "mid":
            moved = model(z, SENSITIVITY_T * ones, h, conditions["plain"])
            out["t"] = {"mid": relative_change(u["plain"], moved)}
    return out


def ignores_omega(sensitivity: dict[str, dict]) -> bool | None:
    """Whether a network conditioned on omega barely responds to it (IGNORES_OMEGA_BELOW of its
    class sensitivity at the 1-NFE point); None for a network without an omega input."""
    if "omega" not in sensitivity:
        return None
    omega, label = sensitivity["omega"]["one_step"], sensitivity["class"]["one_step"]
    return omega < IGNORES_OMEGA_BELOW * label
