"""Stage 2: data-parallel iMF training on Ray Train, checkpointed, resumable, tracked in MLflow.

    >>> job = TrainJob.of(cfg, precompute_result)  # built once from the experiment config
    >>> result = train(job)
    >>> result.weights  # the exported EMA weights

`ray.train.torch.TorchTrainer` runs `train_loop` (tasks.train_loop) on `train.num_workers`
workers (gloo on CPU, NCCL on GPU) with RunConfig(storage_path=<artifacts>/train/<key>/ray,
name="run"): launching the same run again resumes from its latest checkpoint (same step, same
data order, same noise), and FailureConfig(max_failures) restarts a run whose worker died. The
finished run's EMA weights are exported as safetensors with the resolved config, and
`_SUCCESS` marks it done.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from imf_core.guidance import GuidanceConfig
from imf_core.models import build, count_params
from imf_core.models.config import ModelConfig
from imf_core.objectives import ObjectiveConfig
from imf_core.training import OptimConfig
from tasks import inrun_eval, preemption
from tasks.artifacts import FileRecord, Manifest, StageTask, begin, content_key
from tasks.cluster import connect_ray
from tasks.journal import replay
from tasks.precompute import PrecomputeResult, stores_flips
from tasks.schema import ExperimentConfig, TokenizerConfig, TrainConfig
from tasks.storage import Output, Store, StoredFile, failing_cleanly, noted_on
from tasks.tracking import TrackingTarget, dataset_input, end_run, flatten, mark_stale, open_run
from tasks.train_loop import NAN_FILE, train_loop

WEIGHTS = "ema.safetensors"  # the exported EMA weights, what evaluation samples from

# What does not change the numbers a run computes stays out of its key.
RUNTIME_ONLY = (
    "num_workers",
    "micro_batch",
    "cpus_per_worker",
    "use_gpu",
    "log_every",
    "sample_every",
    "eval_every",
    "eval_every_epochs",
    "max_failures",
    "ray_address",
    "placement_strategy",
    "fault_at_step",
    "preempt_grace_s",
    "compile",
    "compile_jvp",
    "keep_checkpoints",
    "sdpa_backend",
)
# Model settings that choose kernels, not the function (imf_core.models.config).
MODEL_RUNTIME_ONLY = ("jvp_attention",)
# Settings added after trainings already exist: in the key only when set, so that a training
# made before the setting existed (it ran with the default) is still found and reused.
KEYED_WHEN_SET = {
    "optim": {"decay_fraction": 0.0, "embedder_lr_scale": 1.0},
    "model": {"omega_input_scale": 1.0},
}


@dataclass
class TrainResult:
    path: str | Path  # its output's location: a local directory, or an s3:// URI
    key: str
    computed: bool
    steps: int
    mlflow_run_id: str
    stale: str = ""  # why its numbers are not this code's (tasks.artifacts.stale); "" if they are

    @property
    def out(self) -> Output:
        return Output.at(self.path)

    @property
    def weights(self) -> StoredFile:
        """The exported EMA weights (what evaluation samples from), by name: each evaluation
        actor reads them on its own node (tasks.storage.local_file)."""
        return self.out.file(WEIGHTS)


def train_key(
    model: ModelConfig,
    objective: ObjectiveConfig,
    guidance: GuidanceConfig,
    optim: OptimConfig,
    train: TrainConfig,
    flips: bool,
    precompute_key: str,
) -> str:
    """The content key of a training: what decides its numbers, and the data's key."""
    config = {
        "model": {k: v for k, v in asdict(model).items() if k not in MODEL_RUNTIME_ONLY},
        "objective": asdict(objective),
        "guidance": asdict(guidance),
        "optim": asdict(optim),
        "train": {k: v for k, v in asdict(train).items() if k not in RUNTIME_ONLY},
    }
    for section, defaults in KEYED_WHEN_SET.items():
        for name, default in defaults.items():
            if config[section][name] == default:
                del config[section][name]
    if flips:  # an epoch is a pass over the images, not the stored rows
        config["epoch"] = "images, one orientation each"
    return content_key("train", config, [precompute_key])


