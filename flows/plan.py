"""What a run or a sweep would do, before it does anything.

    imf run -e imagenet_b2 --plan [--gpu h200 | --mfu 0.4] [--images N]
    imf sweep table1a --scale paper --plan [--seeds 3] [--only mf,imf_aux]
    >>> print(plan_of("table1a", configs, gpu="h200").text())

For each stage of each configuration: its content key and whether its output is already there
(then it would be reused), the images each training sees and its FLOPs (counted by PyTorch on
the meta device: forward, guidance passes, JVP, backward), GPU-hours as FLOPs / (MFU x the
GPU's datasheet dense bf16 peak) at the MFU a GPU check measured (benchmarks/gpu/, `make
gpu-check`, restated as useful FLOPs over the datasheet peak) or an assumed one, and the disk for
latents and checkpoints. Nothing is started and nothing is written: no Prefect, Ray or MLflow, no
precompute, no artifact folder. A GPU's rates come from flows.gpu_rates, what fits on it
from flows.gpu_memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flows.gpu_memory import per_gpu_memory
from flows.gpu_rates import GPU_CHECKS, Rates
from tasks.artifacts import Manifest, methods_of, stale
from tasks.storage import Output, Store
from tasks.train_loop import flops_per_image  # useful FLOPs per image, counted on the meta device

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k's training set (what configs/data/ points at)


def done(out: Output) -> bool:
    """An output is there when its `_SUCCESS` stands and its files have their sizes."""
    manifest = Manifest.read(out)
    return manifest is not None and all(f.valid_in(out, "size") for f in manifest.files)


def reuse_status(cfg, out: Output | None) -> str:
    """A training's or evaluation's status: "reused", "to run", or, when another imf_core
    method version made it (tasks.artifacts.stale), "reused (stale)" or, with
    paths.recompute_stale, "to run (stale)"."""
    if out is None or not done(out):
        return "to run"
    if not stale(methods_of(out)):
        return "reused"
    return "to run (stale)" if cfg.paths.recompute_stale else "reused (stale)"


# ------------------------------------------------------------------ the plan
@dataclass
class Stage:
    stage: str  # precompute | train | evaluate
    label: str  # the variant (or experiment) it serves
    key: str | None  # None: unknown until the stage before it has run
    status: str  # "reused" | "to run" | "shared (<label>)", "(stale)" after either (reuse_status)
    detail: str = ""
    gpu_hours: float | None = None
    disk_bytes: int = 0
    memory: str = ""  # a GPU training's per-GPU batch and memory (per_gpu_memory)


def precompute_stage(cfg, label: str, images: int | None) -> tuple[Stage, str | None, int]:
    """(stage, its key or None, rows) of a config's precompute: keyed as the stage keys it,
    reading the data's listing (never the images) -- or, without the data, its size assumed."""
    from tasks.precompute import PrecomputeJob, _identify, row_bytes

    data, tok, pre = cfg.data, cfg.tokenizer, cfg.precompute
    try:
        key, _, source, upstream = _identify(data, tok, pre)
    except (FileNotFoundError, OSError, ValueError) as err:
        n = images or (IMAGENET_TRAIN_IMAGES if data.name == "imagefolder" else 0)
        rows = n * (2 if data.flips else 1)
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        assumed = f"{n:,} images {'given' if images else 'assumed (ImageNet-1k)'}"
        detail = f"key unknown ({why}); {assumed}, {rows:,} rows"
        disk = rows * row_bytes(data, tok, None)
        return Stage("precompute", label, None, "to run", detail, disk_bytes=disk), None, rows
    rows = upstream.extra["num_rows"] if upstream else source.num_images * (1 + data.flips)
    out = PrecomputeJob.of(cfg).out()
    detail = f"{data.name}: {rows:,} rows"
    disk = rows * row_bytes(data, tok, upstream)
    status = "reused" if done(out) else "to run"
    return Stage("precompute", label, key, status, detail, disk_bytes=disk), key, rows


