"""The whole pipeline with `paths.artifacts=s3://...` on a real S3 server (SeaweedFS, started by
the session): every output in the store, nothing of the run in the working directory, and a
rerun that reuses everything."""

import os

import pytest
from services import free_port, mlflow_server
from test_flows import TWO_VARIANTS

from flows.pipeline import run_pipeline
from flows.plan import plan_of
from flows.report import report_flow
from flows.sweep import run_sweep
from tasks.artifacts import Manifest
from tasks.config import load_config
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
    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(TWO_VARIANTS)
    with server:
        uri = f"http://127.0.0.1:{port}"
        root = [f"paths.artifacts={s3_root}", f"tracking.uri={uri}", *FAST]
        first = run_pipeline("smoke", root)
        plan = plan_of("rerun", {"smoke": load_config("smoke", root)})  # a second launch's
        # a two-variant sweep: "cfg" is the pipeline (reused: the rerun), "plain" trains anew
        sweep = run_sweep(str(sweep_file), "smoke", root)
        report = report_flow(sweep.parent_run_id, tracking=uri, artifacts=s3_root)
        again = run_sweep(str(sweep_file), "smoke", root)  # reruns both: reuses everything
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

    assert [s.status for s in plan.stages] == ["reused"] * 3
    assert f"store: {s3_root}: 3 outputs already there, about 0.0 GB to write" in plan.text()

    assert [v.status for v in sweep.variants] == ["ok", "ok"]
    # "cfg" is the pipeline, rerun: its training reused (the variant's evaluation is a row of
    # its own in MLflow, tagged with the variant)
    cfg = next(v for v in sweep.variants if v.name == "cfg")
    assert cfg.train_run_id == first.train.mlflow_run_id
    assert report.directory == f"{s3_root}/reports/two-smoke"
    report_out = store.output("reports", "two-smoke")
    names = set(report_out.list("*")) | set(report_out.list("*/*"))
    assert {"report.md", "fid_vs_omega.png", "grids/plain.png", "grids/cfg.png"} <= names
    assert [(v.train_run_id, v.eval_run_id) for v in again.variants] == [
        (v.train_run_id, v.eval_run_id) for v in sweep.variants
    ]  # the rerun reused every training and evaluation: the same MLflow runs
    assert not list(work.iterdir())
