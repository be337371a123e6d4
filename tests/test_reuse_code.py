"""Reuse that knows the code: every output records which imf_core method version made it, and
a launch with another version says so (terminal, MLflow, report) or, asked, recomputes it.

Unit tests on stage directories, then one real training and evaluation (the smoke config on
the session's Ray) reused by a "later" method version and recomputed with --recompute-stale.
"""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import imf_core
from tasks.artifacts import (
    CODE_FILE,
    SUCCESS,
    FileRecord,
    Manifest,
    begin,
    cache_key_of,
    stale,
)
from tasks.storage import Output

NOW = imf_core.METHOD_VERSION


def finished(
    out: Path, methods: list | None, created: float | None = None, stage: str = "train"
) -> Manifest:
    """A finished stage output whose manifest says `methods` made it (None: said nothing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.bin").write_bytes(b"w" * 10)
    code = {} if methods is None else {"method": methods[-1], "methods": methods}
    files = [FileRecord.of(Output.at(out), "weights.bin")]
    manifest = Manifest("k", stage, {}, [], files, code=code)
    if created is not None:
        manifest.created = created
    manifest.write(Output.at(out))
    if methods is None:  # as a manifest of code before the record was kept: no "code" entry
        saved = json.loads((out / SUCCESS).read_text())
        (out / SUCCESS).write_text(json.dumps({k: v for k, v in saved.items() if k != "code"}))
    return Manifest.read(Output.at(out))


def test_a_new_output_records_the_code_that_made_it(tmp_path):
    out = tmp_path / "train" / "key1"
    said = []
    assert begin(Output.at(out), "training", False, say=said.append) == "" and not said
    assert json.loads((out / CODE_FILE).read_text()) == {"methods": [NOW]}
    (out / "w").write_bytes(b"1")
    Manifest("key1", "train", {}, [], [FileRecord.of(Output.at(out), "w")]).write(Output.at(out))
    code = Manifest.read(Output.at(out)).code
    assert code["method"] == NOW and code["methods"] == [NOW]
    assert code["package"] and code["commit"] and isinstance(code["dirty"], bool)
    # reused, current
    assert begin(Output.at(out), "training", False, say=said.append) == "" and not said


def test_an_output_of_another_method_version_is_reused_and_said_to_be_stale(tmp_path, capsys):
    out = tmp_path / "train" / "key2"
    finished(out, [NOW - 1])
    reason = begin(Output.at(out), "training", False)
    assert reason == f"made by method version {NOW - 1} (this code: {NOW}; imf_core.METHOD_HISTORY)"
    printed = capsys.readouterr().out
    assert "training key2: made by method version" in printed and "--recompute-stale" in printed
    assert (out / SUCCESS).is_file() and not (out / CODE_FILE).exists()  # left as it was
    # Prefect's cache must not hand it back unseen: the stage's body runs and says so.
    assert cache_key_of(lambda: Output.at(out))(None, {}) is None
    # Precompute's numbers are not the method's: its output stays cached whatever the version.
    latents = tmp_path / "precompute" / "key2"
    finished(latents, [NOW - 1], stage="precompute")
    assert cache_key_of(lambda: Output.at(latents))(None, {}).startswith("precompute-k-")


def test_recompute_stale_moves_the_old_output_aside_and_starts_afresh(tmp_path, capsys):
    out = tmp_path / "train" / "key3"
    finished(out, None)  # made before versions were recorded
    assert stale(Manifest.read(Output.at(out)).code.get("methods", [None])).startswith(
        "made before method versions were recorded"
    )
    assert begin(Output.at(out), "training", True) == ""
    (aside,) = (tmp_path / "stale" / "train").iterdir()
    assert aside.name.startswith("key3-") and (aside / "weights.bin").read_bytes() == b"w" * 10
    assert (aside / SUCCESS).is_file()  # kept whole, not deleted
    assert sorted(p.name for p in out.iterdir()) == [CODE_FILE]  # a fresh start
    assert "recomputing it (the old output moved to" in capsys.readouterr().out


def test_a_resume_across_versions_records_both_and_is_stale(tmp_path, capsys):
    out = tmp_path / "evaluate" / "key4"
    out.mkdir(parents=True)
    (out / CODE_FILE).write_text(json.dumps({"methods": [NOW - 1]}))  # begun by the old code
    reason = begin(Output.at(out), "evaluation", False)
    assert reason.startswith(f"made by method version {NOW - 1}")
    assert "resuming it, mixing versions" in capsys.readouterr().out
    (out / "r").write_bytes(b"1")
    Manifest("key4", "evaluate", {}, [], [FileRecord.of(Output.at(out), "r")]).write(Output.at(out))
    methods = Manifest.read(Output.at(out)).code["methods"]
    assert methods == [NOW - 1, NOW]
    assert stale(methods).startswith(f"made partly by method version {NOW - 1}")


def test_an_unfinished_output_of_unrecording_code_is_stale(tmp_path):
    out = tmp_path / "evaluate" / "key5"
    (out / "units").mkdir(parents=True)
    (out / "units" / "u0.npz").write_bytes(b"x")
    assert begin(Output.at(out), "evaluation", False).startswith("made before method versions")


def test_an_output_made_from_an_input_recomputed_since_is_stale(tmp_path):
    training, evaluation = tmp_path / "train" / "t", tmp_path / "evaluate" / "e"
    finished(evaluation, [NOW], created=time.time() - 60)
    finished(training, [NOW])  # retrained after the evaluation was made
    reason = begin(Output.at(evaluation), "evaluation", False, made_from=Output.at(training))
    assert reason == "made from an earlier train output (recomputed since)"
    trained = SimpleNamespace(path=training, stale="")
    assert cache_key_of(lambda trained: Output.at(evaluation))(None, {"trained": trained}) is None
    finished(evaluation, [NOW])  # made after it: current, cached
    assert begin(Output.at(evaluation), "evaluation", False, made_from=Output.at(training)) == ""
    assert cache_key_of(lambda trained: Output.at(evaluation))(None, {"trained": trained})
    stale_input = SimpleNamespace(path=training, stale="made by method version 1")
    key_fn = cache_key_of(lambda trained: Output.at(evaluation))
    assert key_fn(None, {"trained": stale_input}) is None


@pytest.mark.slow
def test_a_later_method_version_reuses_with_a_warning_or_recomputes(
    tmp_path, local_ray, monkeypatch, capsys
):
    from mlflow import MlflowClient

    from flows.plan import plan_of
    from tasks.config import load_config
    from tasks.evaluate import EvalJob, evaluate
    from tasks.precompute import PrecomputeJob, precompute
    from tasks.train import TrainJob, train

    def config(*extra):
        return load_config(
            "smoke",
            [
                f"paths.artifacts={tmp_path}",
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                "train.steps=4",
                "train.batch_size=16",
                "train.eval_every=0",
                "precompute.classifier_steps=20",
                "eval.n_samples=50",
                "eval.shard_size=50",
                "eval.omegas=[1.0]",
                "eval.calibrate=false",
                "eval.many_steps=0",
                "eval.grid_per_class=0",
                *extra,
            ],
        )

    def stages(*extra):
        cfg = config(*extra)
        pre = precompute(PrecomputeJob.of(cfg))
        trained = train(TrainJob.of(cfg, pre))
        return trained, evaluate(EvalJob.of(cfg, pre), trained)

    trained, evaluated = stages()
    assert not trained.stale and not evaluated.stale
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    tags = client.get_run(evaluated.mlflow_run_id).data.tags
    assert tags["imf.method_version"] == tags["imf.training_method_versions"] == str(NOW)
    capsys.readouterr()

    monkeypatch.setattr(imf_core, "METHOD_VERSION", NOW + 1)  # the method changed since
    again, evaluated_again = stages()
    assert not again.computed and again.path == trained.path  # same key: reused ...
    assert not evaluated_again.computed
    assert again.stale.startswith(f"made by method version {NOW} (this code: {NOW + 1}")
    printed = capsys.readouterr().out
    assert f"training {trained.key}: made by method version {NOW}" in printed  # ... and said
    assert f"evaluation {evaluated.key}: made by method version {NOW}" in printed
    for run_id in (trained.mlflow_run_id, evaluated.mlflow_run_id):  # on their MLflow pages
        assert client.get_run(run_id).data.tags["imf.stale"].startswith("made by method version")

    plan = plan_of("rerun", {"smoke": config()}, gpu="h200")  # what a rerun would do
    assert [s.status for s in plan.stages] == ["reused", "reused (stale)", "reused (stale)"]
    assert "stale: 2 made by another imf_core method version" in plan.text()
    plan = plan_of("rerun", {"smoke": config("paths.recompute_stale=true")}, gpu="h200")
    assert [s.status for s in plan.stages] == ["reused", "to run (stale)", "to run"]

    fresh, fresh_eval = stages("paths.recompute_stale=true")
    assert fresh.computed and fresh_eval.computed and not fresh.stale and not fresh_eval.stale
    assert fresh.mlflow_run_id != trained.mlflow_run_id
    assert Manifest.read(fresh.out).code["methods"] == [NOW + 1]
    kept = {p.parent.name for p in (tmp_path / "stale").glob("*/*")}
    assert kept == {"train", "evaluate"}  # the old outputs, moved aside whole