def train_key_of(cfg: ExperimentConfig, precompute_key: str) -> str:
    """The key of the experiment's training on the precompute output `precompute_key`, as its
    TrainJob computes it (for --plan, which has no precompute output to build a job from)."""
    sections = (cfg.model_config(), cfg.objective, cfg.guidance, cfg.optim, cfg.train)
    return train_key(*sections, stores_flips(cfg.data), precompute_key)


def checkpoint_bytes(model: ModelConfig) -> int:
    """One checkpoint's size: model, EMA and Adam's two moments, float32 (the export is less)."""
    with torch.device("meta"):
        params = count_params(build(model), inference=False)
    return 4 * 4 * params


@dataclass(frozen=True)
class TrainJob:
    """What one training reads, resolved once from the experiment (TrainJob.of) and handed to
    the stage and, pickled by Ray, to every worker: the sections that decide its numbers, the
    data it trains on, its MLflow run, its in-run evaluation, and where its output goes."""

    model: ModelConfig
    model_name: str  # the preset (run names, messages)
    objective: ObjectiveConfig
    guidance: GuidanceConfig
    optim: OptimConfig
    train: TrainConfig
    flips: bool  # the data stores flipped rows: an epoch reads one orientation per image
    tokenizer: TokenizerConfig  # what decodes its sample grids (and in-run evaluations)
    data: PrecomputeResult  # its path absolute
    data_out: Output  # the same output, with its store (an object store's endpoint and keys)
    tracking: TrackingTarget
    run_name: str  # tracking.run_name, else "<experiment> <model> <objective> seed <seed>"
    params: dict  # the whole experiment, resolved: MLflow params, config.json, the manifest
    store: Store
    recompute_stale: bool
    inrun: inrun_eval.InRunPlan | None  # None when train.eval_every is off

    @classmethod
    def of(cls, cfg: ExperimentConfig, pre: PrecomputeResult) -> TrainJob:
        model, flips = cfg.model_config(), stores_flips(cfg.data)
        key = train_key_of(cfg, pre.key)  # the in-run evaluation's folder sits under it
        store = Store.of(cfg.paths.artifacts)  # absolute: workers have another cwd
        seed = cfg.train.seed  # runs of one experiment differ in seed most often: in the name
        name = f"{cfg.name} {cfg.model.name} {cfg.objective.name} seed {seed}"
        tracking = TrackingTarget.of(cfg)
        return cls(
            model,
            cfg.model.name,
            cfg.objective,
            cfg.guidance,
            cfg.optim,
            cfg.train,
            flips,
            cfg.tokenizer,
            replace(pre, path=pre.out.location),  # absolute: workers have another cwd
            pre.out,
            tracking,
            tracking.run_name or name,
            cfg.to_dict(),
            store,
            cfg.paths.recompute_stale,
            inrun_eval.plan(cfg, pre, store.output("train", key)),
        )

    def key(self) -> str:
        sections = (self.model, self.objective, self.guidance, self.optim, self.train)
        return train_key(*sections, self.flips, self.data.key)

    @property
    def out(self) -> Output:
        return self.store.output("train", self.key())


def output_dir(job: TrainJob) -> Output:
    return job.out


def mlflow_run(job: TrainJob, out: Output) -> str:
    """Creates (or finds, on resume) this training run's MLflow run; returns its id.

    Created here, in the driver, before any worker starts: SQLite backends lock under
    concurrent writers, and rank 0 then only appends to an existing run.
    """

    def params() -> dict[str, str]:
        # The size the paper's tables quote (1-NFE inference: no auxiliary head), in millions.
        with torch.device("meta"):
            size = count_params(build(job.model)) / 1e6
        return flatten(job.params) | {"model.params_m": f"{size:.2f}"}

    t = job.train
    workers = f"{t.num_workers} {'GPU' if t.use_gpu else 'CPU'} worker(s)"  # rank 0 names it
    tags = {"stage": "train", "train_key": out.name, "imf.device": workers, **job.tracking.tags}
    return open_run(
        job.tracking.uri,
        out,
        job.tracking.experiment,
        job.run_name,
        tags,
        params,
        [dataset_input(job.data, "training")],
    )


