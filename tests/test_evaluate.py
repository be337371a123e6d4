"""Evaluation: merged shards equal one pass, restart per unit, both feature extractors."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from safetensors.torch import save_file

from benchmarks.random_weights import random_inception_weights
from imf_core.models import create
from tasks.config import load_config
from tasks.evaluate import EvalJob, evaluate
from tasks.extractors import open_extractor
from tasks.features import CLASSIFIER_NAME, to_uint8
from tasks.precompute import PrecomputeJob, precompute


@dataclass
class FakeTrainResult:
    path: Path
    key: str
    mlflow_run_id: str = ""

    @property
    def weights(self) -> Path:
        return self.path / "ema.safetensors"


def fake_training(directory: Path) -> FakeTrainResult:
    """An exported tiny model with random (not zero-init) weights: evaluation needs no Ray."""
    torch.manual_seed(0)
    model = create("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory.mkdir(parents=True)
    meta = {"model_config": json.dumps(asdict(model.cfg))}
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        directory / "ema.safetensors",
        metadata=meta,
    )
    return FakeTrainResult(directory, "fake")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = load_config("smoke", [f"paths.artifacts={root}", "precompute.classifier_steps=150"])
    pre = precompute(PrecomputeJob.of(cfg))
    return root, pre, fake_training(root / "train")


def evaluation(root, *overrides):
    """A small grid; the calibration (its own test) off unless an override turns it on."""
    args = [
        f"paths.artifacts={root}",
        "eval.n_samples=200",
        "eval.omegas=[1.0,3.0]",
        "eval.grid_per_class=2",
        "eval.calibrate=false",
        "eval.many_steps=0",
    ]
    return load_config("smoke", args + list(overrides))


def test_merged_shards_equal_a_single_pass(setup):
    root, pre, trained = setup
    shards_of_60 = EvalJob.of(evaluation(root / "a", "eval.shard_size=60"), pre)  # 60+60+60+20
    sharded = evaluate(shards_of_60, trained)
    single = evaluate(EvalJob.of(evaluation(root / "b", "eval.shard_size=200"), pre), trained)
    assert sharded.units_computed == 8 and single.units_computed == 2
    for a, b in zip(sharded.results, single.results, strict=True):
        assert a["n_samples"] == b["n_samples"] == 200
        for metric in ("fid", "is", "accuracy"):
            assert a[metric] == pytest.approx(b[metric], rel=1e-9, abs=1e-9)
    assert sum(r["best"] for r in sharded.results) == 1
    assert (sharded.path / "fid_vs_omega_t0-1.png").is_file()
    from PIL import Image

    grid = Image.open(sharded.path / "grids" / "w3_t0-1.png")
    assert min(grid.size) >= 256  # enlarged for viewing (8x8 digits were 20 px tall)


def test_restart_recomputes_only_missing_units(setup):
    root, pre, trained = setup
    cfg = evaluation(root / "c", "eval.shard_size=100")
    first = evaluate(EvalJob.of(cfg, pre), trained)
    files = {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.path.rglob("*") if p.is_file()
    }
    again = evaluate(EvalJob.of(cfg, pre), trained)
    assert not again.computed
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == files  # nothing changed
    (first.path / "_SUCCESS").unlink()  # as if killed before the merge ...
    lost = first.path / "units" / "w3_t0-1_s00001.npz"
    lost.unlink()  # ... with one unit not yet written
    kept = first.path / "units" / "w1_t0-1_s00000.npz"
    resumed = evaluate(EvalJob.of(cfg, pre), trained)
    assert resumed.units_computed == 1 and lost.is_file()
    assert kept.stat().st_mtime_ns == files[kept][0]
    assert [r["fid"] for r in resumed.results] == pytest.approx(
        [r["fid"] for r in first.results], rel=1e-12
    )


@pytest.mark.slow
def test_units_on_ray_actors_equal_units_in_process(setup, local_ray):
    root, pre, trained = setup
    sequential = evaluate(EvalJob.of(evaluation(root / "g", "eval.shard_size=50"), pre), trained)
    parallel_job = EvalJob.of(evaluation(root / "h", "eval.shard_size=50", "eval.workers=2"), pre)
    parallel = evaluate(parallel_job, trained)
    assert parallel.key == sequential.key  # the worker count is not part of what is computed
    assert parallel.units_computed == sequential.units_computed == 8
    for name in sorted(p.name for p in (sequential.path / "units").iterdir()):
        a, b = np.load(sequential.path / "units" / name), np.load(parallel.path / "units" / name)
        assert int(a["n"]) == int(b["n"]) and int(a["correct"]) == int(b["correct"])
        np.testing.assert_allclose(a["outer"], b["outer"], rtol=1e-5, atol=1e-6)
    for a, b in zip(sequential.results, parallel.results, strict=True):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-5)  # thread counts reorder float32 sums


def test_pixel_classifier_is_a_registered_extractor(setup):
    _, pre, _ = setup
    assert CLASSIFIER_NAME in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    from tasks.datasets import digits

    images, labels = digits()
    extractor = open_extractor("classifier", pre.path / "classifier.pt")
    features, logits = extractor(to_uint8(images))
    assert features.shape == (1797, 128) and logits.shape == (1797, 10)
    assert (logits.argmax(1) == labels).double().mean() > 0.9


@pytest.mark.slow
def test_inception_path_with_random_weights(setup, tmp_path):
    root, pre, trained = setup
    weights = random_inception_weights(tmp_path / "inception.pth")
    stats = tmp_path / "reference.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))  # ADM-style reference: only mu, sigma
    cfg = evaluation(
        root / "d",
        "eval.n_samples=20",
        "eval.omegas=[1.0,4.0]",
        "eval.features=inception",
        f"eval.inception_weights={weights}",
        f"eval.reference={stats}",
        "eval.grid_per_class=0",
    )
    result = evaluate(EvalJob.of(cfg, pre), trained)
    plain, guided = result.results
    for entry in (plain, guided):
        assert entry["features"] == "inception" and entry["n_samples"] == 20
        assert np.isfinite(entry["fid"]) and entry["is"] >= 1.0 - 1e-9 and "accuracy" not in entry
    # The random extractor keeps its features' scale (benchmarks.random_weights): the numbers
    # depend on the samples. PyTorch's default init gave FID 2048.000 and IS 1 for any samples.
    assert abs(plain["fid"] - 2048.0) > 1.0 and abs(plain["fid"] - guided["fid"]) > 1e-3
    assert plain["is"] != guided["is"]
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        EvalJob.of(
            evaluation(root / "e", "eval.features=inception", "eval.inception_weights=/nope.pth"),
            pre,
        )


def test_uint8_rounds_like_the_official_pytorch_evaluation():
    # Every float32 in [-1.01, 1.01] that lands on an exact half level, and a dense grid between.
    ties = (torch.arange(-1, 257, dtype=torch.float64) + 0.5) * 2 / 255 - 1
    grid = torch.linspace(-1.01, 1.01, 200_001, dtype=torch.float64)
    x = torch.cat([ties, grid]).float()
    official = np.round(np.clip((x.numpy() + 1) / 2 * 255, 0, 255)).astype(np.uint8)
    assert np.array_equal(to_uint8(x).numpy(), official)
    # The JAX release's clip(127.5 x + 128) cast to uint8 is the same rounding, half up: the
    # two differ only within float32 error of a half level (ties to even, and each formula's
    # own float32 rounding there), by one level upwards, and nowhere else.
    jax = np.clip(127.5 * x.numpy() + 128.0, 0, 255).astype(np.uint8)
    scaled = (x.double().numpy() + 1) / 2 * 255
    differ = jax != official
    assert 0 < differ.sum() <= len(ties)
    assert (np.abs(scaled[differ] % 1 - 0.5) < 1e-5).all()
    assert (jax[differ].astype(int) - official[differ] == 1).all()


def test_results_are_logged_under_the_training_run(setup, tmp_path):
    from mlflow import MlflowClient

    root, pre, trained = setup
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    train_run = client.create_run(client.create_experiment("eval-test")).info.run_id
    tracked = FakeTrainResult(trained.path, trained.key, train_run)
    cfg = evaluation(root / "f", f"tracking.uri={uri}")
    result = evaluate(EvalJob.of(cfg, pre), tracked)
    best = next(r for r in result.results if r["best"])
    summary = client.get_run(train_run).data
    assert summary.metrics["eval/fid_best"] == pytest.approx(best["fid"])
    # Charted: the FIDs a compare view sets side by side (one row above the training curves);
    # the rest of the summary is in tags of the same names.
    # (this evaluation runs without calibration, so no many-step FID, floor or ceiling)
    assert set(summary.metrics) == {"eval/fid_best", "eval/fid_no_cfg"}
    assert float(summary.tags["eval/omega_best"]) == best["omega"]
    assert float(summary.tags["eval/is_best"]) == pytest.approx(best["is"], rel=1e-5)
    (child,) = client.search_runs(
        [client.get_run(train_run).info.experiment_id], f"tags.mlflow.parentRunId = '{train_run}'"
    )
    # The evaluation run is the variant's own row: its headline FIDs (several evaluations may
    # share a training), its settings as params, every grid point in one table.
    assert child.data.metrics == summary.metrics
    assert child.data.params["eval.n_samples"] == str(cfg.eval.n_samples)
    assert not any(v == "None" for v in child.data.params.values())
    table = json.loads(
        Path(
            client.download_artifacts(child.info.run_id, "eval/points.json", str(tmp_path))
        ).read_text()
    )
    assert table["columns"][:4] == ["point", "omega", "t_min", "t_max"]
    assert len(table["data"]) == len(result.results)
    assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"results.json", "grids"}


def test_given_weights_evaluate_without_training(setup, tmp_path):
    """eval.checkpoint: one of our ema.safetensors, or the same weights as an official release
    .pth, give the training's numbers; the official file is tracked in a run of its own."""
    from mlflow import MlflowClient

    from imf_core.models.official import to_official
    from tasks.eval_inputs import checkpoint_source
    from tasks.eval_units import load_model

    root, pre, trained = setup
    official = tmp_path / "iMF-tiny.pth"
    torch.save(to_official(load_model(trained.weights, 8)), official)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ours = evaluate(EvalJob.of(evaluation(root / "i"), pre), trained)
    results = {}
    for name, path in (("safetensors", trained.weights), ("pth", official)):
        cfg = evaluation(root / "i", f"eval.checkpoint={path}", f"tracking.uri={uri}")
        source = checkpoint_source(cfg)
        results[name] = evaluate(EvalJob.of(cfg, pre), source)
        assert results[name].computed and results[name].key != ours.key
        for a, b in zip(results[name].results, ours.results, strict=True):
            assert a["fid"] == pytest.approx(b["fid"], rel=1e-6) and a["weights"] == str(path)
        again = evaluate(EvalJob.of(cfg, pre), checkpoint_source(cfg))
        assert not again.computed and again.path == results[name].path
    client = MlflowClient(uri)
    run = client.get_run(results["pth"].mlflow_run_id)
    assert "mlflow.parentRunId" not in run.data.tags and run.data.tags["checkpoint"] == str(
        official
    )
    assert run.info.run_name.startswith("eval iMF-tiny.pth (omega ")
    assert "eval/fid_best" in run.data.metrics
    kind = client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the UI's classic view, not its GenAI mode
    with pytest.raises(FileNotFoundError, match="eval.checkpoint"):
        checkpoint_source(evaluation(root / "i", "eval.checkpoint=/no/such.pth"))


