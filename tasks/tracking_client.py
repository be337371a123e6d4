"""The MLflow client and ending a run: the low-level pieces that tasks.tracking and the
training's journal (tasks.journal) both use."""

from __future__ import annotations

import os

# MLflow's client retries an unreachable server for ~4 minutes (7 retries, doubling backoff):
# a training's journal retries on its own, so a few seconds of retrying is enough (env wins).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def client(uri: str):
    """An MLflow client for `uri` (callers outside this module never import mlflow)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def finish(runs, run_id: str, status: str, error: str) -> None:
    if error:
        runs.set_tag(run_id, "error", error)
    elif "error" in runs.get_run(run_id).data.tags:  # e.g. reaped while its journal waited
        runs.delete_tag(run_id, "error")
    runs.set_terminated(run_id, status)
