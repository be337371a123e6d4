"""Paper-style reports from MLflow: the sweep's table with the paper's numbers beside ours.

    imf report table1a [--scale smoke]      # the latest run of that sweep
    imf report <mlflow run id>              # a sweep's parent run

Writes `<artifacts>/reports/<name>/report.md`, `fid_vs_omega.png` (every variant's curve on
one plot) and `grids/<variant>.png` (each variant's best-point sample grid); logs them to the
sweep's parent run and publishes the markdown as a Prefect artifact. Everything is read back
from MLflow (tags `variant.<name>` on the parent run), so a report works from any machine that
reaches the tracking server.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.sweep import SweepConfig, load_sweep
from tasks.artifacts import atomic_path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download


@dataclass
class VariantRuns:
    name: str
    status: str
    train: object | None  # mlflow Run
    evaluation: object | None
    results: list[dict]  # the evaluation's results.json


@dataclass
class Report:
    name: str
    markdown: str
    directory: Path
    files: list[Path]


def find_parent(client, target: str, scale: str | None):
    """The parent run: `target` as a run id, else the latest run of sweep `target`."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(target)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    where = f"tags.stage = 'sweep' and tags.sweep = '{target}'"
    if scale:
        where += f" and tags.scale = '{scale}'"
    runs = client.search_runs(experiments, where, order_by=["attributes.start_time DESC"])
    if not runs:
        raise LookupError(f"no MLflow run of sweep {target!r} (run `imf sweep {target}` first)")
    return runs[0]


def variant_runs(client, parent, sweep: SweepConfig) -> list[VariantRuns]:
    tags = parent.data.tags
    out = []
    for v in sweep.variants:
        train_id = tags.get(f"variant.{v.name}", "-")
        if train_id == "-" and f"variant.{v.name}.status" not in tags:
            continue  # not part of this run (e.g. --only)
        eval_id = tags.get(f"variant.{v.name}.eval", "-")
        train = client.get_run(train_id) if train_id != "-" else None
        evaluation = client.get_run(eval_id) if eval_id != "-" else None
        results = []
        if evaluation is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(eval_id, "results.json", tmp)
                results = json.loads(Path(path).read_text())
        status = tags.get(f"variant.{v.name}.status", "?")
        out.append(VariantRuns(v.name, status, train, evaluation, results))
    return out


def cell_value(runs: VariantRuns, metric: str) -> float | None:
    """A metric of the evaluation run, else of the training run (metrics, then params)."""
    for run in (runs.evaluation, runs.train):
        if run is not None and metric in run.data.metrics:
            return run.data.metrics[metric]
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


def table_markdown(sweep: SweepConfig, scale: str, variants: list[VariantRuns]) -> str:
    """The table in the paper's shape: one line per row, each column 'ours (paper)'."""
    by_name = {v.name: v for v in variants}
    rows: dict[str, dict[str, str]] = {}
    notes = {}
    for v in sweep.variants:
        if v.name not in by_name:
            continue
        runs = by_name[v.name]
        cells = rows.setdefault(v.row, {})
        for column, cell in v.cells.items():
            ours = cell_value(runs, cell.metric) if runs.status == "ok" else None
            text = "failed" if runs.status == "failed" else ("—" if ours is None else f"{ours:.2f}")
            paper = "—" if cell.paper is None else f"{cell.paper:g}"
            cells[column] = f"{text} ({paper})"
        best = [r for r in runs.results if r.get("best")]
        if best:
            notes[v.row] = notes.get(v.row, "") + f"{v.name}: {best_point(runs, best[0])}; "
    header = ["row", *sweep.columns, "best point"]
    lines = [
        f"## {sweep.title} — scale `{scale}`",
        "",
        "Each cell: ours (paper). The paper's numbers are ImageNet 256 FID-50K; at other scales "
        "only the direction between rows compares.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row, cells in rows.items():
        values = [cells.get(c, "") for c in sweep.columns]
        lines.append("| " + " | ".join([row, *values, notes.get(row, "").rstrip("; ")]) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(variants: list[VariantRuns], path: Path) -> Path:
    """FID against omega for every variant (one line per variant x interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v in variants:
        intervals = sorted({(r["t_min"], r["t_max"]) for r in v.results})
        for t_min, t_max in intervals:
            rows = sorted(
                (r for r in v.results if (r["t_min"], r["t_max"]) == (t_min, t_max)),
                key=lambda r: r["omega"],
            )
            label = v.name if len(intervals) == 1 else f"{v.name} [{t_min:g}, {t_max:g}]"
            ax.plot([r["omega"] for r in rows], [r["fid"] for r in rows], "o-", label=label)
    ax.set(xlabel="CFG scale omega", ylabel="FID", title="FID vs omega, all variants")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


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
            dest = directory / "grids" / f"{v.name}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            paths.append(dest)
    return paths


@flow(name="imf-report", log_prints=True)
def report_flow(
    target: str, scale: str | None = None, tracking: str = "", artifacts: str = "artifacts"
) -> Report:
    """Builds the report of a sweep (by name or parent run id) from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    parent = find_parent(client, target, scale)
    sweep_name = parent.data.tags.get("sweep")
    if not sweep_name:
        raise LookupError(f"run {target} is not a sweep's parent run (no 'sweep' tag)")
    sweep_file = parent.data.tags.get("sweep.file", "")
    sweep = load_sweep(sweep_file if Path(sweep_file).is_file() else sweep_name)
    run_scale = parent.data.tags.get("scale", "?")
    variants = variant_runs(client, parent, sweep)
    markdown = table_markdown(sweep, run_scale, variants)
    directory = Path(artifacts).resolve() / "reports" / f"{sweep_name}-{run_scale}"
    directory.mkdir(parents=True, exist_ok=True)
    md_path = directory / "report.md"
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown + "\n![FID vs omega](fid_vs_omega.png)\n")
    files = [md_path, plot_curves(variants, directory / "fid_vs_omega.png")]
    files += best_grids(client, variants, directory)
    for path in files:
        sub = "report/grids" if path.parent.name == "grids" else "report"
        client.log_artifact(parent.info.run_id, str(path), sub)
    create_markdown_artifact(
        markdown, key=f"imf-report-{sweep_name}-{run_scale}".replace("_", "-").lower()
    )
    return Report(sweep_name, markdown, directory, files)
