"""The whole pipeline with `paths.artifacts=s3://...` on a real S3 server (SeaweedFS, started by
the session): every output in the store, nothing of the run in the working directory, and a
rerun that reuses everything."""

import os

import pytest
from services import free_port, mlflow_server

from flows.pipeline import run_pipeline
from tasks.artifacts import Manifest
from tasks.storage import Output, Store

FAST = [
    "train.steps=20",
    "train.checkpoint_every=10",
    "train.eval_every=10",
    "eval.during_samples=60",
    "eval.n_samples=100",
    "eval.shard_size=50",
    "eval.batch_size=100",
    "eval.grid_per_class=2",
]


@pytest.mark.slow
def test_the_smoke_pipeline_runs_on_object_storage_and_a_rerun_reuses_it(
    s3_root, tmp_path, prefect_server, local_ray, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    port = free_port()
    # the team's server: runs in its database, artifacts through its proxy to the same store
    server = mlflow_server(
        port,
        f"sqlite:///{tmp_path}/m.db",
        tmp_path / "mlflow.log",
        f"{s3_root}/mlflow",
        env={"MLFLOW_S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]},
    )
    with server:
        root = [f"paths.artifacts={s3_root}", f"tracking.uri=http://127.0.0.1:{port}", *FAST]
        first, rerun = run_pipeline("smoke", root), run_pipeline("smoke", root)
    assert [first.stages[s] for s in ("precompute", "train", "evaluate")] == ["computed"] * 3

    store = Store.of(s3_root)
    for result in (first.precompute, first.train, first.evaluate):
        assert isinstance(result.path, str) and result.path.startswith(f"{s3_root}/")
        out = Output.at(result.path)
        done = Manifest.read(out)
        assert done is not None and all(f.valid_in(out, "sha256") for f in done.files)
    training = first.train.out
    assert training.list("during/*/step*/results.json")  # the in-run evaluation's, in the store
    assert store.glob(training.rel, "ray/run/checkpoint_*/state.pt")  # Ray Train's checkpoints
    assert first.evaluate.out.list("units/*.npz") and first.evaluate.out.exists("results.json")
    assert not list(work.iterdir())  # nothing of the run in the working directory
    assert store.output("mlflow").list("*/*/artifacts/samples/*.png")  # through the proxy

    assert all(rerun.stages[s] in ("reused", "cached") for s in ("precompute", "train", "evaluate"))
    assert rerun.evaluate.results == first.evaluate.results
