"""The team setup, for real: an MLflow server and a Prefect server on PostgreSQL, both behind
authentication (docs/auth.md), a Ray cluster of a head and a worker that joins by address, and
a sweep whose variants write concurrently. Every run, metric and artifact must arrive; no
request without the login gets through, and the login is recorded nowhere. Skipped (with the
reason) without PostgreSQL."""

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from subprocess import PIPE
from types import SimpleNamespace

import pytest
from services import (
    basic_auth,
    free_port,
    http_status,
    mlflow_auth_env,
    mlflow_server,
    ray_cluster,
    ray_temp_dir,
    service,
    started_together,
)

from tasks.cluster import environment

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


PIPELINE_USER = "imf-pipeline"


def team_sweep(tmp_path: Path) -> SimpleNamespace:
    """`imf sweep` of Tab. 1b's four variants against the team setup, its servers behind
    authentication as docs/auth.md sets them up (MLflow's basic-auth app, its users on
    PostgreSQL too; Prefect with an API auth string) and the pipeline's logins in its
    environment only; beside it, two commands refused for their logins. Then what MLflow and
    Prefect hold of it, read while the servers are up, and which of the files the servers,
    the Ray cluster and the sweep wrote hold a secret. Skipped without PostgreSQL (the skip is
    raised in the test that reads this)."""
    postgres_or_skip()

    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    prefect_url = f"http://127.0.0.1:{prefect_port}/api"
    tag = f"imf_it_{os.getpid()}"
    # A head and a second node joining by address, with token authentication. The nodes are
    # started without the pipeline's logins: rank 0 of a training gets them from the command.
    ray_env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    login = {"MLFLOW_TRACKING_USERNAME": PIPELINE_USER}
    login["MLFLOW_TRACKING_PASSWORD"] = secrets.token_hex(16)
    auth_string = f"imf:{secrets.token_hex(16)}"
    prefect_login = {"PREFECT_API_AUTH_STRING": auth_string}
    with (
        fresh_database(f"{tag}_mlflow") as mlflow_db,
        fresh_database(f"{tag}_mlflow_auth") as auth_db,
        fresh_database(f"{tag}_prefect") as prefect_db,
        ray_temp_dir() as ray_temp,
    ):
        auth = mlflow_auth_env(tmp_path, f"postgresql+psycopg2://{auth_db}")
        prefect_env = {
            "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{prefect_db}",
            "PREFECT_SERVER_API_AUTH_STRING": auth_string,
        }
        # The two servers start in parallel; the cluster once they are up: Ray binds random ports
        # of its own, and started beside them it once took the one chosen for a server.
        with (
            started_together(
                mlflow_server(
                    mlflow_port,
                    f"postgresql+psycopg2://{mlflow_db}",
                    tmp_path / "mlflow.log",
                    tmp_path / "mlflow-artifacts",
                    auth=auth,
                ),
                service(
                    [
                        str(BIN / "prefect"),
                        "server",
                        "start",
                        "--host=127.0.0.1",
                        f"--port={prefect_port}",
                    ],
                    f"{prefect_url}/health",
                    tmp_path / "prefect.log",
                    env=env | prefect_env,
                ),
            ),
            ray_cluster(ray_temp, nodes=2, env=ray_env, log=tmp_path) as ray_address,
        ):
            admin = basic_auth("admin", auth["MLFLOW_AUTH_ADMIN_PASSWORD"])
            user = {"username": PIPELINE_USER, "password": login["MLFLOW_TRACKING_PASSWORD"]}
            seen = SimpleNamespace(
                tmp_path=tmp_path,
                mlflow_url=mlflow_url,
                prefect_url=prefect_url,
                user_created=http_status(
                    f"{mlflow_url}/api/2.0/mlflow/users/create", json.dumps(user).encode(), admin
                ),
                anonymous={
                    "mlflow": http_status(f"{mlflow_url}/api/2.0/mlflow/experiments/search"),
                    "prefect": http_status(f"{prefect_url}/flows/filter", b"{}"),
                },
            )
            # What must be nowhere: the pipeline's logins (also as the headers that carry them)
            # and the servers' own secrets
            password = login["MLFLOW_TRACKING_PASSWORD"]
            seen.secrets = [password, auth_string, auth["MLFLOW_AUTH_ADMIN_PASSWORD"]]
            seen.secrets += [auth["MLFLOW_FLASK_SERVER_SECRET_KEY"]]
            seen.secrets += [basic_auth(PIPELINE_USER, password)["Authorization"].split()[1]]
            seen.secrets += [basic_auth(*auth_string.split(":"))["Authorization"].split()[1]]
            client_env = env | ray_env | {"PREFECT_API_URL": prefect_url}
            tracked = [f"tracking.uri={mlflow_url}", f"paths.artifacts={tmp_path / 'refused'}"]
            wrong = {"MLFLOW_TRACKING_PASSWORD": secrets.token_hex(16)}
            refused = {  # beside the sweep: each stops at its preflight
                "mlflow": imf(["run", *tracked], client_env | login | wrong | prefect_login),
                "prefect": imf(["run", *tracked], client_env | login),
            }
            sweep = subprocess.run(
                [
                    str(BIN / "imf"),
                    "sweep",
                    "table1b",
                    "--scale=smoke",
                    "--concurrency=2",  # two variants train at once, one per Ray node
                    f"train.ray_address={ray_address}",
                    f"tracking.uri={mlflow_url}",
                    f"paths.artifacts={tmp_path / 'artifacts'}",
                    f"train.steps={STEPS}",
                    "train.checkpoint_every=30",
                    "train.log_every=10",
                    "eval.n_samples=200",
                    "eval.shard_size=100",
                    "eval.batch_size=100",
                ],
                env=client_env | login | prefect_login,
                capture_output=True,
                text=True,
                timeout=1500,
            )
            seen.sweep = sweep
            seen.refused = {k: finished(p) for k, p in refused.items()}
            seen.wrong_password = wrong["MLFLOW_TRACKING_PASSWORD"]
            if sweep.returncode != 0:
                return seen
            with environment(**login):  # MLflow's client logs in with these only
                mlflow_records(mlflow_url, seen)
            seen.prefect = prefect_runs(prefect_url, auth_string)
        # After the servers stopped (their logs complete), before Ray's folder is removed
        seen.files_with_secrets = files_holding(seen.secrets, tmp_path, ray_temp)
        seen.mlflow_401 = (tmp_path / "mlflow.log").read_text().count('HTTP/1.1" 401')
        return seen