def train(job: TrainJob) -> TrainResult:
    """Trains (or resumes, or reuses) the run `job` defines; a second launch of the same
    training waits for the first and reuses its output."""
    out = job.out
    with failing_cleanly(out.store, f"training {out.name}"), out.lock("training"):
        stale = begin(out, "training", job.recompute_stale)
        result = _train(job, out, stale)
    if stale:
        mark_stale(job.tracking.uri, result.mlflow_run_id, stale)
    return result


def _train(job: TrainJob, out: Output, stale: str) -> TrainResult:
    key = out.name
    done = Manifest.read(out)
    if done is not None and all(f.valid_in(out, "size") for f in done.files):
        steps, run_id = done.extra["steps"], done.extra["mlflow_run_id"]
        return TrainResult(out.location, key, False, steps, run_id, stale)
    started = time.time()
    t = job.train
    out.require_free(checkpoint_bytes(job.model) * (t.keep_checkpoints + 1), "training")
    run_id = mlflow_run(job, out)
    replay(out, job.tracking.uri)  # a resume: first what an outage left in its journal
    preemption.set_grace(t.preempt_grace_s)
    try:
        with preemption.watching(out):
            result = _fit(job, out, run_id)
        if out.exists(preemption.STOPPED_FILE):  # a signal asked it to stop: checkpointed
            raise preemption.requested() or preemption.Preempted(signal.SIGTERM)
        if out.exists(NAN_FILE):
            raise RuntimeError(f"training stopped: {out.read_text(NAN_FILE).strip()}")
        if result.checkpoint is None:
            raise RuntimeError(f"training of {out.uri} produced no checkpoint")
    except BaseException as err:
        with noted_on(err, "ending its MLflow run"):  # its journal may be on the failed store
            end_run(job.tracking.uri, run_id, err, journal=out)
        raise
    with result.checkpoint.as_directory() as ckpt:
        state = torch.load(Path(ckpt) / "state.pt", weights_only=True, map_location="cpu")
    model = build(job.model)
    model.load_state_dict(state["model"])
    ema_weights = {k: v.contiguous() for k, v in state["ema"].items()}
    meta = {"model_config": json.dumps(asdict(job.model)), "steps": str(state["step"])}
    with out.staged(WEIGHTS) as tmp:
        save_file(ema_weights, tmp, metadata=meta)
    out.write_json("config.json", job.params)
    files = [FileRecord.of(out, WEIGHTS), FileRecord.of(out, "config.json")]
    extra = {"steps": state["step"], "mlflow_run_id": run_id, "metrics": result.metrics}
    Manifest(
        key, "train", job.params, [job.data.key], files, extra, {"seconds": time.time() - started}
    ).write(out)
    end_run(job.tracking.uri, run_id, journal=out)
    return TrainResult(out.location, key, True, state["step"], run_id, stale)


def _fit(job: TrainJob, out: Output, run_id: str):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = job.train
    connect_ray(t.ray_address, t.num_workers * t.cpus_per_worker)
    # The job itself (pickled by Ray): workers rebuild nothing; its paths are absolute, as
    # workers do not share the driver's cwd.
    loop_config = {"job": job, "mlflow_run_id": run_id}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
            placement_strategy=t.placement_strategy,
        ),
        run_config=RunConfig(
            name="run",
            **out.store.ray_storage(f"{out.rel}/ray"),  # Ray Train's checkpoints, in the store
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # Ray Train's own INFO lines ("Checkpoint successfully created", "Reporting
            # training result") are a third of a run's output; its warnings still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


train_task = StageTask(train, "train", output_dir)  # what the flows call
