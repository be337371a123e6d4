"""Everything MLflow: where runs go, creating and reopening them, and what each stage logs.

The stages call these helpers (with tasks.tracking_client, the client, tasks.journal, a
training's journaled record, and tasks.eval_tracking, an evaluation's run); nothing else in the
project imports mlflow. Runs are created by drivers before any worker starts (SQLite backends
lock under concurrent writers); rank 0 of a training only appends to its run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

from tasks.journal import append_record, replay, replay_all
from tasks.storage import Output, Store
from tasks.tracking_client import client, finish


def tracking_uri(cfg) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db (made absolute for workers)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


@dataclasses.dataclass(frozen=True)
class TrackingTarget:
    """Where a stage's MLflow run goes, resolved once from the experiment (TrackingTarget.of)."""

    uri: str  # tracking_uri: absolute, so that workers in other directories find it
    experiment: str  # tracking.experiment, else the experiment config's name
    run_name: str  # tracking.run_name ("" = the stage names its run)
    tags: dict[str, str]  # tracking.tags: the variant, its row, a sweep's parent run

    @classmethod
    def of(cls, cfg) -> TrackingTarget:
        t = cfg.tracking
        return cls(tracking_uri(cfg), t.experiment or cfg.name, t.run_name, dict(t.tags))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server must answer before any stage starts (MLflow's own client retries a
    dead server for minutes): one quick /health request, then the login (check_login). Local
    stores need no check."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as answer:
            problem = "" if answer.status == 200 else f"HTTP {answer.status}"
    except OSError as err:
        problem = str(getattr(err, "reason", err))
    if problem:
        raise ConnectionError(
            f"the MLflow tracking server at {uri} does not answer ({problem}); start it, or set "
            "tracking.uri (or MLFLOW_TRACKING_URI) to a reachable server or a local sqlite:/// file"
        )
    check_login(uri, timeout)


# What MLflow's client logs in with: the environment only, never a config key or the URI
# (the config is recorded as a run's params, and URIs are printed).
USER = "MLFLOW_TRACKING_USERNAME"
PASSWORD = "MLFLOW_TRACKING_PASSWORD"
TOKEN = "MLFLOW_TRACKING_TOKEN"


def login_headers() -> dict[str, str]:
    """The Authorization header MLflow's client sends: basic with a user and password from
    the environment, else a bearer token, else none."""
    import base64

    user, password = os.environ.get(USER), os.environ.get(PASSWORD)
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    if os.environ.get(TOKEN):
        return {"Authorization": f"Bearer {os.environ[TOKEN]}"}
    return {}


def check_login(uri: str, timeout: float = 5.0) -> None:
    """One search with the environment's login: a server running MLflow's basic-auth app
    answers 401 to a missing or wrong one, a server without it ignores the header.
    Refused here, a command stops before any work, naming the variables, not in the middle
    of a sweep."""
    import urllib.error
    import urllib.request

    search = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        request = urllib.request.Request(search, headers=login_headers())
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code == 401:
            sent = login_headers().get("Authorization", "").split(" ")[0]
            given = {"Basic": f"user {os.environ.get(USER)!r}", "Bearer": f"{TOKEN} set"}
            raise PermissionError(
                f"MLflow at {uri} refused the credentials (HTTP 401, "
                f"{given.get(sent, 'no login set')}): set {USER}/{PASSWORD}"
            ) from None
        if err.code == 403:  # a search needs no permission: MLflow's Host check, or a proxy
            answer = " ".join(err.read().decode(errors="replace").split())[:200]
            raise PermissionError(
                f"MLflow at {uri} refused the request (HTTP 403: {answer}); a server reached "
                "by another name than localhost needs it in `mlflow server --allowed-hosts`"
            ) from None
        raise


def check_no_password(uri: str) -> None:
    """A password in the tracking URI would be recorded (the config is a run's params) and
    printed: logins come from the environment."""
    from urllib.parse import urlsplit

    if urlsplit(uri).password is not None:
        raise ValueError(
            "tracking.uri (or MLFLOW_TRACKING_URI) holds a password, which would be recorded "
            f"with every run: remove it and set {USER}/{PASSWORD} (for a database URI, its "
            "driver's variable, e.g. PGPASSWORD)"
        )


def prepare(cfg) -> None:
    """Before any stage: the URI holds no password, the server answers and takes the login
    (or a clear error, at once), and what an outage left in earlier trainings' journals is
    sent now, completing their MLflow records."""
    uri = tracking_uri(cfg)
    check_no_password(uri)
    check_reachable(uri)
    replay_all(Store.of(cfg.paths.artifacts), uri)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def get_run_or_none(mlflow_client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id)
    except MlflowException:
        return None


# MLflow 3's UI opens an experiment without this tag in its GenAI mode (traces, judges); the
# classic model-training view is the one whose runs, params and metrics we log.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def experiment_id(runs, name: str) -> str:
    """The experiment `name` (created when missing), marked as a model-training experiment."""
    found = runs.get_experiment_by_name(name)
    if found is None:
        return runs.create_experiment(name, tags={KIND_TAG: MODEL_TRAINING})
    if found.tags.get(KIND_TAG) != MODEL_TRAINING:
        runs.set_experiment_tag(found.experiment_id, KIND_TAG, MODEL_TRAINING)
    return found.experiment_id