def imf(args: list[str], env: dict) -> subprocess.Popen:
    """An `imf` command started with `env`, its output captured."""
    return subprocess.Popen([str(BIN / "imf"), *args], env=env, stdout=PIPE, stderr=PIPE, text=True)


def finished(proc: subprocess.Popen) -> SimpleNamespace:
    out, err = proc.communicate(timeout=120)
    return SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err)


def mlflow_records(url: str, seen: SimpleNamespace) -> None:
    """What MLflow holds of the sweep: the parent run, each variant's training run with its
    loss steps and its evaluation's artifacts, and every param and tag value of every run."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("sweep-table1b")
    seen.parents = client.search_runs([experiment.experiment_id], "tags.stage = 'sweep'")
    seen.variants = {}
    for name, run_id in seen.parents[0].data.tags.items():
        if name.startswith("variant.") and name.count(".") == 1:
            seen.variants[name.removeprefix("variant.")] = SimpleNamespace(
                run=client.get_run(run_id),
                loss_steps=sorted(m.step for m in client.get_metric_history(run_id, "train/loss")),
            )
    for name, variant in seen.variants.items():
        evaluation = seen.parents[0].data.tags[f"variant.{name}.eval"]
        variant.eval_artifacts = {a.path for a in client.list_artifacts(evaluation)}
    every_run = client.search_runs([experiment.experiment_id], max_results=1000)
    seen.recorded = [
        value for r in every_run for value in [*r.data.params.values(), *r.data.tags.values()]
    ]
    seen.runs_recorded = len(every_run)


def files_holding(texts: list[str], *folders: Path) -> list[str]:
    """The files under `folders` in which any of `texts` occurs."""
    needles = [t.encode() for t in texts]
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if any(n in data for n in needles):
                    found.append(str(path))
    return found


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


@pytest.mark.background(scenario=team_sweep)
def test_the_team_servers_refuse_requests_without_a_valid_login(background):
    """Without a login both servers answer 401; a command with a wrong MLflow password or
    without Prefect's auth string stops before any work with one line naming what to set."""
    assert background.user_created == 200  # the admin's password (from the environment) works
    assert background.anonymous == {"mlflow": 401, "prefect": 401}
    mlflow, prefect = background.refused["mlflow"], background.refused["prefect"]
    assert mlflow.returncode == 2, mlflow.stdout[-2000:] + mlflow.stderr[-3000:]
    assert mlflow.stderr.strip().splitlines() == [
        f"imf run: error: MLflow at {background.mlflow_url} refused the credentials "
        "(HTTP 401, user 'imf-pipeline'): set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
    ]
    assert prefect.returncode == 2, prefect.stdout[-2000:] + prefect.stderr[-3000:]
    assert prefect.stderr.strip().splitlines() == [
        f"imf run: error: Prefect at {background.prefect_url} refused the credentials "
        "(HTTP 401, no auth string set): set PREFECT_API_AUTH_STRING to the server's "
        "user:password"
    ]
    assert not (background.tmp_path / "refused").exists()  # nothing started
    for command in (mlflow, prefect):
        assert background.wrong_password not in command.stdout + command.stderr