def train_stage(cfg, label: str, pre_key: str | None, rows: int, rates: Rates | None) -> Stage:
    from tasks.precompute import stores_flips
    from tasks.train import checkpoint_bytes, train_key_of

    t = cfg.train
    memory = per_gpu_memory(cfg, rates)  # a batch that does not fit: refused first
    world, local_batch = t.num_workers, t.batch_size // t.num_workers
    # An epoch is a pass over the images; stored flips are an orientation each (imf_core.data).
    items = rows // 2 if stores_flips(cfg.data) else rows
    per_rank = math.ceil(items / world)  # DistributedSampler pads an epoch to the world
    steps_per_epoch = math.ceil(per_rank / local_batch) if items else 0
    steps = t.steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    images = images_read(steps, per_rank, local_batch, world)
    mcfg = cfg.model_config()
    flops = images * flops_per_image(mcfg, cfg.objective, cfg.guidance)
    detail = f"{steps:,} steps of {t.batch_size} = {images:,} images"
    if not t.steps:
        detail += f" ({t.epochs:g} epochs of {items:,} images"
        detail += ", each in one of its 2 stored orientations)" if stores_flips(cfg.data) else ")"
    detail += f", {flops / 1e18:,.1f} EFLOP"
    hours = None
    if rates is not None:
        mfu, basis = rates.training_mfu(cfg.model.name, cfg.objective.name)
        hours = flops / (mfu * rates.peak_tflops * 1e12) / 3600
        detail += f" ({basis})"
    key = train_key_of(cfg, pre_key) if pre_key else None
    out = Store.of(cfg.paths.artifacts).output("train", key) if key else None
    status = reuse_status(cfg, out)
    disk = checkpoint_bytes(cfg.model_config()) * (t.keep_checkpoints + 1)
    return Stage("train", label, key, status, detail, hours, disk, memory)


def images_read(steps: int, per_rank: int, local_batch: int, world: int) -> int:
    """Images a training of `steps` reads: an epoch's last batch is the rest of its images
    (tasks/train_loop.py batches with drop_last=False), so 240 epochs read 240 x the epoch."""
    if per_rank == 0:
        return 0
    epochs, rest = divmod(steps, math.ceil(per_rank / local_batch))
    return (epochs * per_rank + min(rest * local_batch, per_rank)) * world


def evaluate_stage(cfg, label: str, trained: Stage, rates: Rates | None) -> Stage:
    e = cfg.eval
    points = len(e.omegas) * len(e.intervals)
    decoded = e.n_samples * (points + (1 + 2 * bool(e.many_steps) if e.calibrate else 0))
    network_evals = e.n_samples * (points * e.nfe + (2 * e.many_steps if e.calibrate else 0))
    detail = f"{points} points x {e.n_samples:,} samples; {decoded:,} images decoded and embedded"
    hours = None
    if rates is not None and rates.eval_images_per_s:
        extra = max(0, network_evals - decoded) / max(rates.generate_images_per_s, 1e-9)
        hours = (decoded / rates.eval_images_per_s + extra) / 3600
        detail += f" (at {rates.eval_images_per_s:.0f} images/s {rates.eval_basis})"
    key, status = None, "to run"
    if trained.key is not None and trained.status.startswith("reused"):
        key, status = evaluation_status(cfg, trained.key)
    return Stage("evaluate", label, key, status, detail, hours)


def evaluation_status(cfg, train_key: str) -> tuple[str | None, str]:
    """The evaluation's key and status once its training exists (its reference is needed)."""
    from tasks.eval_inputs import preflight
    from tasks.evaluate import EvalJob
    from tasks.precompute import PrecomputeJob, PrecomputeResult

    try:
        preflight(cfg)
        pre_out = PrecomputeJob.of(cfg).out()
        pre = PrecomputeResult(pre_out.location, pre_out.name, False, [], 0, [])

        class Trained:
            key = train_key

        out = EvalJob.of(cfg, pre).out(Trained())
    except (FileNotFoundError, OSError, ValueError):
        return None, "to run"
    return out.name, reuse_status(cfg, out)


