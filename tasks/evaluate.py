"""Stage 3: sharded FID / IS evaluation over a CFG grid, restartable per (grid point, shard).

    >>> job = EvalJob.of(cfg, precompute_result)     # built once from the experiment config
    >>> result = evaluate(job, train_result)
    >>> result.out.read_json("results.json")
    >>> evaluate(EvalJob.of(cfg, None), checkpoint_source(cfg))   # given weights, no training

Each grid point (omega x interval) x each shard of the N samples is one unit (tasks.eval_units,
shared with the evaluation during training, tasks.inrun_eval): generate with the EMA weights
(imf_core.guidance.generate; sample i has class i mod K, so every class gets its share; noise
from (seed, i), the same at every grid point), decode through the tokenizer, convert to uint8
as the official PyTorch evaluation does (tasks.features.to_uint8), extract features, and store
the shard's float64 sums (n, sum x, sum xx^T; sum p, sum p log p for IS; correct labels) in
`units/`. Units already on disk are not recomputed. Merging the sums gives exactly the
single-pass metrics (tasks.eval_metrics). The weights are a training run's EMA export, or any
file `eval.checkpoint` names (tasks.eval_inputs.checkpoint_source): one of our
`ema.safetensors` or an official release `.pth` (imf_core.models.official.load_official).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imf_core.guidance import ignores_omega
from imf_core.metrics import did_not_learn
from tasks import preemption
from tasks.artifacts import FileRecord, Manifest, StageTask, begin, content_key
from tasks.eval_inputs import Features, load_reference, needs_precompute
from tasks.eval_metrics import RESULTS_FORMAT, precision_recall, real_calibration, summarize
from tasks.eval_plots import plot_fid_vs_omega
from tasks.eval_tracking import log_evaluation
from tasks.eval_units import Unit, UnitRunner, point_name, run_units
from tasks.features import UINT8_RULE
from tasks.precompute import PrecomputeResult
from tasks.provenance import device_name
from tasks.schema import EvalConfig, ExperimentConfig, TokenizerConfig
from tasks.storage import Output, Store, failing_cleanly
from tasks.tokenizers import pick_device
from tasks.tracking import TrackingTarget, mark_stale

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
RESULTS = "results.json"  # the grid's rows (tasks.eval_metrics.RESULTS_FORMAT)


@dataclass
class EvalResult:
    path: str | Path  # its output's location: a local directory, or an s3:// URI
    key: str
    computed: bool
    units_computed: int
    results: list[dict]
    mlflow_run_id: str = ""  # the evaluation's MLflow run ("" when the training is untracked)
    stale: str = ""  # why its numbers (or its training's) are not this code's; "" if they are

    @property
    def out(self) -> Output:
        return Output.at(self.path)


def eval_slice(e: EvalConfig, features: Features) -> dict:
    """What the evaluation's numbers depend on (besides its inputs' keys): the grid, the
    features and the reference statistics' bytes (not their path). The weights enter as an
    input key (a training's, or the checkpoint file's)."""
    kept = {k: v for k, v in asdict(e).items() if k not in RUNTIME_ONLY}
    kept.pop("checkpoint")
    for name in IN_RUN_ONLY:  # the evaluation during training's, not this one's
        kept.pop(name)
    kept["reference"] = features.reference_sha256
    return kept | {"features": features.kind, "results_format": RESULTS_FORMAT}


def input_keys(pre: PrecomputeResult | None, trained) -> list[str]:
    return [trained.key] + ([pre.key] if pre is not None else [])


@dataclass(frozen=True)
class EvalJob:
    """What one evaluation reads, resolved and checked once from the experiment (EvalJob.of),
    before any worker starts: the grid, the feature extractor and the FID reference it names
    (files checked, the reference's statistics read), the sampler's settings, its MLflow
    target and where its output goes. The weights it evaluates are the other argument of
    `evaluate` (a training, or given weights), so a flow can hand a training's future."""

    eval: EvalConfig
    features: Features  # the extractor and the FID reference, checked
    slice: dict  # what its key covers besides its inputs (eval_slice)
    input_size: int  # the latent side (official files hold no latent side: RoPE)
    tokenizer: TokenizerConfig  # decodes the samples
    sdpa_backend: str  # the sampling's attention kernel (train.sdpa_backend)
    ray_address: str  # where eval.workers > 1 runs (train.ray_address)
    guidance_mode: str  # the training's, for the summary's no-CFG point
    data: PrecomputeResult | None  # None when the evaluation needs nothing from precompute
    tracking: TrackingTarget
    store: Store
    recompute_stale: bool

    @classmethod
    def of(cls, cfg: ExperimentConfig, pre: PrecomputeResult | None) -> EvalJob:
        e = cfg.eval
        if pre is None and needs_precompute(cfg):
            raise ValueError("this evaluation needs precompute's output (classifier or reference)")
        features = Features.of(cfg, pre)  # before any worker starts
        return cls(
            e,
            features,
            eval_slice(e, features),
            cfg.model_config().input_size,
            cfg.tokenizer,
            cfg.train.sdpa_backend,
            cfg.train.ray_address,
            cfg.guidance.mode,
            pre,
            TrackingTarget.of(cfg),
            Store.of(cfg.paths.artifacts),
            cfg.paths.recompute_stale,
        )

    def key(self, trained) -> str:
        """Its content key for the weights `trained` (a TrainResult or a Checkpoint)."""
        return content_key("evaluate", self.slice, input_keys(self.data, trained))

    def out(self, trained) -> Output:
        return self.store.output("evaluate", self.key(trained))


def output_dir(job: EvalJob, trained) -> Output:
    return job.out(trained)


def evaluate(job: EvalJob, trained) -> EvalResult:
    """Computes the missing units of the grid, merges them, writes results.json and plots.

    `trained` is a TrainResult or a Checkpoint (anything with `weights`, `key`,
    `mlflow_run_id`)."""
    out = job.out(trained)
    with failing_cleanly(out.store, f"evaluation {out.name}"), out.lock("evaluation"):
        made_from = trained.out if hasattr(trained, "steps") else None  # a training
        stale = begin(out, "evaluation", job.recompute_stale, made_from)
        result = _evaluate(job, trained, out)
    trained_stale = getattr(trained, "stale", "")
    result.stale = stale or (f"its training was {trained_stale}" if trained_stale else "")
    if result.stale:
        mark_stale(job.tracking.uri, result.mlflow_run_id, result.stale)
    return result


def _evaluate(job: EvalJob, trained, out: Output) -> EvalResult:
    e, pre, kind = job.eval, job.data, job.features.kind
    ref = load_reference(job.features.reference)
    key = out.name
    done = Manifest.read(out)
    if done is not None:
        results = out.read_json(RESULTS)
        return EvalResult(out.location, key, False, 0, results, done.extra.get("mlflow_run_id", ""))
    started = time.time()

    expect = None
    data_info = Manifest.read(pre.out).extra if pre is not None else None
    if data_info is not None:  # the model must fit the data it is compared with
        expect = (data_info["num_classes"], tuple(data_info["latent_shape"][1:]))
    data = pre.out if pre is not None else None
    runner_args = (
        trained.weights,
        job.input_size,
        job.tokenizer,
        kind,
        job.features.extractor,
        e,
        expect,
        data,
        job.sdpa_backend,
    )
    local = functools.cache(lambda: UnitRunner(*runner_args))  # opened once, if at all
    points = [(w, list(iv)) for iv in e.intervals for w in e.omegas]
    shards = [(s, min(e.shard_size, e.n_samples - s)) for s in range(0, e.n_samples, e.shard_size)]

    def units_of(kind: str, omega: float = 1.0, interval=(0.0, 1.0)) -> list[Unit]:
        return [Unit(omega, tuple(interval), k, s, n, kind) for k, (s, n) in enumerate(shards)]

    computed = 0

    def compute(units: list[Unit]) -> list[dict]:
        """Runs the units not stored yet (each written as it arrives: a kill loses only the
        running ones) and returns every unit's sums."""
        nonlocal computed
        missing = [u for u in units if not out.exists(f"units/{u.name}.npz")]
        for name, sums in run_units(runner_args, local, missing, e, job.ray_address):
            out.write_arrays(f"units/{name}.npz", **sums)
            computed += 1
            preemption.check()  # a stop signal: the written units stay, a rerun does the rest
        return [out.read_arrays(f"units/{u.name}.npz") for u in units]

    calibrated = pre is not None and e.calibrate
    grid_units = [u for w, iv in points for u in units_of("point", w, iv)]
    real_units = units_of("real") if calibrated else []
    done_units = dict(zip(grid_units + real_units, compute(grid_units + real_units), strict=True))

    reference_info = {
        "reference": str(job.features.reference),
        "reference_sha256": job.features.reference_sha256,
    }

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
    out.write_json(RESULTS, results)
    plots = plot_fid_vs_omega(results, out)
    grids = local().sample_grids(points, out) if e.grid_per_class else []
    files = [FileRecord.of(out, n) for n in [RESULTS, *plots, *grids, *out.list("units/*.npz")]]
    names = [point_name(r["omega"], [r["t_min"], r["t_max"]]) for r in results]
    device = device_name(pick_device(e.device))
    if e.workers > 1:
        device = (
            f"{e.workers} Ray actors, {e.gpus_per_worker:g} GPU each"
            if e.gpus_per_worker
            else device
        )
    logged = [out.local_path(n) for n in (RESULTS, *plots, *grids)]
    run_id = log_evaluation(job, trained, key, results, names, logged, device)
    extra = {"best": results[best], "mlflow_run_id": run_id}
    timings = {"seconds": time.time() - started}
    Manifest(key, "evaluate", job.slice, input_keys(pre, trained), files, extra, timings).write(out)
    return EvalResult(out.location, key, True, computed, results, run_id)


# What the flows call; the unit files decide what an interrupted evaluation still computes.
evaluate_task = StageTask(evaluate, "evaluate", output_dir)
