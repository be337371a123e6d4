"""An evaluation's MLflow run: its settings, headline numbers, grid points, plots and grids
(log_evaluation, called by tasks.evaluate), and the summary numbers the sweep report reads back
(summary_metrics). Where runs go and how they are created: tasks.tracking."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tasks.tracking import dataset_input, experiment_id, flatten, log_inputs

TRAINING_METHODS_TAG = "imf.training_method_versions"  # an evaluation's training's (manifest)

# The summary numbers charted on a training run's page (see log_evaluation).
HEADLINE = ("fid_best", "fid_no_cfg", "fid_many_step_best")


def log_evaluation(
    job,
    trained,
    key: str,
    results: list[dict],
    points: list[str],
    artifacts: list[Path],
    device: str = "",
) -> str:
    """An MLflow run of the evaluation: the variant's settings, its headline numbers, every
    grid point in a table, the plots and grids.

    Nested under the training run when there is one. The evaluation run is the variant's own
    row in a compare view: it carries the training's params with this evaluation's settings,
    the variant's tags and its headline FIDs -- several evaluations can share one training
    (Tab. 2's 1- and 2-NFE rows, Tab. 1b reusing Tab. 1a's trainings), and each keeps its own
    number. The training run also gets the headline of its own variant's evaluation (the one
    whose variant tag it bears), never another's, beside its training curves. For given weights
    (eval.checkpoint), a run of its own in the experiment, with the checkpoint as params.
    `job` is the evaluation's (tasks.evaluate.EvalJob: its settings, tracking target and the
    precompute output it read, its Dataset), `device` what the units ran on. Returns the run
    id ("" when the training is untracked)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from tasks.artifacts import Manifest, versions_text
    from tasks.provenance import provenance_tags

    train_run = getattr(trained, "mlflow_run_id", "")
    checkpoint = not hasattr(trained, "steps")  # given weights (eval.checkpoint), no training
    if not (train_run or checkpoint):
        return ""
    client = MlflowClient(job.tracking.uri)
    tags = job.tracking.tags | {"stage": "evaluate", "eval_key": key} | provenance_tags(device)
    if not checkpoint:  # which method versions made the training it samples (the report's rows)
        made = Manifest.read(trained.out)
        tags[TRAINING_METHODS_TAG] = versions_text(made.code.get("methods") if made else None)
    omegas = sorted({r["omega"] for r in results})
    grid = f"omega {omegas[0]:g}-{omegas[-1]:g}, {len(results)} points"
    params: dict[str, str] = {}
    own_variant = True
    if train_run:
        parent = client.get_run(train_run)
        experiment = parent.info.experiment_id
        tags["mlflow.parentRunId"] = train_run
        variant = job.tracking.tags.get("variant", "")
        own_variant = parent.data.tags.get("variant", "") == variant
        label = variant if variant and not own_variant else parent.info.run_name
        name = f"{label} / eval ({grid})"
        params = {k: v for k, v in parent.data.params.items() if not k.startswith("eval.")}
    else:
        experiment = experiment_id(client, job.tracking.experiment)
        tags["checkpoint"] = str(trained.weights)
        name = f"eval {trained.weights.name} ({grid})"
    run = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    if job.data is not None:
        log_inputs(client, run, [dataset_input(job.data, "evaluation")])
    source = {"checkpoint_key": trained.key} if checkpoint else {"train_key": trained.key}
    params |= flatten({"eval": dataclasses.asdict(job.eval)} | source)
    items = [Param(k, v[:500]) for k, v in params.items() if v != "None"]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run, params=items[start : start + 100])
    # Every grid point in one table (MLflow's table view), not dozens of single-bar charts.
    client.log_table(run, points_table(results, points), "eval/points.json")
    best = next(r for r in results if r["best"])
    stamp = int(time.time() * 1000)
    summary = summary_metrics(results, job.guidance_mode)
    # A run's page lists its chart sections alphabetically, `eval/` above `train/`: only the
    # FIDs a compare view sets side by side are metrics (one row of charts, the training curves
    # right below on a training run); the rest of the summary (best point, IS, accuracy, floor,
    # ceiling) are tags of those names.
    charted = {k: v for k, v in summary.items() if k in HEADLINE}
    metrics = [Metric(f"eval/{k}", v, stamp, 0) for k, v in charted.items()]
    verdict = [RunTag("did_not_learn", str(best["did_not_learn"]).lower())]
    if best.get("ignores_omega") is not None:
        verdict.append(RunTag("ignores_omega", str(best["ignores_omega"]).lower()))
    rest = [RunTag(f"eval/{k}", f"{v:.6g}") for k, v in summary.items() if k not in charted]
    client.log_batch(run, metrics=metrics, tags=verdict + rest)
    if train_run and own_variant:
        client.log_batch(train_run, metrics=metrics, tags=verdict + rest)
    for path in artifacts:
        client.log_artifact(run, str(path), "grids" if path.parent.name == "grids" else None)
    client.set_terminated(run)
    return run


def points_table(results: list[dict], points: list[str]) -> dict[str, list]:
    """One row per CFG point: FID, IS, accuracy, diversity and the many-step calibration."""
    columns = ("omega", "t_min", "t_max", "fid", "is", "accuracy", "precision", "recall")
    table: dict[str, list] = {"point": list(points)}
    for c in columns:
        if all(c in r for r in results):
            table[c] = [float(r[c]) for r in results]
    if all("many_step" in r for r in results):
        table["many_step_fid"] = [float(r["many_step"]["fid"]) for r in results]
    table["best"] = [bool(r["best"]) for r in results]
    return table


def summary_metrics(results: list[dict], guidance_mode: str) -> dict[str, float]:
    """The best point's numbers (`*_best`), the no-CFG point's (`*_no_cfg`) and the calibration
    every number needs beside it (`eval/` in MLflow; the sweep files name them unprefixed), from
    an evaluation's results.json and the training's guidance.mode."""
    best = next(r for r in results if r["best"])
    names = ("fid", "is", "omega", "t_min", "t_max", "accuracy")
    out = {f"{k}_best": float(best[k]) for k in names if k in best}
    # Without CFG = the omega = 1 point (the interval does not matter there): the paper's
    # "w/o CFG" column for omega-conditioned models.
    no_cfg = next((r for r in results if r["omega"] == 1.0), None)
    if no_cfg is not None and guidance_mode != "fixed":  # fixed: omega is baked in
        out |= {f"{k}_no_cfg": float(no_cfg[k]) for k in ("fid", "is", "accuracy") if k in no_cfg}
    if "real_data_floor" in best:
        out["fid_real_floor"] = best["real_data_floor"]["fid"]
        out["fid_class_mean_ceiling"] = best["class_mean_ceiling"]["fid"]
    if "many_step" in best:
        out["fid_many_step_best"] = best["many_step"]["fid"]
    for name, points in best.get("sensitivity", {}).items():  # e.g. sensitivity_omega_one_step
        out |= {f"sensitivity_{name}_{point}": value for point, value in points.items()}
    return out
