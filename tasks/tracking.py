"""Everything MLflow: where runs go, creating and reopening them, and what each stage logs.

The stages call these helpers; nothing else in the project imports mlflow. Runs are created by
drivers before any worker starts (SQLite backends lock under concurrent writers); rank 0 of a
training only appends to its run.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path


def tracking_uri(cfg) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db (made absolute for workers)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server must answer before any stage starts (MLflow's own client retries a
    dead server for minutes): one quick /health request. Local stores need no check."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as answer:
            if answer.status == 200:
                return
            problem = f"HTTP {answer.status}"
    except OSError as err:
        problem = str(getattr(err, "reason", err))
    raise ConnectionError(
        f"the MLflow tracking server at {uri} does not answer ({problem}); start it, or set "
        "tracking.uri (or MLFLOW_TRACKING_URI) to a reachable server or a local sqlite:/// file"
    )


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def client(uri: str):
    """An MLflow client for `uri` (callers outside this module never import mlflow)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


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


def open_run(uri: str, id_file: Path, experiment: str, run_name: str, tags: dict, params) -> str:
    """The MLflow run whose id `id_file` keeps, reopened (RUNNING) on a resume; else a new run
    in `experiment` (created when missing) with `tags` and the params `params()` returns, its
    id written to `id_file` last, so a kept id always names a complete run."""
    from mlflow.entities import Param

    runs = client(uri)
    reap_dead_runs(uri)  # runs left RUNNING by killed processes: KILLED (or resumed below)
    owner = owner_tags()
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        runs.update_run(run_id, "RUNNING")
        for key, value in owner.items():  # the process that now owns the run
            runs.set_tag(run_id, key, value)
        return run_id
    run_id = runs.create_run(experiment_id(runs, experiment), run_name=run_name, tags=tags | owner)
    run_id = run_id.info.run_id
    items = list(params().items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        batch = [Param(k, v[:500]) for k, v in items[start : start + 100]]
        runs.log_batch(run_id, params=batch)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return run_id


def end_run(cfg, run_id: str, error: BaseException | None = None) -> None:
    """Marks the run FINISHED; FAILED with the error as a tag; or KILLED, "interrupted by the
    user", after Ctrl-C (a resume reopens it)."""
    runs = client(tracking_uri(cfg))
    status = "FINISHED"
    if isinstance(error, KeyboardInterrupt | SystemExit):
        status = "KILLED"
        runs.set_tag(run_id, "error", "interrupted by the user")
    elif error is not None:
        status = "FAILED"
        runs.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
    runs.set_terminated(run_id, status)


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


class RunWriter:
    """Appends metrics and files to one run (a training's rank 0)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, v, stamp, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def last_step(self, metric: str) -> int:
        """The last step of `metric` already in the run (0 for a new run)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, metric)), default=0)

    def artifact(self, path: Path, directory: str) -> None:
        self.client.log_artifact(self.run_id, str(path), directory)


def log_evaluation(
    cfg, trained, key: str, results: list[dict], points: list[str], artifacts: list[Path]
) -> str:
    """An MLflow run of the evaluation: per-point metrics, the best point, the plots and grids.

    Nested under the training run when there is one, whose run also gets the best point's
    numbers (so the compare view of training runs shows FID beside their params); for given
    weights (eval.checkpoint), a run of its own in the experiment, with the checkpoint as params.
    Returns the run id ("" when the training is untracked)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    def tag_list(tags: dict[str, str]) -> list:
        return [RunTag(k, v) for k, v in tags.items()]

    train_run = getattr(trained, "mlflow_run_id", "")
    checkpoint = not hasattr(trained, "steps")  # given weights (eval.checkpoint), no training
    if not (train_run or checkpoint):
        return ""
    client = MlflowClient(tracking_uri(cfg))
    tags = cfg.tracking.tags | {"stage": "evaluate", "eval_key": key}
    if train_run:
        experiment = client.get_run(train_run).info.experiment_id
        tags["mlflow.parentRunId"] = train_run
        name = f"eval-{key[:8]}"
    else:
        experiment = experiment_id(client, cfg.tracking.experiment or cfg.name)
        tags["checkpoint"] = str(trained.weights)
        name = f"eval {trained.weights.name}"
    run = client.create_run(experiment, run_name=name, tags=tags)
    if checkpoint:
        params = flatten({"eval": dataclasses.asdict(cfg.eval), "checkpoint_key": trained.key})
        client.log_batch(run.info.run_id, params=[Param(k, v[:500]) for k, v in params.items()])
    stamp = int(time.time() * 1000)
    metrics = []
    for r, point in zip(results, points, strict=True):
        metrics += [
            Metric(f"{m}/{point}", r[m], stamp, 0) for m in ("fid", "is", "accuracy") if m in r
        ]
    best = next(r for r in results if r["best"])
    names = ("fid", "is", "omega", "t_min", "t_max", "accuracy")
    summary = [Metric(f"{k}_best", float(best[k]), stamp, 0) for k in names if k in best]
    # Without CFG = the omega = 1 point (the interval does not matter there): the paper's
    # "w/o CFG" column for omega-conditioned models.
    no_cfg = next((r for r in results if r["omega"] == 1.0), None)
    if no_cfg is not None and cfg.guidance.mode != "fixed":  # fixed: omega is baked in
        names = ("fid", "is", "accuracy")
        summary += [Metric(f"{k}_no_cfg", float(no_cfg[k]), stamp, 0) for k in names if k in no_cfg]
    if "real_data_floor" in best:
        summary += [Metric("fid_real_floor", best["real_data_floor"]["fid"], stamp, 0)]
        summary += [Metric("fid_class_mean_ceiling", best["class_mean_ceiling"]["fid"], stamp, 0)]
    if "many_step" in best:
        summary += [Metric("fid_many_step_best", best["many_step"]["fid"], stamp, 0)]
    verdict = {"did_not_learn": str(best["did_not_learn"]).lower()}
    client.log_batch(run.info.run_id, metrics=metrics + summary, tags=tag_list(verdict))
    if train_run:
        client.log_batch(train_run, metrics=summary, tags=tag_list(verdict))
    for path in artifacts:
        client.log_artifact(
            run.info.run_id, str(path), "grids" if path.parent.name == "grids" else None
        )
    client.set_terminated(run.info.run_id)
    return run.info.run_id
