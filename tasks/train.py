"""Stage 2: data-parallel iMF training on Ray Train, checkpointed, resumable, tracked in MLflow.

    >>> result = train(cfg, precompute_result)     # cfg: the experiment config (tasks.config)
    >>> result.path / "ema.safetensors"

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from imf_core.models import build, count_params
from tasks import inrun_eval, preemption
from tasks.artifacts import (
    FileRecord,
    Manifest,
    StageTask,
    begin,
    content_key,
    output_lock,
    require_free_space,
    write_json_atomic,
)
from tasks.cluster import connect_ray
from tasks.precompute import PrecomputeResult, stores_flips
from tasks.tracking import (
    JOURNAL,
    dataset_input,
    end_run,
    flatten,
    mark_stale,
    open_run,
    replay,
    tracking_uri,
)
from tasks.train_loop import train_loop

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
    path: Path
    key: str
    computed: bool
    steps: int
    mlflow_run_id: str
    stale: str = ""  # why its numbers are not this code's (tasks.artifacts.stale); "" if they are

    @property
    def weights(self) -> Path:
        """The exported EMA weights (what evaluation samples from)."""
        return self.path / "ema.safetensors"


def train_key(cfg, precompute_key: str) -> str:
    train = {k: v for k, v in asdict(cfg.train).items() if k not in RUNTIME_ONLY}
    config = {
        "model": {
            k: v for k, v in asdict(cfg.model_config()).items() if k not in MODEL_RUNTIME_ONLY
        },
        "objective": asdict(cfg.objective),
        "guidance": asdict(cfg.guidance),
        "optim": asdict(cfg.optim),
        "train": train,
    }
    for section, defaults in KEYED_WHEN_SET.items():
        for name, default in defaults.items():
            if config[section][name] == default:
                del config[section][name]
    if stores_flips(cfg.data):  # an epoch is a pass over the images, not the stored rows
        config["epoch"] = "images, one orientation each"
    return content_key("train", config, [precompute_key])


def checkpoint_bytes(cfg) -> int:
    """One checkpoint's size: model, EMA and Adam's two moments, float32 (the export is less)."""
    with torch.device("meta"):
        params = count_params(build(cfg.model_config()), inference=False)
    return 4 * 4 * params


def output_dir(cfg, pre: PrecomputeResult) -> Path:
    return Path(cfg.paths.artifacts).resolve() / "train" / train_key(cfg, pre.key)


def mlflow_run(cfg, out: Path, key: str, pre: PrecomputeResult) -> str:
    """Creates (or finds, on resume) this training run's MLflow run; returns its id.

    Created here, in the driver, before any worker starts: SQLite backends lock under
    concurrent writers, and rank 0 then only appends to an existing run.
    """

    def params() -> dict[str, str]:
        # The size the paper's tables quote (1-NFE inference: no auxiliary head), in millions.
        with torch.device("meta"):
            size = count_params(build(cfg.model_config())) / 1e6
        return flatten(cfg.to_dict()) | {"model.params_m": f"{size:.2f}"}

    t = cfg.train
    workers = f"{t.num_workers} {'GPU' if t.use_gpu else 'CPU'} worker(s)"  # rank 0 names it
    tags = {"stage": "train", "train_key": key, "imf.device": workers, **cfg.tracking.tags}
    return open_run(
        tracking_uri(cfg),
        out / "mlflow_run_id",
        cfg.tracking.experiment or cfg.name,
        # Runs of one experiment differ in seed most often: it is in the name, not only a param.
        cfg.tracking.run_name
        or f"{cfg.name} {cfg.model.name} {cfg.objective.name} seed {cfg.train.seed}",
        tags,
        params,
        [dataset_input(pre, "training")],
    )


def train(cfg, pre: PrecomputeResult) -> TrainResult:
    """Trains (or resumes, or reuses) the run this config and precompute output define; a
    second launch of the same training waits for the first and reuses its output."""
    out = output_dir(cfg, pre)
    with output_lock(out, "training"):
        stale = begin(out, "training", cfg.paths.recompute_stale)
        result = _train(cfg, pre, out, stale)
    if stale:
        mark_stale(tracking_uri(cfg), result.mlflow_run_id, stale)
    return result


def _train(cfg, pre: PrecomputeResult, out: Path, stale: str) -> TrainResult:
    key = out.name
    done = Manifest.read(out)
    if done is not None and all(f.valid_in(out, "size") for f in done.files):
        steps, run_id = done.extra["steps"], done.extra["mlflow_run_id"]
        return TrainResult(out, key, False, steps, run_id, stale)
    started = time.time()
    require_free_space(out, checkpoint_bytes(cfg) * (cfg.train.keep_checkpoints + 1), "training")
    run_id = mlflow_run(cfg, out, key, pre)
    journal = out / JOURNAL
    replay(journal, tracking_uri(cfg))  # a resume: first what an outage left unsent
    preemption.set_grace(cfg.train.preempt_grace_s)
    try:
        with preemption.watching(out):
            result = _fit(cfg, pre, out, run_id)
        stopped = out / preemption.STOPPED_FILE
        if stopped.is_file():  # a signal asked it to stop: checkpointed at that step
            raise preemption.requested() or preemption.Preempted(signal.SIGTERM)
        nan_marker = out / "NAN"
        if nan_marker.is_file():
            raise RuntimeError(f"training stopped: {nan_marker.read_text().strip()}")
        if result.checkpoint is None:
            raise RuntimeError(f"training of {out} produced no checkpoint")
    except BaseException as err:
        end_run(cfg, run_id, err, journal)
        raise
    with result.checkpoint.as_directory() as ckpt:
        state = torch.load(Path(ckpt) / "state.pt", weights_only=True, map_location="cpu")
    model = build(cfg.model_config())
    model.load_state_dict(state["model"])
    ema_weights = {k: v.contiguous() for k, v in state["ema"].items()}
    resolved = cfg.to_dict()
    meta = {"model_config": json.dumps(asdict(cfg.model_config())), "steps": str(state["step"])}
    save_file(ema_weights, out / "ema.safetensors", metadata=meta)
    write_json_atomic(out / "config.json", resolved)
    files = [FileRecord.of(out / "ema.safetensors"), FileRecord.of(out / "config.json")]
    extra = {"steps": state["step"], "mlflow_run_id": run_id, "metrics": result.metrics}
    Manifest(
        key, "train", resolved, [pre.key], files, extra, {"seconds": time.time() - started}
    ).write(out)
    end_run(cfg, run_id, journal=journal)
    return TrainResult(out, key, True, state["step"], run_id, stale)


def _fit(cfg, pre: PrecomputeResult, out: Path, run_id: str):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    connect_ray(t.ray_address, t.num_workers * t.cpus_per_worker)
    loop_config = {
        "cfg": cfg,  # the dataclasses themselves (pickled by Ray): workers rebuild nothing
        "data": str(pre.path.resolve()),  # workers do not share the driver's cwd
        "out": str(out),
        "mlflow_uri": tracking_uri(cfg),
        "mlflow_run_id": run_id,
        "inrun_eval": inrun_eval.plan(cfg, pre, out),  # None when train.eval_every is off
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        run_config=RunConfig(
            name="run",
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # Ray Train's own INFO lines ("Checkpoint successfully created", "Reporting
            # training result") are a third of a run's output; its warnings still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


train_task = StageTask(train, "train", output_dir)  # what the flows call
