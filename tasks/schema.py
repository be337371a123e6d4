"""The experiment's config: one dataclass per section, below every stage.

Each stage reads its own section's type from here (precompute: `DataConfig`, `TokenizerConfig`,
`PrecomputeConfig`; train: `TrainConfig`; evaluate: `EvalConfig`; the input checks:
`InputsConfig`), beside the sections imf_core owns (`ModelConfig`, `ObjectiveConfig`,
`GuidanceConfig`, `OptimConfig`), and `ExperimentConfig` composes them, the way torchtitan's
job config does: tasks.config builds it from YAML without importing any stage. A section checks
its own values (`__post_init__`); what decides an output's key stays with the stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, get_type_hints

from omegaconf import OmegaConf

from imf_core.guidance import GuidanceConfig
from imf_core.models import preset
from imf_core.models.config import ModelConfig
from imf_core.objectives import ObjectiveConfig
from imf_core.sdpa import check_backend
from imf_core.training import COMPILE_MODES, OptimConfig

# ------------------------------------------------------------------ precompute
DATASETS = ("digits", "mnist5k", "imagefolder", "parquet")


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist5k | imagefolder | parquet
    root: str = ""  # imagefolder: folder of class folders; parquet: a precompute output folder
    image_size: int = 256  # imagefolder: ADM centre crop to this side
    flips: bool = False  # flips stored as extra rows (ImageNet); an epoch reads one per image
    on_bad_image: str = "fail"  # fail | skip (skipped files are listed in _SUCCESS and printed)

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"data.name must be one of {DATASETS}, got {self.name!r}")
        if self.on_bad_image not in ("fail", "skip"):
            raise ValueError(f"data.on_bad_image must be fail or skip, got {self.on_bad_image!r}")


@dataclass
class TokenizerConfig:
    name: str = "pixel"  # pixel | sd_vae
    path: str = ""  # sd_vae: a local AutoencoderKL folder (else the hub id of `variant`)
    variant: str = "mse"  # sd_vae: mse | ema (the paper uses ft-mse)
    batch_size: int = 64  # images per encoder call
    device: str = "auto"  # auto = cuda when present


@dataclass
class PrecomputeConfig:
    rows_per_shard: int = 4096  # rows per Parquet file: the unit of work, restart and reuse
    rows_per_row_group: int = 256  # the unit the training reader decodes
    workers: int = 1  # processes encoding shards in parallel (without gpus_per_worker)
    # > 0: shards are encoded by Ray tasks on the local or addressed Ray, each with this many
    # GPUs (1.0: one GPU each; the Ray scheduler runs as many at once as there are GPUs) and
    # cpus_per_worker CPUs; each shard is written by its task as it finishes.
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    ray_address: str = ""  # "" = a local Ray; else a cluster address (infra/README.md)
    verify: str = "sha256"  # on reuse, check each shard's sha256 (or only its size: "size")
    # Pixel data only: steps of the small classifier that evaluation uses as feature extractor
    # (tasks.features); 0 = none. Its training-set feature statistics are the FID reference.
    classifier_steps: int = 0


# ------------------------------------------------------------------ train
@dataclass
class TrainConfig:
    steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0  # passes over the precomputed rows (exact: a DistributedSampler per epoch)
    batch_size: int = 256  # global batch, split evenly over the workers
    # Per-worker micro-batch: each step accumulates gradients over batch_size / (num_workers x
    # micro_batch) micro-steps, then one optimizer step; the same step in the memory of a
    # micro-batch (`--plan` checks it against the GPU check). 0, or at least the per-worker
    # batch: one forward/backward of the whole per-worker batch
    micro_batch: int = 0
    seed: int = 0  # initialisation and data order (a sweep's --seeds: seed, seed + 1, ...)
    num_workers: int = 1  # Ray Train workers (data-parallel ranks)
    cpus_per_worker: float = 1.0  # fractional on small machines
    use_gpu: bool = False  # one GPU per worker
    checkpoint_every: int = 1000  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 3  # the newest kept on disk (B/2: 2.33 GB each, checkpoint_bytes)
    log_every: int = 50  # steps between MLflow metrics / terminal lines
    sample_every: int = 0  # steps between sample grids logged to MLflow (0 = only at the end)
    # Evaluation during training (tasks.inrun_eval): every this many steps, or epochs, and at
    # the end of a training longer than that: FID of the EMA weights on eval.during_samples
    # at eval.during_points (0 = off)
    eval_every: int = 0
    eval_every_epochs: float = 0.0  # (set eval_every or eval_every_epochs, not both)
    max_failures: int = 1  # worker failures Ray Train recovers from
    # torch.compile: none | jvp (the JVP pass) | step (the whole loss and its backward) | auto
    # (imf_core.training.DEFAULT_COMPILE: step, the fastest measured on GPU and CPU alike).
    compile: str = "auto"
    compile_jvp: bool = False  # the old name of compile=jvp, still read
    # The SDPA kernel of the plain (non-JVP) attention passes, in the step and in evaluation:
    # auto (PyTorch's choice) | flash | efficient | cudnn | math (imf_core.sdpa: tried first,
    # the others behind it). Set it to what the GPU check measured fastest (its "attention"
    # part, benchmarks/gpu/); the JVP pass keeps model.jvp_attention. Not in the run's key.
    sdpa_backend: str = "auto"
    ray_address: str = ""  # "" = a local Ray; else a cluster address (infra/README.md)
    # Where Ray places the workers (Ray Train's ScalingConfig.placement_strategy): PACK (as few
    # nodes as fit) | SPREAD | STRICT_PACK (one node) | STRICT_SPREAD (one worker per node)
    placement_strategy: str = "PACK"
    fault_at_step: int = -1  # tests: the last rank kills itself once at this step
    # On SIGTERM / SIGINT: checkpoint at the next step boundary and end; what has not ended
    # after this many seconds is killed (tasks.preemption)
    preempt_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            raise ValueError(
                f"train.steps must be >= 0 and train.epochs > 0 when steps is 0 "
                f"(got steps={self.steps}, epochs={self.epochs})"
            )
        if self.batch_size < 1 or self.num_workers < 1:
            raise ValueError(
                f"train.batch_size and train.num_workers must be >= 1 "
                f"(got {self.batch_size}, {self.num_workers})"
            )
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"train.batch_size {self.batch_size} does not split over "
                f"train.num_workers {self.num_workers}: use a multiple of it"
            )
        per_worker = self.batch_size // self.num_workers
        if self.micro_batch < 0 or (
            self.micro_batch < per_worker and self.micro_batch and per_worker % self.micro_batch
        ):
            fits = [d for d in range(1, per_worker) if per_worker % d == 0]
            raise ValueError(
                f"train.micro_batch {self.micro_batch} does not divide the per-worker batch "
                f"{per_worker} (train.batch_size {self.batch_size} / train.num_workers "
                f"{self.num_workers}): use one of {fits}, or 0 for no accumulation"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        if self.placement_strategy not in strategies:
            raise ValueError(
                f"train.placement_strategy must be one of {strategies}, "
                f"got {self.placement_strategy!r}"
            )
        modes = ("auto", *COMPILE_MODES)
        if self.compile not in modes:
            raise ValueError(f"train.compile must be one of {modes}, got {self.compile!r}")
        if self.compile_jvp:
            if self.compile not in ("auto", "jvp"):
                raise ValueError(
                    f"train.compile_jvp=true (the old name of train.compile=jvp) contradicts "
                    f"train.compile={self.compile}: set train.compile alone"
                )
            self.compile, self.compile_jvp = "jvp", False
        check_backend(self.sdpa_backend, "train.sdpa_backend")
        if self.eval_every < 0 or self.eval_every_epochs < 0:
            raise ValueError("train.eval_every and train.eval_every_epochs must be >= 0")
        if self.eval_every and self.eval_every_epochs:
            raise ValueError(
                f"train.eval_every={self.eval_every} and train.eval_every_epochs="
                f"{self.eval_every_epochs} both set: choose steps or epochs"
            )
        if self.checkpoint_every < 1 or self.log_every < 1 or self.cpus_per_worker <= 0:
            raise ValueError(
                "train.checkpoint_every and train.log_every must be >= 1, train.cpus_per_worker > 0"
            )


# ------------------------------------------------------------------ evaluate
@dataclass
class EvalConfig:
    n_samples: int = 50_000  # 50 per class on ImageNet
    nfe: int = 1  # 1 or 2 sampling steps
    seed: int = 0  # sample i: noise from (seed, i), class i mod K
    omegas: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])  # the CFG grid
    intervals: list[list[float]] = field(default_factory=lambda: [[0.0, 1.0]])  # (t_min, t_max)
    shard_size: int = 10_000  # samples per unit of work
    batch_size: int = 250  # samples a forward pass (does not change the numbers)
    features: str = "auto"  # auto (classifier when precompute made one, else inception) | ...
    inception_weights: str = ""  # a local torch-fidelity InceptionV3 weights file
    # FID reference: an npz with mu, sigma; at paper scale JiT's jit_in256_stats.npz, the
    # official PyTorch evaluation's (docs/paper-scale.md); "" = precompute's reference.npz
    reference: str = ""
    # Weights to evaluate without training: an official release .pth or one of our
    # ema.safetensors ("" = the training's EMA export).
    checkpoint: str = ""
    # Calibration printed beside every FID: the real-data floor and the class-mean ceiling
    # (need the precompute output), the network's many-step result (Euler steps of its boundary
    # velocity u(z, t, t) at omega 1 and at the best point; 0 = off), and precision / recall
    # (torch-fidelity, k = 3) on the first prc_samples samples of each point (0 = off).
    calibrate: bool = True
    many_steps: int = 32  # Euler steps of the many-step calibration (0 = off)
    prc_samples: int = 2000  # samples of each point in precision / recall (0 = off)
    grid_per_class: int = 8  # sample-grid columns per point (0 = no grids)
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda
    # Evaluation during training (train.eval_every; tasks.inrun_eval): samples per evaluation
    # and the variant's operating points, [omega, t_min, t_max] each (not the whole grid).
    during_samples: int = 10_000
    during_points: list[list[float]] = field(default_factory=lambda: [[1.0, 0.0, 1.0]])  # (above)
    workers: int = 1  # Ray actors running units in parallel (1 = in this process)
    cpus_per_worker: float = 1.0  # per actor
    gpus_per_worker: float = 0.0  # > 0 on GPU nodes (one actor per GPU: 1.0)

    def __post_init__(self) -> None:
        if self.n_samples < 2 or self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(
                f"eval.n_samples must be >= 2, eval.shard_size and eval.batch_size >= 1 "
                f"(got {self.n_samples}, {self.shard_size}, {self.batch_size})"
            )
        if self.nfe not in (1, 2):
            raise ValueError(f"eval.nfe must be 1 or 2, got {self.nfe}")
        if not self.omegas or any(w < 1.0 for w in self.omegas):
            raise ValueError(
                f"eval.omegas must be a non-empty list of values >= 1, got {self.omegas}"
            )
        for interval in self.intervals:
            if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
                raise ValueError(
                    f"eval.intervals: each must be [t_min, t_max] with 0 <= t_min <= t_max <= 1, "
                    f"got {list(interval)}"
                )
        if not self.intervals:
            raise ValueError("eval.intervals must not be empty (no CFG interval: [[0.0, 1.0]])")
        if self.features not in ("auto", "inception", "classifier"):
            raise ValueError(
                f"eval.features must be auto | inception | classifier, got {self.features!r}"
            )
        if self.many_steps < 0 or self.prc_samples < 0:
            raise ValueError("eval.many_steps and eval.prc_samples must be >= 0")
        if self.during_samples < 2:
            raise ValueError(f"eval.during_samples must be >= 2, got {self.during_samples}")
        if not self.during_points:
            raise ValueError("eval.during_points must not be empty (no CFG: [[1.0, 0.0, 1.0]])")
        for point in self.during_points:
            if len(point) != 3 or point[0] < 1.0 or not 0.0 <= point[1] <= point[2] <= 1.0:
                raise ValueError(
                    "eval.during_points: each must be [omega, t_min, t_max] with omega >= 1 and "
                    f"0 <= t_min <= t_max <= 1, got {list(point)}"
                )


# ------------------------------------------------------------------ input checks
INPUT_DATASETS = ("imagenet1k",)  # what tasks.input_checks.DATASETS describes


@dataclass
class InputsConfig:
    # What the image folder must be: "" = any folder of class folders; imagenet1k = the
    # ILSVRC-2012 train set (1,000 folders named by WordNet synset ids, 1,281,167 images:
    # labels come from the sorted names, so they must match the released checkpoints' classes)
    dataset: str = ""
    # true: the SD-VAE and Inception weights must be the published files (their SHA-256 in
    # tasks.input_digests.KNOWN_FILES), as every FID compared with the paper needs
    published: bool = False

    def __post_init__(self) -> None:
        if self.dataset and self.dataset not in INPUT_DATASETS:
            raise ValueError(
                f"inputs.dataset must be '' or one of {list(INPUT_DATASETS)}, got {self.dataset!r}"
            )


# ------------------------------------------------------------------ the experiment

# model: a preset name plus optional overrides of any ModelConfig field (None = the preset's).
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [("name", str, field(default="tiny"))]
    + [
        (name, Optional[kind], field(default=None))  # noqa: UP045 (OmegaConf reads Optional)
        for name, kind in get_type_hints(ModelConfig).items()
    ],
)


@dataclass
class Defaults:
    data: str = "digits"  # configs/data/<data>.yaml


@dataclass
class PathsConfig:
    artifacts: str = "artifacts"  # where every stage writes its content-addressed outputs
    # Recompute a training or evaluation made by another imf_core.METHOD_VERSION (or from a
    # training recomputed since) instead of reusing it with a warning; the old one is kept
    # under <artifacts>/stale/. Not part of any content key. CLI: --recompute-stale.
    recompute_stale: bool = False


@dataclass
class TrackingConfig:
    uri: str = ""  # else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = ""  # MLflow experiment name; "" = the experiment config's name
    tags: dict[str, str] = field(default_factory=dict)  # e.g. the ablation table and row
    run_name: str = ""  # the training run's name; "" = "<experiment> <model> <objective>"


@dataclass
class ExperimentConfig:
    name: str = ""
    defaults: Defaults = field(default_factory=Defaults)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    model: Any = field(default_factory=ModelSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)  # what the input files must be

    def model_config(self) -> ModelConfig:
        """The ModelConfig the experiment asks for: its preset with the non-null overrides."""
        section = dataclasses.asdict(self.model)
        name = section.pop("name")
        return preset(name, **{k: v for k, v in section.items() if v is not None})

    def to_dict(self) -> dict:
        """The config as plain, resolved containers (for manifests and MLflow params): the model
        section is the preset's name plus every field it resolves to, no None left."""
        out = OmegaConf.to_container(OmegaConf.structured(self), resolve=True)
        out["model"] = {"name": self.model.name} | dataclasses.asdict(self.model_config())
        return out
