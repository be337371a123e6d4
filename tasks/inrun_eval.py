"""Evaluation during training: FID of the EMA weights every `train.eval_every` steps (or
`train.eval_every_epochs` epochs) and at the last step of a training longer than that, on
`eval.during_samples` samples at the variant's operating points `eval.during_points` ([omega,
t_min, t_max] each: omega 1 and the release point, say, not the whole grid). The official
code evaluates every 10 epochs (`training.fid_per_epoch`); Tab. 1c's "longer training" row
and every FID-vs-epochs figure come from such a curve.

How it runs: inline on the training ranks, the samples sharded across them as the official
code does, rank 0 merging and logging `eval/fid` (IS, accuracy, precision / recall, the
calibration lines) at that step on the training run. Every rank is busy for the same short
time; a Ray task beside the training would need a spare device the paper's setup does not have,
and would lag the curve. The cost is on the terminal and in `eval/time_share`.

Restartable like `imf evaluate`, with the same units (tasks.eval_units.Unit, UnitRunner) keyed
by the checkpoint: the training checkpoints at every evaluation step, and each unit is written
to `<training>/during/<key>/step<step>/` as it finishes. A kill loses only the running units;
the relaunch resumes from that checkpoint and finishes the evaluation before training on. The
real-data floor and class-mean ceiling (the calibration) are computed once, under `real/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from imf_core.guidance import ignores_omega
from tasks.artifacts import Manifest, content_key
from tasks.eval_inputs import Features, load_reference
from tasks.eval_metrics import RESULTS_FORMAT, precision_recall, real_calibration, summarize
from tasks.eval_units import Unit, UnitRunner, point_name
from tasks.features import UINT8_RULE
from tasks.schema import EvalConfig, TokenizerConfig
from tasks.storage import Output


@dataclass(frozen=True)
class InRunPlan:
    """What the training ranks need, resolved and checked by the driver before they start."""

    out: Output  # <training>/during/<key>
    every_steps: int
    every_epochs: float
    eval: EvalConfig  # n_samples = eval.during_samples
    points: list[tuple[float, tuple[float, float]]]
    features: Features
    data: Output  # the precompute output (real rows for the calibration)
    rows: int
    num_classes: int
    tokenizer: TokenizerConfig  # decodes the samples
    sdpa_backend: str  # the sampling's attention kernel (train.sdpa_backend)


def plan(cfg, pre, out: Output) -> InRunPlan | None:
    """The in-run evaluation of the training `out`, or None when it is off."""
    t, e = cfg.train, cfg.eval
    if not (t.eval_every or t.eval_every_epochs):
        return None
    try:  # checked before any worker starts: a bad file fails now, not after a week
        features = Features.of(cfg, pre)
    except (FileNotFoundError, ValueError) as err:
        every = (
            f"eval_every={t.eval_every}"
            if t.eval_every
            else f"eval_every_epochs={t.eval_every_epochs:g}"
        )
        raise type(err)(
            f"evaluation during training (train.{every}) needs its features and reference: "
            f"{err} (or set train.eval_every=0 to train without it)"
        ) from err
    n = e.during_samples
    during = dataclasses.replace(
        e, n_samples=n, prc_samples=min(e.prc_samples, n), many_steps=0, workers=1
    )
    points = [(float(w), (float(lo), float(hi))) for w, lo, hi in e.during_points]
    config = {
        "n_samples": n,
        "points": points,
        "seed": e.seed,
        "nfe": e.nfe,
        "features": features.kind,
        "reference": features.reference_sha256,
        "prc_samples": during.prc_samples,
        "calibrate": e.calibrate,
        "uint8": UINT8_RULE,
        "results_format": RESULTS_FORMAT,
    }
    info = Manifest.read(pre.out).extra
    return InRunPlan(
        out=out.child("during", content_key("inrun_eval", config, [pre.key])),
        every_steps=t.eval_every,
        every_epochs=t.eval_every_epochs,
        eval=during,
        points=points,
        features=features,
        data=pre.out,
        rows=int(info["num_rows"]),
        num_classes=int(info["num_classes"]),
        tokenizer=cfg.tokenizer,
        sdpa_backend=t.sdpa_backend,
    )


class InRunEvaluation:
    """One training rank's part in the evaluations of a run (every rank holds one)."""

    def __init__(
        self, plan: InRunPlan, rank: int, world: int, device, steps_per_epoch: int
    ) -> None:
        self.plan, self.rank, self.world = plan, rank, world
        self.every = plan.every_steps or max(1, round(plan.every_epochs * steps_per_epoch))
        self.e = dataclasses.replace(plan.eval, device=str(device))
        self.out = plan.out
        self.seconds = 0.0  # spent evaluating by this launch (rank 0 reports the share)
        self._runner: UnitRunner | None = None

    def due(self, step: int, total: int) -> bool:
        """Every `every` steps, and at the last one of a training longer than that (one shorter
        than an interval has no curve: its final evaluation is all there is)."""
        return step > 0 and (step % self.every == 0 or step == total > self.every)

    def done(self, step: int) -> bool:
        return self.out.exists(f"{step_dir(step)}/results.json")

    def runner(self, model: torch.nn.Module) -> UnitRunner:
        """The tokenizer, extractor and real rows, opened at the first evaluation only."""
        if self._runner is None:  # the model was checked against the data when it was built
            p = self.plan
            self._runner = UnitRunner(
                model,
                0,
                self.plan.tokenizer,
                p.features.kind,
                p.features.extractor,
                self.e,
                None,
                p.data,
                self.plan.sdpa_backend,
            )
        return self._runner

    def units(self, step: int) -> list[tuple[Unit, str]]:
        """Every unit of this step's evaluation, with its file: the points' shards, one per
        rank, and (the first time) the real rows of the calibration."""
        n = self.e.n_samples
        size = math.ceil(n / self.world)
        shards = [(s, min(size, n - s)) for s in range(0, n, size)]
        here = step_dir(step)
        units = [
            (Unit(w, iv, k, s, c), f"{here}/{point_name(w, list(iv))}_s{k:05d}.npz")
            for w, iv in self.plan.points
            for k, (s, c) in enumerate(shards)
        ]
        if self.e.calibrate:
            units += [
                (Unit(1.0, (0.0, 1.0), k, s, c, "real"), f"real/real_s{k:05d}.npz")
                for k, (s, c) in enumerate(shards)
            ]
        return units

    def __call__(self, step: int, model: torch.nn.Module, ema) -> dict | None:
        """Evaluates the EMA weights at `step` on every rank; rank 0 returns the results (None
        elsewhere; metrics_of makes them metrics). Units on disk from an interrupted try are
        not recomputed."""
        started = time.perf_counter()
        units = self.units(step)
        mine = [
            (u, name)
            for i, (u, name) in enumerate(units)  # the same split on every rank: no race
            if i % self.world == self.rank and not holds(self.out, name, u.count)
        ]
        if mine:
            runner = self.runner(model)
            with ema_in_eval_mode(model, ema):
                for unit, name in mine:
                    _, sums = runner.run(unit)
                    self.out.write_arrays(name, **sums)
        if self.world > 1:  # every shard on disk before rank 0 merges
            torch.distributed.barrier()
        if self.rank != 0:
            self.seconds += time.perf_counter() - started
            return None
        results = self.merge(step, [(u, self.out.read_arrays(name)) for u, name in units], model)
        with ema_in_eval_mode(model, ema):  # cheap (one batch): recomputed, not stored per unit
            sensitivity = self.runner(model).sensitivity()
        results |= {"sensitivity": sensitivity, "ignores_omega": ignores_omega(sensitivity)}
        self.seconds += time.perf_counter() - started
        results["seconds"] = time.perf_counter() - started
        self.out.write_json(f"{step_dir(step)}/results.json", results)
        return results

    def merge(self, step: int, parts: list[tuple[Unit, dict]], model) -> dict:
        ref = load_reference(self.plan.features.reference)
        summary = functools.partial(summarize, ref=ref, kind=self.plan.features.kind)
        real = [p for u, p in parts if u.kind == "real"]
        calibration, real_prc = {}, None
        if real:
            kept = "real/calibration.json"
            if self.out.exists(kept):
                calibration = self.out.read_json(kept)
            else:  # once per training: the same rows and reference at every step
                runner = self.runner(model)
                calibration = real_calibration(real, runner, ref, summary, self.e, self.plan.rows)
                self.out.write_json(kept, calibration)
            real_prc = np.concatenate([p["prc"] for p in real])
        points = []
        for w, iv in self.plan.points:
            mine = [p for u, p in parts if u.kind == "point" and (u.omega, u.interval) == (w, iv)]
            entry = {"omega": w, "t_min": iv[0], "t_max": iv[1], "nfe": self.e.nfe}
            entry |= summary(mine)
            if real_prc is not None and len(real_prc):
                entry |= precision_recall(np.concatenate([p["prc"] for p in mine]), real_prc)
            points.append(entry)
        return {"step": step, "points": points, "features": self.plan.features.kind} | calibration