@pytest.mark.background(scenario=team_sweep)
def test_no_login_is_recorded_logged_or_printed(background):
    """The logins reached every process that logs (the sweep finished and is recorded, its
    trainings' rank 0 on Ray nodes started without them), and none of them, nor the
    servers' secrets, is in a run's params or tags, in what Prefect keeps of the flow runs
    (parameters, logs), in the sweep's output, or in any file the servers, the Ray cluster
    and the sweep wrote (logs, artifacts, manifests, journals, Ray's session folder)."""
    sweep = background.sweep
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-5000:]
    assert background.runs_recorded >= 1 + 4 + 4  # the parent, 4 trainings, 4 evaluations
    # MLflow refused the anonymous request and the wrong password's check, nothing else: rank 0
    # of each training sent its metrics with the login (the driver's replay at the end would
    # otherwise have hidden a refused worker)
    assert background.mlflow_401 == 2
    for secret in background.secrets:
        assert not [value for value in background.recorded if secret in value]
        assert secret not in background.prefect["kept"]
        assert secret not in sweep.stdout + sweep.stderr
    assert background.files_with_secrets == []


def prefect_runs(url: str, auth_string: str) -> dict:
    """The flow runs' names and states, the task runs' states, and everything the server
    keeps of them (parameters, names, every log line) as one text."""
    import base64

    login = base64.b64encode(auth_string.encode()).decode()

    def post(path: str, offset: int = 0) -> list:
        request = urllib.request.Request(
            f"{url}/{path}",
            data=json.dumps({"offset": offset}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Basic {login}"},
        )
        page = json.loads(urllib.request.urlopen(request, timeout=10).read())
        return page + post(path, offset + len(page)) if page else page

    flows = {f["id"]: f["name"] for f in post("flows/filter")}
    flow_runs, tasks = post("flow_runs/filter"), post("task_runs/filter")
    runs: dict[str, list[str]] = {}
    for run in flow_runs:
        runs.setdefault(flows[run["flow_id"]], []).append(run["state_type"])
    return {
        "flow_runs": runs,
        "task_states": {t["state_type"] for t in tasks},
        "tasks": len(tasks),
        "kept": json.dumps([flow_runs, tasks, post("logs/filter")]),
    }
