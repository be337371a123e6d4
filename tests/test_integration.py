"""The team setup, for real: an MLflow server and a Prefect server on PostgreSQL, a Ray cluster
of a head and a worker that joins by address, and a sweep whose variants write concurrently.
Every run, metric and artifact must arrive. Skipped (with the reason) without PostgreSQL."""

import os
import secrets
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from services import (
    free_port,
    mlflow_server,
    ray_cluster,
    ray_temp_dir,
    service,
    started_together,
)

pytestmark = pytest.mark.slow

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
BIN = Path(sys.executable).parent
STEPS = 60


def postgres_or_skip():
    try:
        import psycopg2

        psycopg2.connect(dbname="test", connect_timeout=3, **PG).close()
    except Exception as err:  # no server, no driver, no access
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 ({type(err).__name__}: {err})")


@contextmanager
def fresh_database(name: str):
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", **PG)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def team_sweep(tmp_path: Path) -> SimpleNamespace:
    """`imf sweep` of Tab. 1b's four variants against the team setup; then what MLflow and
    Prefect hold of it, read while the servers are up. Skipped without PostgreSQL (the
    skip is raised in the test that reads this)."""
    postgres_or_skip()
    from mlflow import MlflowClient

    mlflow_port, prefect_port = free_port(), free_port()
    tag = f"imf_it_{os.getpid()}"
    # A head and a second node joining by address, with token authentication.
    ray_env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with (
        fresh_database(f"{tag}_mlflow") as mlflow_db,
        fresh_database(f"{tag}_prefect") as prefect_db,
        ray_temp_dir() as ray_temp,
        started_together(  # the two servers and the cluster start in parallel
            mlflow_server(
                mlflow_port,
                f"postgresql+psycopg2://{mlflow_db}",
                tmp_path / "mlflow.log",
                tmp_path / "mlflow-artifacts",
            ),
            service(
                [
                    str(BIN / "prefect"),
                    "server",
                    "start",
                    "--host=127.0.0.1",
                    f"--port={prefect_port}",
                ],
                f"http://127.0.0.1:{prefect_port}/api/health",
                tmp_path / "prefect.log",
                env=env
                | {"PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{prefect_db}"},
            ),
            ray_cluster(ray_temp, nodes=2, env=ray_env, log=tmp_path),
        ) as (_, _, ray_address),
    ):
        sweep = subprocess.run(
            [
                str(BIN / "imf"),
                "sweep",
                "table1b",
                "--scale=smoke",
                "--concurrency=2",  # two variants train at once, one per Ray node
                f"train.ray_address={ray_address}",
                f"tracking.uri=http://127.0.0.1:{mlflow_port}",
                f"paths.artifacts={tmp_path / 'artifacts'}",
                f"train.steps={STEPS}",
                "train.checkpoint_every=30",
                "train.log_every=10",
                "eval.n_samples=200",
                "eval.shard_size=100",
                "eval.batch_size=100",
            ],
            env=env | ray_env | {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"},
            capture_output=True,
            text=True,
            timeout=1500,
        )
        seen = SimpleNamespace(sweep=sweep)
        if sweep.returncode != 0:
            return seen
        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("sweep-table1b")
        seen.parents = client.search_runs([experiment.experiment_id], "tags.stage = 'sweep'")
        seen.variants = {}
        for name, run_id in seen.parents[0].data.tags.items():
            if name.startswith("variant.") and name.count(".") == 1:
                seen.variants[name.removeprefix("variant.")] = SimpleNamespace(
                    run=client.get_run(run_id),
                    loss_steps=sorted(
                        m.step for m in client.get_metric_history(run_id, "train/loss")
                    ),
                )
        for name, variant in seen.variants.items():
            evaluation = seen.parents[0].data.tags[f"variant.{name}.eval"]
            variant.eval_artifacts = {a.path for a in client.list_artifacts(evaluation)}
        seen.prefect = prefect_runs(prefect_port)
        return seen


@pytest.mark.background(scenario=team_sweep)
def test_sweep_against_postgres_backed_services_and_a_ray_cluster(background):
    sweep = background.sweep
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-5000:]

    # MLflow: the parent, four finished variants, every logged step, every artifact.
    (parent,) = background.parents
    assert parent.info.status == "FINISHED"
    variants = {"imf_aux", "imf_aux_cfg", "omega", "omega_interval"}
    assert set(background.variants) == variants
    for name, variant in background.variants.items():
        assert parent.data.tags[f"variant.{name}.status"] == "ok"
        run = variant.run
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert variant.loss_steps == list(range(10, STEPS + 1, 10)), name
        assert "eval/fid_best" in run.data.metrics
        assert {"results.json", "grids"} <= variant.eval_artifacts, name
    # Prefect: one sweep flow run, completed, with every stage task completed.
    flows = background.prefect
    assert flows["flow_runs"] == {"imf-sweep": ["COMPLETED"]}
    assert flows["task_states"] == {"COMPLETED"}
    assert flows["tasks"] >= 1 + 4 + 4  # precompute + train + evaluate per variant


def prefect_runs(port: int) -> dict:
    import json

    def post(path: str) -> list:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/{path}",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        return json.loads(urllib.request.urlopen(request, timeout=10).read())

    flows = {f["id"]: f["name"] for f in post("flows/filter")}
    runs: dict[str, list[str]] = {}
    for run in post("flow_runs/filter"):
        runs.setdefault(flows[run["flow_id"]], []).append(run["state_type"])
    tasks = post("task_runs/filter")
    return {
        "flow_runs": runs,
        "task_states": {t["state_type"] for t in tasks},
        "tasks": len(tasks),
    }
