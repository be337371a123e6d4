"""Paper-style reports from MLflow: the sweep's table with the paper's numbers beside ours.

    imf report table1a [--scale smoke]      # the latest run of that sweep
    imf report <mlflow run id>              # a sweep's parent run

Writes `<artifacts>/reports/<name>/report.md`, `fid_vs_omega.png` (every variant's curve on
one plot), `fid_vs_step.png` (FID during training, tasks.inrun_eval, one line per variant)
and `grids/<variant>.png` (each variant's best-point sample grid); logs them to the
sweep's parent run and publishes the markdown as a Prefect artifact. Everything is read back
from MLflow (tags `variant.<name>` on the parent run), so a report works from any machine that
reaches the tracking server. The runs are read by flows.report_runs, the markdown written by
flows.report_table, the figures drawn by flows.report_plots.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.report_plots import plot_curves, plot_progress
from flows.report_runs import best_grids, find_parent, variant_runs
from flows.report_table import paper_table, progress_markdown, table_markdown
from flows.sweep_config import load_sweep
from tasks.provenance import code_record
from tasks.storage import Store
from tasks.tracking_client import client as tracking_client


@dataclass
class Report:
    name: str
    markdown: str
    directory: str | Path  # a local directory, or an s3:// URI
    files: list[Path]


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
    out = Store.of(artifacts).output("reports", f"{sweep_name}-{run_scale}")
    grids = step(best_grids, name="fetch sample grids")(client, variants, out)
    plot = step(plot_curves, name="plot FID vs omega")(variants, out, "fid_vs_omega.png")
    progress = step(plot_progress, name="plot FID vs training step")(
        variants, out, "fid_vs_step.png"
    )
    pictures = ["", "![FID vs omega](fid_vs_omega.png)", ""]
    if progress is not None:
        pictures += [progress_markdown(sweep, variants), "![FID vs step](fid_vs_step.png)", ""]
    pictures += ["### Samples at each variant's best point", ""]
    pictures += [f"![{Path(g).stem}]({g})" for g in grids]
    out.write_text("report.md", markdown + "\n".join(pictures) + "\n")
    names = ["report.md", plot, *([progress] if progress else []), *grids]
    files = [out.local_path(n) for n in names]
    for name, path in zip(names, files, strict=True):
        sub = "report/grids" if name.startswith("grids/") else "report"
        client.log_artifact(parent.info.run_id, str(path), sub)
    # The paper's table on the parent run, in MLflow's table view too.
    client.log_table(parent.info.run_id, paper_table(sweep, variants), "report/table.json")
    create_markdown_artifact(
        markdown, key=f"imf-report-{sweep_name}-{run_scale}".replace("_", "-").lower()
    )
    return Report(sweep_name, markdown, out.location, files)