@contextlib.contextmanager
def ema_in_eval_mode(model: torch.nn.Module, ema) -> Iterator[None]:
    """The EMA weights in `model`, in eval mode; the live weights and train mode afterwards."""
    model.eval()
    try:
        with ema.swap_in(model):
            yield
    finally:
        model.train()


def step_dir(step: int) -> str:
    """The folder of the evaluation at `step` in the plan's output."""
    return f"step{step:08d}"


def holds(out: Output, name: str, count: int) -> bool:
    """Whether `name` is a finished unit of `count` samples (a unit of another sharding, left
    by a launch with another number of ranks, is not this one)."""
    return out.exists(name) and int(out.read_arrays(name)["n"]) == count


def metrics_of(results: dict) -> dict[str, float]:
    """The MLflow metrics of one evaluation: `eval/fid` (the best point), per point when there
    are several, IS, accuracy and precision / recall at the best point, and the calibration
    lines (the same value at every step: a flat line under the curve in the chart)."""
    points = results["points"]
    best = min(points, key=lambda r: r["fid"])
    out = {"eval/fid": best["fid"], "eval/is": best["is"]}
    for name in ("accuracy", "precision", "recall"):
        if name in best:
            out[f"eval/{name}"] = best[name]
    if len(points) > 1:
        for r in points:
            out[f"eval/fid/{point_name(r['omega'], [r['t_min'], r['t_max']])}"] = r["fid"]
    out |= sensitivity_metrics(results.get("sensitivity", {}))
    if "real_data_floor" in results:
        out["eval/fid_real_data_floor"] = results["real_data_floor"]["fid"]
        out["eval/fid_class_mean_ceiling"] = results["class_mean_ceiling"]["fid"]
    return out


def sensitivity_metrics(sensitivity: dict[str, dict]) -> dict[str, float]:
    """`eval/sensitivity/<input>/<point>` for each measured input (over steps: when, if ever,
    the network starts using omega)."""
    return {
        f"eval/sensitivity/{name}/{point}": value
        for name, points in sensitivity.items()
        for point, value in points.items()
    }