def test_results_say_which_reference_and_rounding(setup):
    root, pre, trained = setup
    result = evaluate(EvalJob.of(evaluation(root / "j", "eval.omegas=[1.0]"), pre), trained)
    (entry,) = result.results
    assert entry["uint8"].startswith("round(clip(255 * (x + 1) / 2, 0, 255))")
    assert entry["reference"] == str(pre.path / "reference.npz")
    assert len(entry["reference_sha256"]) == 64


def test_every_number_comes_with_its_calibration(setup):
    """Real-data floor, class-mean ceiling, many-step result, precision / recall, and the
    did-not-learn verdict, in every results.json entry; each a real measurement."""
    from imf_core.guidance import generate
    from imf_core.metrics import FeatureStats, frechet_distance
    from tasks.datasets import digits
    from tasks.eval_units import load_model

    root, pre, trained = setup
    on = ["eval.calibrate=true", "eval.many_steps=8", "eval.prc_samples=150"]
    result = evaluate(EvalJob.of(evaluation(root / "k", "eval.shard_size=120", *on), pre), trained)
    # 2 points x 2 shards, 2 real shards, the Euler units at omega 1 and at the best point
    assert result.units_computed in (2 * 2 + 2 + 2, 2 * 2 + 2 + 2 * 2)
    ref = np.load(pre.path / "reference.npz")
    extractor = open_extractor("classifier", pre.path / "classifier.pt")
    images, labels = digits()
    for entry in result.results:
        floor, ceiling = entry["real_data_floor"], entry["class_mean_ceiling"]
        assert floor["n_samples"] == ceiling["n_samples"] == 200
        assert 0 <= entry["precision"] <= 1 and 0 <= entry["recall"] <= 1
        assert isinstance(entry["did_not_learn"], bool)
    floor = result.results[0]["real_data_floor"]
    assert floor["rows"] == "200 of 1797 training rows"
    assert floor["accuracy"] > 0.9 and floor["fid"] < result.results[0]["class_mean_ceiling"]["fid"]
    # The ceiling recomputed by hand: every sample the mean image of its class (over the real
    # rows drawn for the floor).
    from tasks.eval_units import real_indices

    rows = real_indices(1797, 200, 0)[0]
    images, labels = images[rows], labels[rows]
    means = torch.stack([images[labels == k].mean(0) for k in range(10)])
    feats, _ = extractor(to_uint8(means))
    per_class = torch.bincount(torch.arange(200) % 10, minlength=10)
    mu, sigma = FeatureStats.weighted(feats, per_class).mean_cov()
    expected = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    assert result.results[0]["class_mean_ceiling"]["fid"] == pytest.approx(expected, rel=1e-4)
    # The many-step number at omega 1 [0, 1]: 8 Euler steps of u(z, t, t), recomputed here.
    unguided = next(r for r in result.results if r["omega"] == 1.0)
    model = load_model(trained.weights, 8)
    from tasks.eval_units import sample_noise

    noise = sample_noise(range(200), (1, 8, 8), 0)
    x = generate(model, noise, torch.arange(200) % 10, 1.0, 0.0, 1.0, 8, euler=True)
    f, _ = extractor(to_uint8(x))
    mu, sigma = FeatureStats.of(f).mean_cov()
    euler = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    assert unguided["many_step"]["steps"] == 8
    assert unguided["many_step"]["fid"] == pytest.approx(euler, rel=1e-3)
    # The input sensitivity: the evaluated network's, on its fixed batch, in every entry.
    from imf_core.guidance import ignores_omega, input_sensitivity
    from tasks.eval_units import SENSITIVITY_SAMPLES

    batch = range(SENSITIVITY_SAMPLES)
    expected = input_sensitivity(model, sample_noise(batch, (1, 8, 8), 0), torch.arange(256) % 10)
    from tasks.inrun_eval import sensitivity_metrics as flat

    for entry in result.results:
        assert flat(entry["sensitivity"]) == pytest.approx(flat(expected))
        assert entry["ignores_omega"] == ignores_omega(expected)
    assert set(expected) >= {"class", "omega"} and expected["class"]["one_step"] > 0


def test_a_model_that_never_trained_is_flagged(setup, tmp_path):
    """A fresh (zero-output) network maps noise to noise: flagged did-not-learn."""
    from imf_core.models import create

    root, pre, _ = setup
    model = create("tiny")
    directory = tmp_path / "untrained"
    directory.mkdir()
    meta = {"model_config": json.dumps(asdict(model.cfg))}
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        directory / "ema.safetensors",
        metadata=meta,
    )
    cfg = evaluation(root / "l", "eval.calibrate=true", "eval.many_steps=0")
    result = evaluate(EvalJob.of(cfg, pre), FakeTrainResult(directory, "untrained"))
    assert all(r["did_not_learn"] for r in result.results)
    ceiling = result.results[0]["class_mean_ceiling"]["fid"]
    assert all(r["fid"] > ceiling / 2 for r in result.results)
