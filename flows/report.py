"""Paper-style reports from MLflow: the sweep's table with the paper's numbers beside ours.

    imf report table1a [--scale smoke]      # the latest run of that sweep
    imf report <mlflow run id>              # a sweep's parent run

Writes `<artifacts>/reports/<name>/report.md`, `fid_vs_omega.png` (every variant's curve on
one plot), `fid_vs_step.png` (FID during training, tasks.inrun_eval, one line per variant)
and `grids/<variant>.png` (each variant's best-point sample grid); logs them to the
sweep's parent run and publishes the markdown as a Prefect artifact. Everything is read back
from MLflow (tags `variant.<name>` on the parent run), so a report works from any machine that
reaches the tracking server.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.sweep import MODEL_PROPERTIES, SweepConfig, comparisons, load_sweep
from imf_core import METHOD_VERSION
from imf_core.guidance import IGNORES_OMEGA_BELOW
from tasks.artifacts import atomic_path
from tasks.grids import save_figure
from tasks.provenance import METHOD_TAG, code_record
from tasks.tracking import STALE_TAG, TRAINING_METHODS_TAG, get_run_or_none, summary_metrics
from tasks.tracking import client as tracking_client

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


@dataclass
class Report:
    name: str
    markdown: str
    directory: Path
    files: list[Path]


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


def best_point(runs: VariantRuns, best: dict) -> str:
    """The CFG point that gave the best FID; for a fixed-omega model (MF-style, the network
    ignores omega at sampling) the omega it was trained with."""
    params = runs.train.data.params if runs.train is not None else {}
    if params.get("guidance.mode") == "fixed":
        return f"trained with ω {float(params['guidance.omega']):g}"
    if params.get("guidance.mode") == "none":
        return "no CFG"
    return f"ω {best['omega']:g} [{best['t_min']:g}, {best['t_max']:g}]"


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) over seeds."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    mean, sd = spread(values)
    return f"{mean:.2f} ± {sd:.2f}"


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t-test of two samples (unequal variances): (t, two-sided p)."""
    from scipy import stats

    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def verdict(ours: tuple[list[float], list[float]], paper: tuple[float, float]) -> str:
    """Does our difference go the paper's way? Welch's t-test at 5 %, both sides >= 2 seeds."""
    a, b = ours
    if len(a) < 2 or len(b) < 2:
        return "not resolved at this n (one seed)"
    t, p = welch(a, b)
    if not p < 0.05:
        return f"not resolved at this n (p = {p:.2f})"
    same = (sum(a) / len(a) - sum(b) / len(b)) * (paper[0] - paper[1]) > 0
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return f"{'same direction as the paper' if same else 'opposite'} ({shown})"


def cell_values(runs: list[VariantRuns], metric: str) -> list[float]:
    return [x for r in runs if r.status == "ok" and (x := cell_value(r, metric)) is not None]


def group_by_variant(variants: list[VariantRuns]) -> dict[str, list[VariantRuns]]:
    by_name: dict[str, list[VariantRuns]] = {}
    for v in variants:
        by_name.setdefault(v.name, []).append(v)
    return by_name


def made_by(runs: VariantRuns) -> str:
    """Which imf_core method versions made a run's numbers ("training 2, evaluation 3"), from
    its runs' tags; "unrecorded" for runs older than the record."""
    evaluation = runs.evaluation.data.tags if runs.evaluation is not None else {}
    training = runs.train.data.tags if runs.train is not None else {}
    trained_by = evaluation.get(TRAINING_METHODS_TAG) or training.get(METHOD_TAG, "unrecorded")
    return f"training {trained_by}, evaluation {evaluation.get(METHOD_TAG, 'unrecorded')}"


def versions_of(runs: list[VariantRuns]) -> str:
    """A row's method versions: one entry, or each seed's when its trainings differ."""
    return "; ".join(sorted({made_by(r) for r in runs}))


def is_current(runs: list[VariantRuns]) -> bool:
    """Every number of the row made by this code's method version, none tagged stale."""
    now = f"training {METHOD_VERSION}, evaluation {METHOD_VERSION}"
    tagged = any(STALE_TAG in (r.evaluation.data.tags if r.evaluation else {}) for r in runs)
    return versions_of(runs) == now and not tagged


