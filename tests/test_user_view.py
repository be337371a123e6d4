"""What a user sees after a smoke sweep: a quiet terminal, and MLflow pages (read through the
tracking server's REST API, as the UI reads them) whose runs, metrics and params say what they
are. One real `imf sweep` subprocess and one `mlflow server`."""

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from services import (
    free_port,
    mlflow_server,
    noise_report,
    noisy_lines,
    other_ray,
    ray_state,
    untouched,
)

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def smoke_sweep_beside_another_ray(tmp_path: Path) -> SimpleNamespace:
    """`imf sweep` of one variant beside another Ray on the machine, the latest one `ray start`
    recorded; then the experiment and its runs as the MLflow UI reads them from a server."""
    db = tmp_path / "mlflow.db"
    with other_ray() as other:
        before = ray_state(other.address)
        env = os.environ | {
            "PREFECT_HOME": str(tmp_path / "prefect"),
            "RAY_TMPDIR": str(other.temp),
        }
        env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # the command's own default must hold
        sweep = subprocess.run(
            [
                str(BIN / "imf"),
                "sweep",
                "table1b",
                "--scale=smoke",
                "--only=omega",
                f"paths.artifacts={tmp_path / 'artifacts'}",
                f"tracking.uri=sqlite:///{db}",
                "train.steps=30",
                "train.checkpoint_every=30",
                "eval.n_samples=200",
                "eval.shard_size=100",
                "eval.batch_size=100",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
        )
        other_ray_states = (before, ray_state(other.address))
    seen = SimpleNamespace(sweep=sweep, other_ray=other_ray_states)
    if sweep.returncode != 0:
        return seen
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with mlflow_server(port, f"sqlite:///{db}", tmp_path / "mlflow.log"):
        experiment = api(base, "experiments/get-by-name?experiment_name=sweep-table1b")
        seen.experiment = experiment["experiment"]
        search = {"experiment_ids": [seen.experiment["experiment_id"]]}
        seen.runs = api(base, "runs/search", search)["runs"]
    return seen


@pytest.mark.background(scenario=smoke_sweep_beside_another_ray)
def test_a_smoke_sweep_is_quiet_and_reads_well_in_mlflow(background):
    """Beside another Ray on the machine, the latest one `ray start` recorded: the sweep keeps
    to its own and leaves that one untouched (issue 33)."""
    output = background.sweep.stdout + background.sweep.stderr
    assert background.sweep.returncode == 0, output[-5000:]
    assert noisy_lines(output) == [], noise_report(output)
    assert untouched(*background.other_ray)
    progress = [line for line in output.splitlines() if re.search(r"step \d+/30 ", line)]
    assert progress and len(progress) == len(set(progress)), progress  # each line once
    assert all("omega: step" in line for line in progress), progress  # named by its variant

    tags = {t["key"]: t["value"] for t in background.experiment.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # the classic view
    by_stage: dict[str, list[dict]] = {}
    for run in background.runs:
        run_tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        by_stage.setdefault(run_tags.get("stage", "?"), []).append(run)
    (parent,) = by_stage["sweep"]
    (train,) = by_stage["train"]
    (evaluation,) = by_stage["evaluate"]
    assert parent["info"]["run_name"] == "table1b/smoke"
    assert train["info"]["run_name"] == "omega"
    assert evaluation["info"]["run_name"].startswith("omega / eval (omega ")
    train_metrics = {m["key"] for m in train["data"]["metrics"]}
    assert {"train/loss", "train/mse_u", "train/lr", "eval/fid_best"} <= train_metrics
    assert all(k.startswith(("train/", "eval/")) for k in train_metrics), train_metrics
    # The evaluation run is the variant's row in a compare view: its own headline numbers,
    # the same ones its (unshared) training run shows.
    eval_metrics = {m["key"]: m["value"] for m in evaluation["data"]["metrics"]}
    headline = {m["key"]: m["value"] for m in train["data"]["metrics"]}
    assert "eval/fid_best" in eval_metrics
    assert all(k.startswith("eval/") for k in eval_metrics), eval_metrics
    assert all(headline[k] == v for k, v in eval_metrics.items()), (eval_metrics, headline)
    for run in (train, evaluation):
        params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        assert params and "None" not in params.values(), params
    params = {p["key"]: p["value"] for p in train["data"]["params"]}
    assert params["model.depth"] == "4" and params["model.width"] == "64"