@dataclass
class Plan:
    title: str
    stages: list[Stage]
    rates: Rates | None
    store: str = ""  # where the outputs are (paths.artifacts, resolved): a directory or s3://

    def text(self) -> str:
        lines = [f"plan: {self.title} -- nothing started, nothing written"]
        if self.rates is not None:
            r = self.rates
            matmul = (
                f"; its measured bf16 matmul {r.matmul_tflops:.0f} TFLOP/s, "
                f"{100 * r.matmul_tflops / r.peak_tflops:.0f} % of it"
                if r.matmul_tflops
                else ""
            )
            lines.append(
                f"GPU-hours on one {r.gpu} = FLOPs / (MFU x {r.peak_tflops:g} TFLOP/s, the "
                f"{r.peak_basis} datasheet dense bf16 peak{matmul}); MFU = useful FLOPs / that "
                f"peak ({r.source})"
            )
        else:
            lines.append("GPU-hours: no GPU check on record (pass --gpu NAME or --mfu X)")
        for stage in ("precompute", "train", "evaluate"):
            rows = [s for s in self.stages if s.stage == stage]
            lines += ["", f"{stage}:"]
            for s in rows:
                hours = f"{s.gpu_hours:,.1f} GPU-h" if s.gpu_hours is not None else ""
                disk = f"{s.disk_bytes / 1e9:,.1f} GB" if s.disk_bytes else ""
                key = (s.key or "?")[:10]
                lines.append(
                    f"  {s.label:<22} {key:<10} {s.status:<20} {hours:>12} {disk:>9}  {s.detail}"
                )
                if s.memory:
                    lines.append(f"  {'':<22} {s.memory}")
        todo = [s for s in self.stages if s.status.startswith("to run")]
        reused = [s for s in self.stages if s.status.startswith("reused")]
        hours = sum(s.gpu_hours or 0.0 for s in todo)
        disk = sum(s.disk_bytes for s in todo)
        count = {st: sum(s.stage == st for s in todo) for st in ("precompute", "train", "evaluate")}
        lines += [
            "",
            f"to run: {count['precompute']} precompute, {count['train']} trainings, "
            f"{count['evaluate']} evaluations; reused: {len(reused)} stage outputs",
        ]
        if self.store:  # on object storage, the bytes a bucket's quota and bill count
            lines.append(
                f"store: {self.store}: {len(reused)} outputs already there, about "
                f"{disk / 1e9:,.1f} GB to write"
            )
        old = [s for s in self.stages if s.status.endswith("(stale)")]
        if old:
            lines.append(
                f"stale: {len(old)} made by another imf_core method version"
                + (" (--recompute-stale recomputes them)" if reused else "")
            )
        if self.rates is not None:
            lines.append(f"total: {hours:,.1f} GPU-hours, {disk / 1e9:,.1f} GB of new disk")
        return "\n".join(lines)


def plan_of(
    title: str,
    configs: dict[str, object],
    gpu: str = "",
    mfu: float = 0.0,
    images: int | None = None,
) -> Plan:
    """The plan of `configs` (label -> experiment config): shared stages listed once."""
    rates = None
    if gpu or mfu or any(GPU_CHECKS.glob("*.json")):
        rates = Rates.of(gpu or "h200", mfu)
    stages, seen = [], {}
    for label, cfg in configs.items():
        pre, pre_key, rows = precompute_stage(cfg, label, images)
        shared = seen.get(("precompute", pre_key, repr(pre.detail)))
        if shared is None:
            seen[("precompute", pre_key, repr(pre.detail))] = label
            stages.append(pre)
        trained = train_stage(cfg, label, pre_key, rows, rates)
        first = seen.get(("train", trained.key)) if trained.key else None
        if first is not None:  # another variant trains it (Tab. 1b reuses Tab. 1a's)
            trained.status, trained.gpu_hours, trained.disk_bytes = f"shared ({first})", None, 0
            trained.memory = ""
        elif trained.key:
            seen[("train", trained.key)] = label
        stages += [trained, evaluate_stage(cfg, label, trained, rates)]
    stores = sorted({Store.of(cfg.paths.artifacts).root for cfg in configs.values()})
    return Plan(title, stages, rates, ", ".join(stores))