def paper_table(sweep: SweepConfig, variants: list[VariantRuns]) -> dict[str, list[str]]:
    """The table in the paper's shape, by column: one entry per row, each cell 'ours (paper)',
    ours the mean ± sd over seeds when there are several, and each row's best CFG point."""
    by_name = group_by_variant(variants)
    rows: dict[str, dict[str, str]] = {}
    notes = {}
    for v in sweep.variants:
        if v.name not in by_name:
            continue
        runs = by_name[v.name]
        cells = rows.setdefault(v.row, {})
        flagged = sum(learned(r) is False for r in runs)
        blind = sum(bool(ignores_omega(r)) for r in runs)
        for column, cell in v.cells.items():
            values = cell_values(runs, cell.metric)
            prop = cell.metric in MODEL_PROPERTIES
            if values:
                text = f"{values[0]:.2f}" if prop else mean_sd(values)
            else:
                text = "failed" if any(r.status == "failed" for r in runs) else "—"
            if values and flagged and not prop:
                text += " **did not learn**" + (
                    f" ({flagged} of {len(runs)})" if len(runs) > 1 else ""
                )
            if values and blind and cell.metric.endswith("_best"):  # its CFG number
                text += " *ignores ω*" + (f" ({blind} of {len(runs)})" if len(runs) > 1 else "")
            paper = "—" if cell.paper is None else f"{cell.paper:g}"
            cells[column] = f"{text} ({paper})"
        best = [r for r in runs[0].results if r.get("best")]
        if best:
            notes[v.row] = notes.get(v.row, "") + f"{v.name}: {best_point(runs[0], best[0])}; "
        if any(sensitivity_of(r) for r in runs):
            cells["ω / class sensitivity"] = sensitivity_cell(runs)
    table = {"row": list(rows)}
    columns = list(sweep.columns)
    if any("ω / class sensitivity" in cells for cells in rows.values()):
        columns.append("ω / class sensitivity")
    table |= {c: [cells.get(c, "") for cells in rows.values()] for c in columns}
    table["best point"] = [notes.get(row, "").rstrip("; ") for row in rows]
    # Rows made by different code, or not by this code: their differences mix code changes
    # with the factor compared (tasks.artifacts.stale), so each row says which code made it.
    versions = {v.row: versions_of(by_name[v.name]) for v in sweep.variants if v.name in by_name}
    current = all(is_current(by_name[v.name]) for v in sweep.variants if v.name in by_name)
    if len(set(versions.values())) > 1 or not current:
        table["method version"] = [versions.get(row, "") for row in rows]
    return table


