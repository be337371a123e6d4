"""Stage 3: sharded FID / IS evaluation over a CFG grid, restartable per (grid point, shard).

    >>> result = evaluate(cfg, precompute_result, train_result)
    >>> json.loads((result.path / "results.json").read_text())
    >>> evaluate(cfg, None, checkpoint_source(cfg))   # eval.checkpoint: given weights, no training

Each grid point (omega x interval) x each shard of the N samples is one unit: generate with
the EMA weights (imf_core.meanflow.sample; sample i has class i mod K, so every class gets its
share; noise from (seed, i), the same at every grid point), decode through the tokenizer,
convert to uint8 as the official PyTorch evaluation does (tasks.features.to_uint8), extract
features, and store the shard's float64 sums (n, sum x, sum xx^T; sum p, sum p log p for IS;
correct labels) in `units/`. Units already on disk are not recomputed. Merging the sums gives
exactly the single-pass metrics. The weights are a training run's EMA export, or any file
`eval.checkpoint` names: one of our `ema.safetensors` or an official release `.pth`
(imf_core.models.official.load_official).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from imf_core.data import LatentDataset
from imf_core.guidance import generate, ignores_omega, input_sensitivity
from imf_core.metrics import FeatureStats, ScoreStats, did_not_learn, frechet_distance
from imf_core.models import build
from imf_core.models.official import load_official
from imf_core.sdpa import plain_attention
from tasks import preemption
from tasks.artifacts import (
    FileRecord,
    Manifest,
    StageTask,
    atomic_path,
    begin,
    content_key,
    output_lock,
    sha256_file,
    write_json_atomic,
)
from tasks.features import UINT8_RULE, check_weights, to_uint8
from tasks.grids import decoded_grid, grid_inputs, point_title, save_png
from tasks.precompute import PrecomputeResult, makes_classifier
from tasks.provenance import device_name
from tasks.tokenizers import open_tokenizer, pick_device
from tasks.tracking import log_evaluation, mark_stale, tracking_uri

# What does not change the numbers stays out of the key (workers: tested, same sums).
RUNTIME_ONLY = (
    "batch_size",
    "device",
    "grid_per_class",
    "workers",
    "cpus_per_worker",
    "gpus_per_worker",
)

IN_RUN_ONLY = ("during_samples", "during_points")
# Bumped when results.json gains content, so that older evaluations are redone (2: input
# sensitivity).
RESULTS_FORMAT = 2
# Noises and classes (i mod K) of the input-sensitivity batch (imf_core.guidance).
SENSITIVITY_SAMPLES = 256


@dataclass
class EvalResult:
    path: Path
    key: str
    computed: bool
    units_computed: int
    results: list[dict]
    mlflow_run_id: str = ""  # the evaluation's MLflow run ("" when the training is untracked)
    stale: str = ""  # why its numbers (or its training's) are not this code's; "" if they are


def point_name(omega: float, interval: list[float]) -> str:
    return f"w{omega:g}_t{interval[0]:g}-{interval[1]:g}"


def feature_kind(cfg) -> str:
    """eval.features, with "auto" = the classifier when precompute trains one (pixel data)."""
    if cfg.eval.features != "auto":
        return cfg.eval.features
    return (
        "classifier" if makes_classifier(cfg.data, cfg.tokenizer, cfg.precompute) else "inception"
    )


def preflight(cfg) -> None:
    """What the stages will need -- the tracking server, the files -- checked before any stage
    starts (a clear error, not a failure after an hour of precompute and training): every input
    the pipeline reads (tasks.inputs; `imf check` also decodes an image sample)."""
    from tasks.inputs import reads_of, require_inputs
    from tasks.tracking import prepare

    prepare(cfg)
    require_inputs(cfg, reads_of(cfg))


def needs_precompute(cfg) -> bool:
    """Whether evaluating given weights needs the precompute stage's outputs: its classifier, or
    its reference statistics when eval.reference names none."""
    return feature_kind(cfg) == "classifier" or not cfg.eval.reference


def reference_path(cfg, pre: PrecomputeResult | None) -> Path:
    path = Path(cfg.eval.reference) if cfg.eval.reference else pre.path / "reference.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no FID reference statistics at {path} (set eval.reference)")
    return path


def load_reference(path: Path):
    """The FID reference statistics (an npz with mu and sigma), or an error naming the file."""
    ref = np.load(path)
    if not {"mu", "sigma"} <= set(ref.files):
        raise ValueError(f"FID reference {path} has no mu and sigma (keys: {ref.files})")
    return ref


def eval_slice(cfg, pre: PrecomputeResult | None) -> dict:
    """What the evaluation's numbers depend on (besides its inputs' keys): the grid, the
    features and the reference statistics' bytes (not their path). The weights enter as an
    input key (a training's, or the checkpoint file's)."""
    kept = {k: v for k, v in asdict(cfg.eval).items() if k not in RUNTIME_ONLY}
    kept.pop("checkpoint")
    for name in IN_RUN_ONLY:  # the evaluation during training's, not this one's
        kept.pop(name)
    kept["reference"] = sha256_file(reference_path(cfg, pre))
    return kept | {"features": feature_kind(cfg), "results_format": RESULTS_FORMAT}


def input_keys(pre: PrecomputeResult | None, trained) -> list[str]:
    return [trained.key] + ([pre.key] if pre is not None else [])


def output_dir(cfg, pre: PrecomputeResult | None, trained, slice_: dict | None = None) -> Path:
    slice_ = slice_ or eval_slice(cfg, pre)
    key = content_key("evaluate", slice_, input_keys(pre, trained))
    return Path(cfg.paths.artifacts).resolve() / "evaluate" / key


@dataclass
class Checkpoint:
    """Weights given to evaluate without training (eval.checkpoint), keyed by their bytes."""

    weights: Path
    key: str
    mlflow_run_id: str = ""  # no training run: the evaluation's run stands alone


def checkpoint_source(cfg) -> Checkpoint:
    """The file eval.checkpoint names, checked and hashed (an official .pth or ema.safetensors)."""
    path = Path(cfg.eval.checkpoint).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"eval.checkpoint {str(path)!r} is not a file")
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ValueError(
            f"eval.checkpoint {path.name!r}: expected an official release .pth (or .pt) "
            "or one of our ema.safetensors"
        )
    return Checkpoint(path, content_key("checkpoint", {"sha256": sha256_file(path)}))


def evaluate(cfg, pre: PrecomputeResult | None, trained) -> EvalResult:
    """Computes the missing units of the grid, merges them, writes results.json and plots.

    `trained` is a TrainResult or a Checkpoint (anything with `weights`, `key`,
    `mlflow_run_id`); `pre` may be None when the evaluation needs nothing from precompute
    (needs_precompute)."""
    e = cfg.eval
    if pre is None and needs_precompute(cfg):
        raise ValueError("this evaluation needs the precompute stage (classifier or reference)")
    kind = feature_kind(cfg)
    weights = pre.path / "classifier.pt" if kind == "classifier" else Path(e.inception_weights)
    check_weights(kind, weights)  # before any worker starts
    reference = reference_path(cfg, pre)
    ref = load_reference(reference)
    slice_ = eval_slice(cfg, pre)
    out = output_dir(cfg, pre, trained, slice_)
    with output_lock(out, "evaluation"):
        made_from = trained.path if hasattr(trained, "steps") else None  # a training
        stale = begin(out, "evaluation", cfg.paths.recompute_stale, made_from)
        result = _evaluate(cfg, pre, trained, out, slice_, kind, weights, reference, ref)
    trained_stale = getattr(trained, "stale", "")
    result.stale = stale or (f"its training was {trained_stale}" if trained_stale else "")
    if result.stale:
        mark_stale(tracking_uri(cfg), result.mlflow_run_id, result.stale)
    return result


def _evaluate(cfg, pre, trained, out: Path, slice_: dict, kind, weights, reference, ref):
    e = cfg.eval
    key = out.name
    done = Manifest.read(out)
    if done is not None:
        results = json.loads((out / "results.json").read_text())
        return EvalResult(out, key, False, 0, results, done.extra.get("mlflow_run_id", ""))
    started = time.time()

    expect = None
    data_info = Manifest.read(pre.path).extra if pre is not None else None
    if data_info is not None:  # the model must fit the data it is compared with
        expect = (data_info["num_classes"], tuple(data_info["latent_shape"][1:]))
    input_size = cfg.model_config().input_size  # official files hold no latent side (RoPE)
    data = str(pre.path) if pre is not None else None
    runner_args = (
        trained.weights,
        input_size,
        cfg.tokenizer,
        kind,
        weights,
        e,
        expect,
        data,
        cfg.train.sdpa_backend,
    )
    local = functools.cache(lambda: UnitRunner(*runner_args))  # opened once, if at all
    points = [(w, list(iv)) for iv in e.intervals for w in e.omegas]
    shards = [(s, min(e.shard_size, e.n_samples - s)) for s in range(0, e.n_samples, e.shard_size)]

    def units_of(kind: str, omega: float = 1.0, interval=(0.0, 1.0)) -> list[Unit]:
        return [Unit(omega, tuple(interval), k, s, n, kind) for k, (s, n) in enumerate(shards)]

    units_dir = out / "units"
    computed = 0

    def compute(units: list[Unit]) -> list[dict]:
        """Runs the units not on disk yet (each written as it arrives: a kill loses only the
        running ones) and returns every unit's sums."""
        nonlocal computed
        missing = [u for u in units if not (units_dir / f"{u.name}.npz").is_file()]
        for name, sums in run_units(runner_args, local, missing, e, cfg.train.ray_address):
            with atomic_path(units_dir / f"{name}.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **sums)
            computed += 1
            preemption.check()  # a stop signal: the written units stay, a rerun does the rest
        return [dict(np.load(units_dir / f"{u.name}.npz")) for u in units]

    calibrated = pre is not None and e.calibrate
    grid_units = [u for w, iv in points for u in units_of("point", w, iv)]
    real_units = units_of("real") if calibrated else []
    done_units = dict(zip(grid_units + real_units, compute(grid_units + real_units), strict=True))

    reference_info = {"reference": str(reference), "reference_sha256": slice_["reference"]}

    summary = functools.partial(summarize, ref=ref, kind=kind)
    calibration = {}
    real_prc = None
    if calibrated:
        parts = [done_units[u] for u in real_units]
        calibration = real_calibration(parts, local(), ref, summary, e, data_info["num_rows"])
        real_prc = np.concatenate([p["prc"] for p in parts])
    results = []
    for omega, interval in points:
        parts = [done_units[u] for u in units_of("point", omega, interval)]
        entry = {"omega": omega, "t_min": interval[0], "t_max": interval[1], "nfe": e.nfe}
        entry |= summary(parts) | {"features": kind, "uint8": UINT8_RULE}
        entry |= {"weights": str(trained.weights), **reference_info}
        if real_prc is not None and len(real_prc):
            entry |= precision_recall(np.concatenate([p["prc"] for p in parts]), real_prc)
        results.append(entry)
    best = min(range(len(results)), key=lambda i: results[i]["fid"])
    if e.many_steps:  # the same network, many small steps: capacity apart from the 1-NFE map
        for i, entry in enumerate(results):
            unguided = (entry["omega"], entry["t_min"], entry["t_max"]) == (1.0, 0.0, 1.0)
            if i == best or unguided:
                point = (entry["omega"], [entry["t_min"], entry["t_max"]])
                many = summary(compute(units_of("euler", *point)))
                entry["many_step"] = {"steps": e.many_steps} | many
    num_classes = data_info["num_classes"] if data_info is not None else local().num_classes
    sensitivity = local().sensitivity()
    for i, entry in enumerate(results):
        entry["best"] = i == best
        entry |= calibration
        entry |= {"sensitivity": sensitivity, "ignores_omega": ignores_omega(sensitivity)}
        entry["did_not_learn"] = did_not_learn(
            entry["fid"],
            calibration.get("class_mean_ceiling", {}).get("fid"),
            entry.get("accuracy"),
            num_classes,
        )
    write_json_atomic(out / "results.json", results)
    plots = plot_fid_vs_omega(results, out)
    grids = local().sample_grids(points, out) if e.grid_per_class else []
    outputs = [out / "results.json", *plots, *grids, *sorted(units_dir.glob("*.npz"))]
    files = [FileRecord.of(p, out) for p in outputs]
    names = [point_name(r["omega"], [r["t_min"], r["t_max"]]) for r in results]
    device = device_name(pick_device(e.device))
    if e.workers > 1:
        device = (
            f"{e.workers} Ray actors, {e.gpus_per_worker:g} GPU each"
            if e.gpus_per_worker
            else device
        )
    run_id = log_evaluation(
        cfg, trained, key, results, names, [out / "results.json", *plots, *grids], device, pre
    )
    extra = {"best": results[best], "mlflow_run_id": run_id}
    timings = {"seconds": time.time() - started}
    Manifest(key, "evaluate", slice_, input_keys(pre, trained), files, extra, timings).write(out)
    return EvalResult(out, key, True, computed, results, run_id)


def summarize(parts: list[dict], ref, kind: str) -> dict:
    """FID against `ref` (mu, sigma), IS and, with classifier features, class accuracy of the
    merged sums of `parts` (units' npz contents): the single-pass numbers exactly."""
    feats = FeatureStats.merge([FeatureStats(int(p["n"]), p["total"], p["outer"]) for p in parts])
    scores = ScoreStats.merge(
        [ScoreStats(int(p["n"]), p["p_sum"], float(p["plogp_sum"])) for p in parts]
    )
    mu, sigma = feats.mean_cov()
    out = {"n_samples": feats.n, "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    out["is"] = scores.inception_score()
    if kind == "classifier":
        out["accuracy"] = float(sum(float(p["correct"]) for p in parts) / feats.n)
    return out


def real_indices(rows: int, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """Which training rows stand in for n real samples: n of them without replacement, or,
    when the set has fewer than n, a bootstrap (n draws with replacement)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    if rows >= n:
        return torch.randperm(rows, generator=gen)[:n], f"{n} of {rows} training rows"
    return torch.randint(0, rows, (n,), generator=gen), f"bootstrap: {n} draws of {rows} rows"


def real_calibration(parts, runner, ref, summary, e, rows: int) -> dict:
    """The real-data floor (n training images against the same reference) and the class-mean
    ceiling (every sample the decoded mean latent of its class over those n rows: for pixel
    data, the class's mean image), with how the rows were drawn."""
    floor = summary(parts) | {"rows": real_indices(rows, e.n_samples, e.seed)[1]}
    sums = sum(p["class_sum"] for p in parts)
    counts = sum(p["class_count"] for p in parts)
    means = torch.from_numpy(sums / np.maximum(counts, 1)[:, None, None, None]).float()
    feats, logits = runner.features(means)
    labels = torch.arange(e.n_samples) % runner.num_classes
    per_class = torch.bincount(labels, minlength=runner.num_classes)
    stats = FeatureStats.weighted(feats, per_class)
    mu, sigma = stats.mean_cov()
    ceiling = {"n_samples": stats.n, "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    correct = (logits.argmax(1) == torch.arange(len(logits))).double()
    ceiling["accuracy"] = float((correct * per_class).sum() / stats.n)
    return {"real_data_floor": floor, "class_mean_ceiling": ceiling}


def precision_recall(generated: np.ndarray, real: np.ndarray) -> dict:
    """torch-fidelity's precision and recall (k = 3) of generated against real features."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    m = min(len(generated), len(real))
    out = prc_features_to_metric(
        torch.from_numpy(generated[:m]).double(),
        torch.from_numpy(real[:m]).double(),
        prc_neighborhood=3,
        prc_batch_size=10_000,
        save_cpu_ram=False,
        verbose=False,
    )
    return {"precision": out["precision"], "recall": out["recall"]}


def load_model(weights: Path, input_size: int) -> torch.nn.Module:
    """The network in a weights file: our ema.safetensors (its model config in the metadata),
    or an official release state dict (.pth: architecture read off the tensors; `input_size`
    is the latent side, which those files do not record)."""
    from safetensors import safe_open

    from imf_core.models.config import ModelConfig

    weights = Path(weights)
    if weights.suffix == ".safetensors":
        with safe_open(str(weights), "pt") as f:
            model_cfg = ModelConfig(**json.loads(f.metadata()["model_config"]))
        model = build(model_cfg)
        model.load_state_dict(load_file(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = load_official(state, input_size=input_size)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Unit:
    """One unit of work: `count` samples from index `start` (shard `shard`) of one kind: a grid
    point ("point": eval.nfe MeanFlow steps), the many-step calibration at a point ("euler"), or
    real training rows ("real", the floor and the class means)."""

    omega: float
    interval: tuple[float, float]
    shard: int
    start: int
    count: int
    kind: str = "point"

    @property
    def name(self) -> str:
        point = point_name(self.omega, list(self.interval))
        prefix = {"point": point, "euler": f"euler_{point}", "real": "real"}[self.kind]
        return f"{prefix}_s{self.shard:05d}"


class UnitRunner:
    """What units need -- the model, tokenizer, feature extractor, the data rows -- opened once
    per process (the driver, each Ray actor, or a training rank). `weights` is a weights file
    (load_model) or the network itself (a training's, its EMA swapped in: tasks.inrun_eval).
    `expect` = (classes, latent shape) of the data, if known; `data` = the precompute output
    (for real rows), if any; `sdpa_backend` the network's attention kernel (train.sdpa_backend)."""

    def __init__(
        self,
        weights,
        input_size,
        tokenizer_cfg,
        kind,
        features,
        e,
        expect,
        data,
        sdpa_backend="auto",
        threads=0,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.e = e
        self.sdpa_backend = sdpa_backend
        self.device = pick_device(e.device)
        if isinstance(weights, torch.nn.Module):
            self.model = weights
        else:
            self.model = load_model(weights, input_size).to(self.device)
        m = self.model.cfg
        self.num_classes, self.shape = m.num_classes, (m.in_channels, m.input_size, m.input_size)
        if expect is not None and expect != (self.num_classes, self.shape):
            raise ValueError(
                f"the model in {weights} generates {self.shape} latents of {self.num_classes} "
                f"classes; the data has {expect[1]} and {expect[0]}"
            )
        t = tokenizer_cfg
        self.tokenizer = open_tokenizer(t.name, t.path, t.variant, e.device)
        from tasks.extractors import open_extractor

        self.extractor = open_extractor(kind, features).to(self.device)
        self.rgb_extractor = kind == "inception"
        self.data = LatentDataset(data, sample_posterior=False) if data else None

    def features(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of latents, decoded and converted to uint8 as samples are."""
        images = to_uint8(self.tokenizer.decode(latents.to(self.device))).to(self.device)
        if images.shape[1] == 1 and self.rgb_extractor:
            images = images.repeat(1, 3, 1, 1)  # grey-scale data through an RGB network
        f, logits = self.extractor(images)
        return f.cpu(), logits.cpu()

    @torch.no_grad()
    def run(self, unit: Unit) -> tuple[str, dict]:
        """Generates (or reads) the unit's samples and reduces them to mergeable float64 sums,
        plus the features of its samples among the first prc_samples (precision / recall)."""
        e = self.e
        index = range(unit.start, unit.start + unit.count)
        if unit.kind == "real":
            rows = real_indices(self.data.num_rows, e.n_samples, e.seed)[0][
                index.start : index.stop
            ]
            latents, labels = self.data.rows(rows.tolist())
        else:
            latents = sample_noise(index, self.shape, e.seed)
            labels = torch.tensor(index) % self.num_classes
        feats, scores, correct, prc = [], [], 0, []
        for b in range(0, unit.count, e.batch_size):
            x, y = latents[b : b + e.batch_size].to(self.device), labels[b : b + e.batch_size]
            if unit.kind != "real":
                x = self.sample(unit, x, y.to(self.device))
            f, logits = self.features(x)
            feats.append(FeatureStats.of(f))
            scores.append(ScoreStats.of(logits))
            correct += int((logits.argmax(1) == y).sum())
            keep = max(0, min(len(f), e.prc_samples - unit.start - b))
            prc.append(f[:keep].float().numpy())
        fs, ss = FeatureStats.merge(feats), ScoreStats.merge(scores)
        sums = {"n": fs.n, "total": fs.total, "outer": fs.outer, "p_sum": ss.p_sum}
        sums |= {"plogp_sum": ss.plogp_sum, "correct": correct, "prc": np.concatenate(prc)}
        if unit.kind == "real":  # per-class latent sums: the class-mean ceiling
            class_sum = torch.zeros(self.num_classes, *self.shape, dtype=torch.float64)
            sums["class_sum"] = class_sum.index_add_(0, labels, latents.double()).numpy()
            sums["class_count"] = torch.bincount(labels, minlength=self.num_classes).numpy()
        return unit.name, sums

    @torch.no_grad()
    def sensitivity(self) -> dict[str, dict]:
        """The network's input sensitivity (imf_core.guidance.input_sensitivity) on a fixed
        batch: SENSITIVITY_SAMPLES noises from eval.seed, classes i mod K."""
        index = range(SENSITIVITY_SAMPLES)
        noise = sample_noise(index, self.shape, self.e.seed).to(self.device)
        y = (torch.tensor(index) % self.num_classes).to(self.device)
        return input_sensitivity(self.model, noise, y)

    def sample(self, unit: Unit, noise, y) -> torch.Tensor:
        """Latents of one batch: eval.nfe MeanFlow steps, or the many-step calibration."""
        t_min, t_max = unit.interval
        euler = unit.kind == "euler"
        steps = self.e.many_steps if euler else self.e.nfe
        with plain_attention(self.sdpa_backend):
            return generate(self.model, noise, y, unit.omega, t_min, t_max, steps, euler=euler)

    @torch.no_grad()
    def sample_grids(self, points, out: Path) -> list[Path]:
        """A PNG grid per grid point (tasks.grids): a row per grid class, grid_per_class
        columns, decoded through the tokenizer."""
        e = self.e
        noise, y = grid_inputs(self.num_classes, self.shape, e.grid_per_class, e.seed)
        noise, y = noise.to(self.device), y.to(self.device)
        with plain_attention(self.sdpa_backend):
            return [
                save_png(
                    decoded_grid(
                        self.model,
                        self.tokenizer,
                        noise,
                        y,
                        omega,
                        e.grid_per_class,
                        point_title(omega, interval),
                        tuple(interval),
                        e.nfe,
                    ),
                    out / "grids" / f"{point_name(omega, interval)}.png",
                )
                for omega, interval in points
            ]


def run_units(runner_args: tuple, local, units: list[Unit], e, ray_address: str):
    """Yields (unit name, sums) as units finish: in this process (on `local()`, the runner
    the sample grids use too), or on `e.workers` Ray actors (GPU actors when
    `e.gpus_per_worker` > 0) of the local or addressed cluster."""
    if e.workers <= 1 or len(units) <= 1:
        yield from (local().run(u) for u in units)
        return
    import ray
    from ray.util import ActorPool

    from tasks.cluster import connect_ray, require_resources

    connect_ray(ray_address, e.workers * e.cpus_per_worker)
    require_resources("eval", e.cpus_per_worker, e.gpus_per_worker)
    actor = ray.remote(num_cpus=e.cpus_per_worker, num_gpus=e.gpus_per_worker)(UnitRunner)
    threads = max(1, int(e.cpus_per_worker))
    actors = [actor.remote(*runner_args, threads) for _ in range(min(e.workers, len(units)))]
    try:
        yield from ActorPool(actors).map_unordered(lambda a, u: a.run.remote(u), units)
    finally:
        for a in actors:
            ray.kill(a)


def sample_noise(indices, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise of each sample from (seed, sample index): the same samples whatever the sharding,
    and the same noise at every grid point (common random numbers across omega)."""
    gens = (torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices)
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def plot_fid_vs_omega(results: list[dict], out: Path) -> list[Path]:
    """One FID-vs-omega plot per CFG interval, the best point marked, with the calibration a
    reader needs beside the curve: the real-data floor, the same network's many-step points
    and the class-mean ceiling (in the legend; drawn, it would flatten the curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    intervals = sorted({(r["t_min"], r["t_max"]) for r in results})
    for t_min, t_max in intervals:
        rows = sorted(
            (r for r in results if (r["t_min"], r["t_max"]) == (t_min, t_max)),
            key=lambda r: r["omega"],
        )
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["omega"] for r in rows], [r["fid"] for r in rows], "o-")
        for r in rows:
            if r["best"]:
                ax.plot(
                    [r["omega"]], [r["fid"]], "r*", markersize=14, label=f"best: FID {r['fid']:.2f}"
                )
        many = [r for r in rows if "many_step" in r]
        if many:
            steps = many[0]["many_step"]["steps"]
            ax.plot(
                [r["omega"] for r in many],
                [r["many_step"]["fid"] for r in many],
                "kx",
                markersize=9,
                label=f"same network, {steps} Euler steps",
            )
        if "real_data_floor" in rows[0]:
            floor = rows[0]["real_data_floor"]["fid"]
            ax.axhline(floor, color="g", ls="--", label=f"real data: {floor:.2f}")
            ax.set_ylim(bottom=0)
        if "class_mean_ceiling" in rows[0]:
            ceiling = rows[0]["class_mean_ceiling"]["fid"]
            ax.plot([], [], " ", label=f"class means: {ceiling:.1f}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.set(
            xlabel="CFG scale omega",
            ylabel="FID",
            title=f"interval [{t_min:g}, {t_max:g}], NFE {rows[0]['nfe']}",
        )
        ax.grid(alpha=0.3)
        path = out / f"fid_vs_omega_t{t_min:g}-{t_max:g}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


# What the flows call; the unit files decide what an interrupted evaluation still computes.
evaluate_task = StageTask(evaluate, "evaluate", output_dir)
