"""A sweep's runs read back from MLflow for its report (flows.report): the parent run, each
variant's training and evaluation runs (one per seed) with their results and curves, their
best sample grids, and the numbers a report reads off them."""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flows.sweep_config import SweepConfig, load_sweep
from tasks.eval_tracking import summary_metrics
from tasks.storage import Output
from tasks.tracking import get_run_or_none

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download


@dataclass
class VariantRuns:
    name: str  # the variant (several runs of one variant differ in seed)
    status: str
    train: object | None  # mlflow Run
    evaluation: object | None
    results: list[dict]  # the evaluation's results.json
    label: str = ""  # "<variant>" or "<variant>.s<seed>" (the parent run's tags)
    curve: dict[int, float] = field(default_factory=dict)  # step -> FID during training
    # step -> omega sensitivity at the 1-NFE point during training (tasks.inrun_eval)
    omega_curve: dict[int, float] = field(default_factory=dict)


def find_parent(client, target: str, scale: str | None):
    """The parent run: `target` as a run id, else the latest run of sweep `target`."""
    run = get_run_or_none(client, target)
    if run is not None:
        return run
    sweep = load_sweep(target)  # an unknown name: an error listing the sweeps there are
    if scale and scale not in sweep.scales:
        raise LookupError(
            f"sweep {target!r} has no scale {scale!r} (its scales: {', '.join(sweep.scales)})"
        )
    experiments = [e.experiment_id for e in client.search_experiments()]
    where = f"tags.stage = 'sweep' and tags.sweep = '{target}'"
    if scale:
        where += f" and tags.scale = '{scale}'"
    runs = client.search_runs(experiments, where, order_by=["attributes.start_time DESC"])
    if not runs:
        at = f" --scale {scale}" if scale else ""
        raise LookupError(
            f"no MLflow run of sweep {target!r}{' at scale ' + repr(scale) if scale else ''} "
            f"in this tracking store (run `imf sweep {target}{at}` first)"
        )
    return runs[0]


def labels_of(tags: dict, name: str) -> list[str]:
    """The runs of variant `name` in a parent's tags: itself, or one label per seed."""
    if f"variant.{name}" in tags or f"variant.{name}.status" in tags:
        return [name]
    seeded = {
        m.group(1)
        for k in tags
        if (m := re.fullmatch(rf"variant\.({re.escape(name)}\.s\d+)\.status", k))
    }
    return sorted(seeded, key=lambda label: int(label.rsplit(".s", 1)[1]))


def variant_runs(client, parent, sweep: SweepConfig) -> list[VariantRuns]:
    tags = parent.data.tags
    out = []
    for v in sweep.variants:
        for label in labels_of(tags, v.name):
            train_id = tags.get(f"variant.{label}", "-")
            eval_id = tags.get(f"variant.{label}.eval", "-")
            train = client.get_run(train_id) if train_id != "-" else None
            evaluation = client.get_run(eval_id) if eval_id != "-" else None
            results = []
            if evaluation is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    path = client.download_artifacts(eval_id, "results.json", tmp)
                    results = json.loads(Path(path).read_text())
            status = tags.get(f"variant.{label}.status", "?")
            curve, omega_curve = {}, {}
            if train is not None:  # the in-run evaluation's numbers over steps (tasks.inrun_eval)
                curve = metric_curve(client, train_id, "eval/fid")
                omega_curve = metric_curve(client, train_id, OMEGA_CURVE)
            out.append(
                VariantRuns(v.name, status, train, evaluation, results, label, curve, omega_curve)
            )
    return out


OMEGA_CURVE = "eval/sensitivity/omega/one_step"


def metric_curve(client, run_id: str, key: str) -> dict[int, float]:
    """step -> value of a metric's history (the last value logged at a step)."""
    history = client.get_metric_history(run_id, key)
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


def best_grids(client, variants: list[VariantRuns], out: Output) -> list[str]:
    """Each variant's grid at its best point, from its evaluation run, as `grids/<variant>.png`
    in `out`; returns the names."""
    names = []
    for v in variants:
        best = [r for r in v.results if r.get("best")]
        if v.evaluation is None or not best:
            continue
        b = best[0]
        name = f"w{b['omega']:g}_t{b['t_min']:g}-{b['t_max']:g}.png"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                src = client.download_artifacts(v.evaluation.info.run_id, f"grids/{name}", tmp)
            except Exception:  # grids are optional (eval.grid_per_class=0)
                continue
            names.append(f"grids/{v.label or v.name}.png")
            out.write_bytes(names[-1], Path(src).read_bytes())
    return names


def group_by_variant(variants: list[VariantRuns]) -> dict[str, list[VariantRuns]]:
    by_name: dict[str, list[VariantRuns]] = {}
    for v in variants:
        by_name.setdefault(v.name, []).append(v)
    return by_name


def cell_value(runs: VariantRuns, metric: str) -> float | None:
    """A number of the variant's own evaluation (its results.json), else a metric
    (`eval/<metric>`) of the training or evaluation run, else a param of the training run (e.g.
    params_m). Own results first: one training can serve several evaluations (Tab. 2's 1- and
    2-NFE rows), and its run's eval/ metrics are those of the variant it was trained for."""
    if runs.results:
        mode = runs.train.data.params.get("guidance.mode", "") if runs.train else ""
        own = summary_metrics(runs.results, mode)
        if metric in own:
            return own[metric]
    for run in (runs.train, runs.evaluation):
        if run is not None and f"eval/{metric}" in run.data.metrics:
            return run.data.metrics[f"eval/{metric}"]
    if runs.train is not None:
        for key in (metric, f"model.{metric}"):
            if key in runs.train.data.params:
                return float(runs.train.data.params[key])
    return None


def best_result(runs: VariantRuns) -> dict:
    """The variant's best grid point in its results.json ({} without results)."""
    return next((r for r in runs.results if r.get("best")), {})


def learned(runs: VariantRuns) -> bool | None:
    """False when the variant's best point is flagged did-not-learn; None without results."""
    best = best_result(runs)
    return None if "did_not_learn" not in best else not best["did_not_learn"]


def sensitivity_of(runs: VariantRuns) -> dict[str, dict]:
    """The network's input sensitivity from its evaluation ({} for one made before it existed)."""
    return best_result(runs).get("sensitivity", {})


def ignores_omega(runs: VariantRuns) -> bool | None:
    """True when the variant's network is conditioned on omega but barely uses it
    (imf_core.guidance.ignores_omega); None without an omega input or a measurement."""
    return best_result(runs).get("ignores_omega")


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) over seeds."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def curve_mean(runs: list[VariantRuns], attr: str = "curve") -> dict[int, float]:
    """A curve during training (`curve`: FID; `omega_curve`: omega sensitivity) at each step,
    the mean over the seeds that reached it."""
    curves = [getattr(r, attr) for r in runs]
    steps = sorted({s for c in curves for s in c})
    return {s: statistics.mean(c[s] for c in curves if s in c) for s in steps}