def table_markdown(sweep: SweepConfig, scale: str, variants: list[VariantRuns]) -> str:
    """The paper's table (paper_table), then the calibration and the comparisons."""
    by_name = group_by_variant(variants)
    table = paper_table(sweep, variants)
    seeds = max(len(r) for r in by_name.values()) if by_name else 1
    header = list(table)
    lines = [
        f"## {sweep.title} — scale `{scale}`",
        "",
        "Each cell: ours (paper)"
        + (f"; ours = mean ± sd over {seeds} training seeds" if seeds > 1 else "")
        + ". The paper's numbers are ImageNet 256 FID-50K; at other scales only the direction "
        "between rows compares.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for i in range(len(table["row"])):
        lines.append("| " + " | ".join(table[c][i] for c in header) + " |")
    if "method version" in table:
        mixed = len(set(table["method version"])) > 1
        lines += [
            "",
            ("**Rows made by different code.** " if mixed else "**Not this code's numbers.** ")
            + f"The method version column says which imf_core.METHOD_VERSION made each row "
            f"(this code: {METHOD_VERSION}; imf_core.METHOD_HISTORY says what changed)"
            + (
                ": a difference between such rows mixes the code's change with the factor. "
                if mixed
                else ". "
            )
            + f"`imf sweep {sweep.name} --recompute-stale` recomputes them.",
        ]
    return (
        "\n".join(lines)
        + "\n\n"
        + calibration_markdown(variants)
        + "\n"
        + comparisons_markdown(sweep, by_name)
    )


def comparisons_markdown(sweep: SweepConfig, by_name: dict[str, list[VariantRuns]]) -> str:
    """Each comparison the paper makes (a variant against the row it changes one factor of):
    our difference, the paper's, and whether ours goes the paper's way (Welch's t-test)."""
    lines = [
        "### Comparisons (one factor each)",
        "",
        "| variant | vs | factor | column | ours | paper | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, other, mine, theirs in comparisons(sweep):
        if v.name not in by_name or other.name not in by_name:
            continue
        if v.cells[mine].metric in MODEL_PROPERTIES:  # a design choice, not a measurement
            continue
        a = cell_values(by_name[v.name], v.cells[mine].metric)
        b = cell_values(by_name[other.name], other.cells[theirs].metric)
        pa, pb = v.cells[mine].paper, other.cells[theirs].paper
        if not a or not b or pa is None or pb is None:
            continue
        ours = f"{mean_sd(a).split(' ±')[0]} vs {mean_sd(b).split(' ±')[0]}"
        column = mine if mine == theirs else f"{mine} vs {theirs}"
        cells = [v.name, other.name, ", ".join(v.factor), column, ours, f"{pa:g} vs {pb:g}"]
        mixed = versions_of(by_name[v.name]) != versions_of(by_name[other.name])
        cells.append(verdict((a, b), (pa, pb)) + (" (rows of different code)" if mixed else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def training_steps(runs: VariantRuns) -> int | None:
    """The last step of the variant's training curve (its length), if it has one."""
    return max(runs.curve) if runs.curve else None


def curve_mean(runs: list[VariantRuns], attr: str = "curve") -> dict[int, float]:
    """A curve during training (`curve`: FID; `omega_curve`: omega sensitivity) at each step,
    the mean over the seeds that reached it."""
    curves = [getattr(r, attr) for r in runs]
    steps = sorted({s for c in curves for s in c})
    return {s: statistics.mean(c[s] for c in curves if s in c) for s in steps}


def progress_markdown(sweep: SweepConfig, variants: list[VariantRuns]) -> str:
    """FID during training per variant, and for a variant that trains longer than the row it
    compares with (Tab. 1c's "longer training"), the reading off its curve at that row's
    length: the same network family trained as long, then longer."""
    by_name = group_by_variant(variants)
    curves = {name: curve_mean(runs) for name, runs in by_name.items()}
    if not any(curves.values()):
        return ""
    n = {
        r.train.data.params.get("eval.during_samples")
        for r in variants
        if r.train is not None and r.curve
    }
    lines = [
        "### FID during training",
        "",
        f"FID of {' / '.join(sorted(n - {None})) or 'a few'} samples at each evaluated step "
        "(the best of each variant's `eval.during_points`): fewer samples than the table's, so "
        "these numbers compare along a curve and between curves, not with the cells above.",
        "",
        "| variant | FID at step |",
        "|---|---|",
    ]
    for name, curve in curves.items():
        points = " · ".join(f"{s}: {f:.2f}" for s, f in curve.items()) or "—"
        lines.append(f"| {name} | {points} |")
    for v in sweep.variants:
        longer = {"train.steps", "train.epochs"} & set(v.factor)
        mine, theirs = curves.get(v.name), curves.get(v.compare_with)
        if not (longer and mine and theirs):
            continue
        at = max(theirs)
        if at >= max(mine) or at not in mine:
            continue
        lines += [
            "",
            f"**{v.row}**: at step {at}, the length of `{v.compare_with}`, `{v.name}`'s own "
            f"curve reads FID {mine[at]:.2f} (`{v.compare_with}` ended at {theirs[at]:.2f}); "
            f"trained on to step {max(mine)}, {mine[max(mine)]:.2f}. The difference between "
            "the first two is the rest of the recipe (the learning-rate schedule follows the "
            "length), the step from the first to the last is the longer training.",
        ]
    return "\n".join(lines) + "\n"


def plot_progress(variants: list[VariantRuns], path: Path) -> Path | None:
    """FID during training against the step, one line per variant (mean over seeds), with
    the real-data floor at the same n as a dashed line, and beside it, where measured, the
    omega sensitivity over the same steps (when a network starts to use its omega input);
    None without curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {k: v for k, v in group_by_variant(variants).items() if any(r.curve for r in v)}
    if not by_name:
        return None
    sensitive = any(r.omega_curve for runs in by_name.values() for r in runs)
    fig, axes = plt.subplots(1, 2 if sensitive else 1, figsize=(12 if sensitive else 7, 4))
    ax = axes[0] if sensitive else axes
    for name, runs in by_name.items():
        curve = curve_mean(runs)
        ax.plot(list(curve), list(curve.values()), "o-", markersize=3, label=name)
    floors = [
        r.train.data.metrics["eval/fid_real_data_floor"]
        for r in variants
        if r.train is not None and "eval/fid_real_data_floor" in r.train.data.metrics
    ]
    if floors:
        ax.axhline(statistics.mean(floors), color="g", ls="--", label="real data (same n)")
    ax.set(xlabel="training step", ylabel="FID", title="FID during training", yscale="log")
    ax.grid(alpha=0.3, which="both")
    if sensitive:
        for runs in by_name.values():
            curve = curve_mean(runs, "omega_curve")
            axes[1].plot(list(curve), [100 * v for v in curve.values()], "o-", markersize=3)
        axes[1].set(
            xlabel="training step",
            ylabel="% change of u, omega 1 -> 2",
            title="omega sensitivity at the 1-NFE point",
            yscale="log",
        )
        axes[1].grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(2.25 if sensitive else 1.01, 1))
    return save_figure(fig, path)


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


def sensitivity_cell(runs: list[VariantRuns]) -> str:
    """Mean relative change of u at the 1-NFE point with omega (1 -> 2) and with the class
    (-> null), over the seeds: 'ω 0.9 % / class 41 %'; '—' for omega where it is no input."""

    def mean(name: str) -> float | None:
        values = [sensitivity_of(r)[name]["one_step"] for r in runs if name in sensitivity_of(r)]
        return sum(values) / len(values) if values else None

    omega, label = mean("omega"), mean("class")
    text = "—" if omega is None else f"ω {100 * omega:.2g} %"
    return text + ("" if label is None else f" / class {100 * label:.2g} %")


def calibration_markdown(variants: list[VariantRuns]) -> str:
    """What each variant's best FID means on these features: the real-data floor, the
    class-mean ceiling, the same network's many-step result, diversity, and the verdict."""

    def num(d: dict | None, key: str = "fid") -> str:
        return "—" if not d or key not in d else f"{d[key]:.2f}"

    lines = [
        "### Calibration (same features, same reference, same n)",
        "",
        "A variant whose samples' accuracy is near chance or whose FID is above half the "
        "class-mean ceiling is marked **did not learn**: its numbers say nothing about the "
        "method. One conditioned on omega whose output moves with omega (1 -> 2) less than "
        f"{IGNORES_OMEGA_BELOW:.0%} of what it moves with the class (-> the null class) at the "
        "1-NFE point is marked *ignores ω*: its CFG numbers say nothing about CFG-conditioning "
        "(sensitivities: relative change of u, imf_core.guidance.input_sensitivity).",
        "",
        "| variant | FID (best) | real data | class means | many-step | precision | recall "
        "| accuracy | ω / class sensitivity | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        best = next((r for r in v.results if r.get("best")), None)
        if best is None:
            lines.append(f"| {v.label or v.name} | {v.status} | | | | | | | | |")
            continue
        verdict = {None: "—", True: "learned", False: "**did not learn**"}[learned(v)]
        verdict += ", *ignores ω*" if ignores_omega(v) else ""
        many = best.get("many_step")
        cells = [
            v.label or v.name,
            num(best),
            num(best.get("real_data_floor")),
            num(best.get("class_mean_ceiling")),
            "—" if not many else f"{many['fid']:.2f} ({many['steps']} steps)",
            num(best, "precision"),
            num(best, "recall"),
            num(best, "accuracy"),
            sensitivity_cell([v]) if sensitivity_of(v) else "—",
            verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    floors = {
        r["real_data_floor"]["rows"]
        for v in variants
        for r in v.results[:1]
        if "real_data_floor" in r
    }
    if floors:
        lines += ["", f"Real data: {'; '.join(sorted(floors))}."]
    return "\n".join(lines) + "\n"


def plot_curves(variants: list[VariantRuns], path: Path) -> Path:
    """Saves fid_figure(variants) as a PNG."""
    return save_figure(fid_figure(variants), path)


def fid_figure(variants: list[VariantRuns]):
    """FID against omega, one line per variant (x interval): the mean over its seeds, +- one
    sd, and each seed as a faint dot. When every variant has the one omega (the fixed-omega
    tables), FID by variant instead: an omega axis with a single tick says nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: list[tuple[str, dict[float, list[float]]]] = []
    for name, runs in group_by_variant(variants).items():
        intervals = sorted({(r["t_min"], r["t_max"]) for v in runs for r in v.results})
        for interval in intervals:
            fids: dict[float, list[float]] = {}
            for v in runs:
                for r in v.results:
                    if (r["t_min"], r["t_max"]) == interval:
                        fids.setdefault(r["omega"], []).append(r["fid"])
            label = name if len(intervals) == 1 else f"{name} [{interval[0]:g}, {interval[1]:g}]"
            series.append((label, fids))
    seeds = max((len(f) for _, fids in series for f in fids.values()), default=1)

    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
    omegas = sorted({w for _, fids in series for w in fids})
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, fids) in enumerate(series):
        color = colors[i % len(colors)]
        if len(omegas) == 1:
            xs, ys = [i], [fids[omegas[0]]]
        else:
            xs = sorted(fids)
            ys = [fids[w] for w in xs]
        stats = [spread(y) for y in ys]
        ax.errorbar(
            xs,
            [m for m, _ in stats],
            yerr=[sd for _, sd in stats] if seeds > 1 else None,
            fmt="o" if len(omegas) == 1 else "o-",
            capsize=3,
            color=color,
            label=label,
        )
        if seeds > 1:
            dots = [(x, y) for x, values in zip(xs, ys, strict=True) for y in values]
            ax.scatter(*zip(*dots, strict=True), s=9, alpha=0.35, color=color)
    seeds_note = f"mean ± sd over {seeds} seeds" if seeds > 1 else "one seed"
    if len(omegas) == 1:
        ax.set_xticks(range(len(series)), [label for label, _ in series], rotation=25, ha="right")
        ax.set(ylabel="FID", title=f"FID by variant, sampled at omega {omegas[0]:g} ({seeds_note})")
    else:
        ax.set(xlabel="CFG scale omega", ylabel="FID", title=f"FID vs omega ({seeds_note})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return fig


def best_grids(client, variants: list[VariantRuns], directory: Path) -> list[Path]:
    paths = []
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
            dest = directory / "grids" / f"{v.label or v.name}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            paths.append(dest)
    return paths


@flow(name="imf-report", flow_run_name="report {target}", log_prints=True)
def report_flow(
    target: str, scale: str | None = None, tracking: str = "", artifacts: str = "artifacts"
) -> Report:
    """Builds the report of a sweep (by name or parent run id) from MLflow."""
    client = tracking_client(tracking)
    parent = find_parent(client, target, scale)
    sweep_name = parent.data.tags.get("sweep")
    if not sweep_name:
        raise LookupError(f"run {target} is not a sweep's parent run (no 'sweep' tag)")
    sweep_file = parent.data.tags.get("sweep.file", "")
    sweep = load_sweep(sweep_file if Path(sweep_file).is_file() else sweep_name)
    run_scale = parent.data.tags.get("scale", "?")
    # Each step a task run of its own, so the flow run's page shows what the report did.
    step = functools.partial(task, cache_policy=NO_CACHE)
    variants = step(variant_runs, name="read variant runs from MLflow")(client, parent, sweep)
    code = code_record()
    made = f"commit {code['commit'][:12]}" + (" with uncommitted changes" if code["dirty"] else "")
    markdown = table_markdown(sweep, run_scale, variants) + (
        f"\nReport written {time.strftime('%Y-%m-%d %H:%M')} by imf-pipeline {code['package']} "
        f"({made}, method version {code['method']}).\n"
    )
    directory = Path(artifacts).resolve() / "reports" / f"{sweep_name}-{run_scale}"
    directory.mkdir(parents=True, exist_ok=True)
    md_path = directory / "report.md"
    grids = step(best_grids, name="fetch sample grids")(client, variants, directory)
    plot = step(plot_curves, name="plot FID vs omega")(variants, directory / "fid_vs_omega.png")
    progress = step(plot_progress, name="plot FID vs training step")(
        variants, directory / "fid_vs_step.png"
    )
    pictures = ["", "![FID vs omega](fid_vs_omega.png)", ""]
    if progress is not None:
        pictures += [progress_markdown(sweep, variants), "![FID vs step](fid_vs_step.png)", ""]
    pictures += ["### Samples at each variant's best point", ""]
    pictures += [f"![{g.stem}](grids/{g.name})" for g in grids]
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown + "\n".join(pictures) + "\n")
    files = [md_path, plot, *([progress] if progress else []), *grids]
    for path in files:
        sub = "report/grids" if path.parent.name == "grids" else "report"
        client.log_artifact(parent.info.run_id, str(path), sub)
    # The paper's table on the parent run, in MLflow's table view too.
    client.log_table(parent.info.run_id, paper_table(sweep, variants), "report/table.json")
    create_markdown_artifact(
        markdown, key=f"imf-report-{sweep_name}-{run_scale}".replace("_", "-").lower()
    )
    return Report(sweep_name, markdown, directory, files)