def open_run(
    uri: str,
    out: Output,
    experiment: str,
    run_name: str,
    tags: dict,
    params,
    datasets: list | None = None,
) -> str:
    """The MLflow run whose id `out` keeps (RUN_ID), reopened (RUNNING) on a resume; else a new run
    in `experiment` (created when missing) with `tags`, the params `params()` returns and the
    `datasets` it reads (dataset_input), its id written to `out` last, so a kept id always
    names a complete run. On a resume the owner and provenance tags are the resuming
    process's: the code that ran last."""
    from mlflow.entities import Param, RunTag

    from tasks.provenance import provenance_tags

    runs = client(uri)
    reap_dead_runs(uri)  # runs left RUNNING by killed processes: KILLED (or resumed below)
    owner = owner_tags() | provenance_tags()
    if out.exists(RUN_ID):
        run_id = kept_run_id(out)
        runs.update_run(run_id, "RUNNING")
        runs.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner.items()])
        return run_id
    run_id = runs.create_run(experiment_id(runs, experiment), run_name=run_name, tags=tags | owner)
    run_id = run_id.info.run_id
    items = list(params().items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        batch = [Param(k, v[:500]) for k, v in items[start : start + 100]]
        runs.log_batch(run_id, params=batch)
    if datasets:
        log_inputs(runs, run_id, datasets)
    out.write_text(RUN_ID, run_id)
    return run_id


RUN_ID = "mlflow_run_id"  # in an output: the id of its MLflow run (open_run)


def kept_run_id(out: Output) -> str:
    """The id of the MLflow run `out` keeps ("" when it has none: untracked)."""
    return out.read_text(RUN_ID).strip() if out.exists(RUN_ID) else ""


STALE_TAG = "imf.stale"  # on a run whose numbers another method version made (tasks.artifacts)


def mark_stale(uri: str, run_id: str, reason: str) -> None:
    """Tags the MLflow run of a reused (or resumed) output that another method version made,
    so its page and the sweep report say so; a tracking outage only loses the tag (the
    terminal said it, and the output's manifest records its versions)."""
    if not run_id:
        return
    try:
        client(uri).set_tag(run_id, STALE_TAG, reason)
    except Exception as err:  # noqa: BLE001 - an annotation, never a reason to fail the stage
        print(f"could not tag run {run_id} as stale ({type(err).__name__}: {err})")


def log_inputs(runs, run_id: str, datasets: list) -> None:
    """MLflow's log_inputs, once more if two runs registered the same dataset at once (its SQL
    store creates a dataset row without a lock: concurrent variants of a sweep collided)."""
    from mlflow.exceptions import MlflowException

    try:
        runs.log_inputs(run_id, datasets=datasets)
    except MlflowException:
        time.sleep(0.5)
        runs.log_inputs(run_id, datasets=datasets)


def dataset_input(pre, context: str):
    """The precompute output as an MLflow dataset (the runs table's Dataset column): its data
    and tokenizer as the name, its content key as the digest, its rows in the profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from tasks.artifacts import Manifest

    manifest = Manifest.read(pre.out)
    config, extra = manifest.config, manifest.extra
    name = f"{config['data']['name']} ({config['tokenizer']['name']})"
    profile = {"num_rows": extra.get("num_rows"), "num_classes": extra.get("num_classes")}
    schema = {"latent_shape": extra.get("latent_shape"), "flips": extra.get("flips")}
    dataset = Dataset(
        name=name,
        digest=pre.key[:36],
        source_type="local",
        source=json.dumps({"uri": pre.out.uri}),
        schema=json.dumps(schema),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def end_run(
    uri: str, run_id: str, error: BaseException | None = None, journal: Output | None = None
):
    """Marks the run FINISHED; FAILED with the error as a tag; or KILLED with the reason after
    a stop signal ("preempted (SIGTERM)") or Ctrl-C (a resume reopens it). With a training's
    output as `journal`, the end is its journal's last record: sent now if the server
    answers, else by the next replay."""
    from tasks.preemption import Preempted

    status, message = "FINISHED", ""
    if isinstance(error, Preempted):  # a signal: checkpointed, a relaunch resumes
        status, message = "KILLED", error.reason
    elif isinstance(error, KeyboardInterrupt | SystemExit):
        status, message = "KILLED", "interrupted by the user"
    elif error is not None:
        status, message = "FAILED", f"{type(error).__name__}: {error}"[:5000]
    if journal is None:
        finish(client(uri), run_id, status, message)
        return
    append_record(journal, {"end": status, "error": message, "run_id": run_id})
    replay(journal, uri)


def owner_tags() -> dict[str, str]:
    """Which process owns a RUNNING run: reap_dead_runs marks it KILLED once that is gone."""
    return {"imf.host": socket.gethostname(), "imf.pid": str(os.getpid())}


def reap_dead_runs(uri: str) -> list[str]:
    """Marks KILLED every RUNNING run whose owner process on this host is gone (a SIGKILL,
    an OOM kill, a lost machine session): MLflow would show it RUNNING forever. Returns the
    run ids it marked. Runs of other hosts are left to commands there."""
    runs = client(uri)
    experiments = [e.experiment_id for e in runs.search_experiments()]
    if not experiments:
        return []
    host = socket.gethostname()
    where = f"attributes.status = 'RUNNING' and tags.`imf.host` = '{host}'"
    reaped = []
    for run in runs.search_runs(experiments, where, max_results=1000):
        pid = int(run.data.tags.get("imf.pid", "0"))
        if pid and not process_alive(pid):
            runs.set_tag(run.info.run_id, "error", f"killed: its process (pid {pid}) is gone")
            runs.set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    return reaped


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
