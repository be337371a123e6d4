"""Evaluation during training (tasks.inrun_eval): the same numbers as `imf evaluate` on the same
weights, sharded over the training ranks, restartable unit by unit, logged over steps; and a
latent run (a tiny SD-VAE) whose grids are decoded and whose FID reacts to its samples."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from test_precompute import make_image_folder, make_tiny_vae

from benchmarks.random_weights import random_inception_weights
from imf_core.ema import EMA
from imf_core.models import build
from tasks import inrun_eval
from tasks.config import load_config
from tasks.eval_units import UnitRunner
from tasks.evaluate import EvalJob, evaluate
from tasks.precompute import PrecomputeJob, precompute
from tasks.storage import Output
from tasks.train import TrainJob, train


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One artifacts folder for the module: digits and their classifier are made once."""
    return tmp_path_factory.mktemp("artifacts")


def smoke(tmp_path: Path, artifacts: Path, *overrides: str):
    cfg = load_config(
        "smoke",
        [
            f"paths.artifacts={artifacts}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "train.batch_size=16",
            "eval.during_samples=60",
            *overrides,
        ],
    )
    return cfg, precompute(PrecomputeJob.of(cfg))


def history(cfg, run_id: str, metric: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in MlflowClient(cfg.tracking.uri).get_metric_history(run_id, metric):
        out.setdefault(m.step, []).append(m.value)
    return out


def test_an_interrupted_evaluation_computes_only_its_missing_units(tmp_path, shared, monkeypatch):
    cfg, pre = smoke(tmp_path, shared, "train.eval_every=5")
    plan = inrun_eval.plan(cfg, pre, Output.at(tmp_path / "train" / "training"))
    torch.manual_seed(0)
    model = build(cfg.model_config())
    for p in model.parameters():  # trained-like: a network whose output moves with its inputs
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    ema = EMA(model, 0.5)
    evaluation = inrun_eval.InRunEvaluation(plan, 0, 1, torch.device("cpu"), 100)
    assert [s for s in range(18) if evaluation.due(s, total=17)] == [5, 10, 15, 17]
    assert not any(evaluation.due(s, total=3) for s in range(4))  # shorter than an interval
    runs = []
    real_run = UnitRunner.run
    monkeypatch.setattr(UnitRunner, "run", lambda self, u: runs.append(u.name) or real_run(self, u))

    first = evaluation(5, model, ema)
    assert sorted(runs) == ["real_s00000", "w1_t0-1_s00000", "w2_t0-1_s00000"]
    assert evaluation.done(5) and first["step"] == 5 and len(first["points"]) == 2
    assert first["real_data_floor"]["n_samples"] == 60  # the calibration, at the same n
    # Killed after one unit: the rerun computes the missing one only (not the calibration,
    # kept once per training), and merges to the same numbers.
    step5 = evaluation.out.path / inrun_eval.step_dir(5)
    (step5 / "results.json").unlink()
    (step5 / "w2_t0-1_s00000.npz").unlink()
    runs.clear()
    again = evaluation(5, model, ema)
    assert runs == ["w2_t0-1_s00000"]
    assert [p["fid"] for p in again["points"]] == [p["fid"] for p in first["points"]]
    # A unit of another sharding (another number of ranks) is not taken for this one.
    path = step5 / "w1_t0-1_s00000.npz"
    np.savez(path, **(dict(np.load(path)) | {"n": np.array(30)}))
    runs.clear()
    evaluation(5, model, ema)
    assert runs == ["w1_t0-1_s00000"]
    # The EMA weights are evaluated, and the live weights are back afterwards.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    moved = evaluation(10, model, ema)
    assert [p["fid"] for p in moved["points"]] == pytest.approx([p["fid"] for p in first["points"]])
    assert moved["sensitivity"] == first["sensitivity"]  # the EMA's, not the live weights'
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    assert model.training
    metrics = inrun_eval.metrics_of(first)
    assert metrics["eval/fid"] == min(p["fid"] for p in first["points"])
    assert {"eval/fid/w1_t0-1", "eval/fid/w2_t0-1", "eval/accuracy", "eval/recall"} <= set(metrics)
    assert metrics["eval/fid_real_data_floor"] == first["real_data_floor"]["fid"]
    omega = first["sensitivity"]["omega"]["one_step"]
    assert metrics["eval/sensitivity/omega/one_step"] == omega > 0
    assert {"eval/sensitivity/class/mid", "eval/sensitivity/interval/one_step"} <= set(metrics)


def test_no_features_for_it_is_refused_before_training(tmp_path, shared):
    cfg, pre = smoke(tmp_path, shared, "precompute.classifier_steps=0", "train.eval_every=5")
    with pytest.raises(FileNotFoundError, match=r"train.eval_every=5.*train.eval_every=0"):
        inrun_eval.plan(cfg, pre, Output.at(tmp_path / "train" / "training"))
    with pytest.raises(ValueError, match="both set"):
        smoke(tmp_path, shared, "train.eval_every=5", "train.eval_every_epochs=1")
    with pytest.raises(ValueError, match="during_points"):
        smoke(tmp_path, shared, "eval.during_points=[[0.5,0.0,1.0]]")


@pytest.mark.slow
def test_fid_during_training_is_imf_evaluates_on_the_same_weights(tmp_path, shared, local_ray):
    cfg, pre = smoke(
        tmp_path,
        shared,
        "train.steps=8",
        "train.eval_every=4",
        "train.checkpoint_every=100",  # the evaluation steps checkpoint themselves
        "train.log_every=1",
        "train.num_workers=2",  # the samples sharded over two ranks
        "train.cpus_per_worker=1",
    )
    trained = train(TrainJob.of(cfg, pre))
    (directory,) = (trained.path / "during").iterdir()
    steps = sorted(p.name for p in directory.glob("step*"))
    assert steps == ["step00000004", "step00000008"]
    units = sorted(p.name for p in (directory / "step00000008").glob("*.npz"))
    assert units == [f"w{w}_t0-1_s0000{k}.npz" for w in (1, 2) for k in (0, 1)]  # 30 + 30
    during = json.loads((directory / "step00000008" / "results.json").read_text())

    # imf evaluate of the exported weights at the same points and n: the same numbers.
    final = load_config(
        "smoke",
        [
            f"paths.artifacts={shared}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "train.batch_size=16",
            "train.steps=8",
            "eval.n_samples=60",
            "eval.omegas=[1.0,2.0]",
            "eval.many_steps=0",
            "eval.grid_per_class=0",
        ],
    )
    result = evaluate(EvalJob.of(final, pre), trained)
    for ours, theirs in zip(during["points"], result.results, strict=True):
        assert ours["omega"] == theirs["omega"] and ours["n_samples"] == theirs["n_samples"] == 60
        for metric in ("fid", "is", "accuracy", "precision", "recall"):
            assert ours[metric] == pytest.approx(theirs[metric], rel=1e-4, abs=1e-6), metric
    assert during["real_data_floor"]["fid"] == pytest.approx(
        result.results[0]["real_data_floor"]["fid"], rel=1e-6
    )
    flat = inrun_eval.sensitivity_metrics
    ours, theirs = flat(during["sensitivity"]), flat(result.results[0]["sensitivity"])
    assert ours == pytest.approx(theirs, rel=1e-5)

    # MLflow: the curve over steps on the training run, beside the loss, each step once.
    fid = history(cfg, trained.mlflow_run_id, "eval/fid")
    assert sorted(fid) == [4, 8] and all(len(v) == 1 for v in fid.values())
    assert fid[8][0] == min(p["fid"] for p in during["points"])
    assert sorted(history(cfg, trained.mlflow_run_id, "train/loss")) == list(range(1, 9))
    floor = history(cfg, trained.mlflow_run_id, "eval/fid_real_data_floor")
    assert floor[4] == floor[8]  # computed once, drawn as a flat line
    omega = history(cfg, trained.mlflow_run_id, "eval/sensitivity/omega/one_step")
    assert sorted(omega) == [4, 8] and omega[8][0] == during["sensitivity"]["omega"]["one_step"]


@pytest.mark.slow
def test_a_latent_run_logs_decoded_grids_and_a_fid_that_reacts(tmp_path, shared, local_ray):
    vae = make_tiny_vae(tmp_path / "vae")
    images = make_image_folder(tmp_path / "images")
    weights = random_inception_weights(tmp_path / "inception.pth")
    reference = tmp_path / "reference.npz"
    np.savez(reference, mu=np.zeros(2048), sigma=np.eye(2048))
    cfg, pre = smoke(
        tmp_path,
        shared,
        "data.name=imagefolder",
        f"data.root={images}",
        "data.image_size=32",
        "tokenizer.name=sd_vae",
        f"tokenizer.path={vae}",
        "tokenizer.device=cpu",
        "model.in_channels=4",
        "model.input_size=16",
        "model.num_classes=2",
        "train.steps=4",
        "train.batch_size=8",
        "train.eval_every=2",
        "train.sample_every=2",
        "optim.lr=0.05",  # the samples must move between the two evaluations
        "eval.features=inception",
        f"eval.inception_weights={weights}",
        f"eval.reference={reference}",
        "eval.during_samples=8",
        "eval.during_points=[[1.0,0.0,1.0]]",
        "eval.batch_size=8",
    )
    trained = train(TrainJob.of(cfg, pre))
    client = MlflowClient(cfg.tracking.uri)
    grids = sorted(a.path for a in client.list_artifacts(trained.mlflow_run_id, "samples"))
    assert grids == ["samples/samples_step0000002.png", "samples/samples_step0000004.png"]
    path = client.download_artifacts(trained.mlflow_run_id, grids[-1], str(tmp_path))
    with Image.open(path) as picture:  # 2 classes x 8 decoded RGB 32 x 32 samples, enlarged
        pixels = np.asarray(picture.convert("RGB"))
    assert picture.width > 8 * 32 and picture.height > 2 * 32
    assert pixels.std() > 10 and len({tuple(p) for p in pixels.reshape(-1, 3)[::97]}) > 20
    fid = history(cfg, trained.mlflow_run_id, "eval/fid")
    assert sorted(fid) == [2, 4]
    # The random InceptionV3 keeps its features' scale: the numbers follow the samples (its
    # default init gave FID 2048.000 whatever they were).
    assert all(abs(v[0] - 2048.0) > 1.0 for v in fid.values())
    assert abs(fid[2][0] - fid[4][0]) > 1e-3
