"""What a run or a sweep would do, before it does anything.

    imf run -e imagenet_b2 --plan [--gpu h200 | --mfu 0.4] [--images N]
    imf sweep table1a --scale paper --plan [--seeds 3] [--only mf,imf_aux]
    >>> print(plan_of(configs, gpu="h200").text())

For each stage of each configuration: its content key and whether its output is already there
(then it would be reused), the images each training sees and its FLOPs (counted by PyTorch on
the meta device: forward, guidance passes, JVP, backward), GPU-hours as FLOPs / (MFU x the
GPU's datasheet dense bf16 peak) at the MFU a GPU check measured (benchmarks/gpu/, `make
gpu-check`, restated as useful FLOPs over the datasheet peak) or an assumed one, and the disk for
latents and checkpoints. Nothing is started and nothing is written: no Prefect, Ray or MLflow, no
precompute, no artifact folder.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from imf_core.guidance import GuidanceConfig
from imf_core.models import build, count_params, preset
from imf_core.objectives import LossSpec, ObjectiveConfig, draw
from imf_core.peak_flops import DATASHEET_BF16_TFLOPS, datasheet_peak
from imf_core.peak_flops import mfu as model_flops_utilisation
from tasks.artifacts import Manifest, methods_of, stale
from tasks.train_loop import flops_per_image  # useful FLOPs per image, counted on the meta device

GPU_CHECKS = Path(str(importlib.resources.files("benchmarks"))) / "gpu"  # shipped (package data)
IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k's training set (what configs/data/ points at)
# The GPU check's model labels of the presets it measures.
CHECKED_PRESETS = {"imf_b2": "B/2", "imf_m2": "M/2", "imf_l2": "L/2", "imf_xl2": "XL/2"}
# The first H200 check counted every FLOP twice (fixed the same day, before the second run).
FLOPS_COUNTED_TWICE = frozenset({"2026-12-04-h200-run1.json"})


def done(out: Path) -> bool:
    """An output is there when its `_SUCCESS` stands and its files have their sizes."""
    manifest = Manifest.read(out)
    return manifest is not None and all(f.valid_in(out, "size") for f in manifest.files)


def reuse_status(cfg, out: Path | None) -> str:
    """A training's or evaluation's status: "reused", "to run", or, when another imf_core
    method version made it (tasks.artifacts.stale), "reused (stale)" or, with
    paths.recompute_stale, "to run (stale)"."""
    if out is None or not done(out):
        return "to run"
    if not stale(methods_of(out)):
        return "reused"
    return "to run (stale)" if cfg.paths.recompute_stale else "reused (stale)"


# ------------------------------------------------------------------ what a GPU gives
def zero_tangent_gemm_flops(model_cfg, objective: ObjectiveConfig, batch: int = 4) -> float:
    """FLOPs per image of the GEMMs by zero that torch.func.jvp runs in the JVP pass, as
    step_flops_per_image counted them until 2026-12-06: forward-mode AD of F.linear(x, W) with
    a tangent on x and the weight closed over multiplies x by W's zero tangent too, a GEMM the
    size of the forward's. A linear with a tangent on its input thus runs 3 GEMMs where a plain
    forward runs 1 (one without runs 1 in both), so the zero ones are half the difference
    between the JVP's GEMM FLOPs (mm, addmm) and a forward's, both of u on the rows with r != t,
    counted on the meta device at the counter's batch and draw (B/2 imf_aux: 23.45 GFLOP)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    if objective.name == "fm":
        return 0.0
    x = torch.zeros(batch, model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
    y = torch.zeros(batch, dtype=torch.long)
    draws = draw(x, y, LossSpec(objective, GuidanceConfig(), model_cfg.num_classes))
    rows = slice(draws.jvp_from, None)
    gemms = (torch.ops.aten.mm, torch.ops.aten.addmm)
    with torch.device("meta"), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        meta = build(model_cfg)
        cond = type(draws.cond)(*(c.to("meta") for c in draws.cond)).select(rows)
        z, r, t = (v[rows].to("meta") for v in (x, draws.r, draws.t))

        def u(z_, r_, t_):
            return meta(z_, t_, t_ - r_, cond)

        counted = []
        for run in (
            lambda: u(z, r, t),
            lambda: torch.func.jvp(u, (z, r, t), (z, torch.zeros_like(r), torch.ones_like(t))),
        ):
            with FlopCounterMode(display=False) as counter:
                run()
            counts = counter.get_flop_counts()["Global"]
            counted.append(sum(counts.get(op, 0) for op in gemms))
    forward, jvp = counted
    return (jvp - forward) / 2 / batch


def useful_flops_per_image(record_name: str, record: dict, entry: dict) -> float:
    """The useful FLOPs per image of a recorded step: its counted FLOPs, halved for a check that
    counted twice, less the GEMMs by zero tangents for a check that counted them."""
    counted = entry["gflop_per_image"] * 1e9 / (2 if record_name in FLOPS_COUNTED_TWICE else 1)
    # The GPU check writes "flops_counted": "useful" since issue 35; the checks of 2026-12-04
    # counted the GEMMs by zero tangents torch.func.jvp ran (zero_tangent_gemm_flops).
    if record.get("flops_counted") == "useful":
        return counted
    return counted - recorded_zero_gemms(entry["model"], entry["objective"])


@functools.cache
def recorded_zero_gemms(label: str, objective: str) -> float:
    """zero_tangent_gemm_flops of a GPU check's model label ("B/2") and objective, counted once
    (every `--plan` and every GPU run's validation reads the records)."""
    name = next(p for p, checked in CHECKED_PRESETS.items() if checked == label)
    return zero_tangent_gemm_flops(preset(name), ObjectiveConfig(name=objective))


def restated_mfu(record_name: str, record: dict, entry: dict) -> float:
    """A recorded step's MFU as the field counts it: useful FLOPs per second over the datasheet
    dense bf16 peak of the record's GPU. Checks before 2026-12-06 wrote MFU over their measured
    matmul rate and over counted FLOPs; this equals their `mfu` x measured matmul / datasheet
    peak x useful / counted (the B/2 imf_aux compiled step of 2026-12-04: 47.1 % -> 33.6 %)."""
    peak = datasheet_peak(record["machine"]["gpu"])
    if peak is None:
        raise LookupError(f"no datasheet peak for {record['machine']['gpu']}: no MFU to restate")
    useful = useful_flops_per_image(record_name, record, entry)
    return model_flops_utilisation(entry["images_per_s"] * useful, peak[1])


@dataclass
class Rates:
    """One GPU's measured rates (the newest GPU check of it), or an assumed MFU; MFU is always
    useful FLOPs over the GPU's datasheet dense bf16 peak (`peak_tflops`)."""

    gpu: str
    peak_tflops: float  # the datasheet dense bf16 peak: the MFU denominator
    source: str  # the record, or "assumed"
    mfu: dict[tuple[str, str], float] = field(default_factory=dict)  # (label, objective)
    eval_images_per_s: float = 0.0  # 1-NFE + SD-VAE decode + Inception, as evaluation runs
    generate_images_per_s: float = 0.0  # one B/2 network evaluation per image
    assumed_mfu: float = 0.0
    peak_basis: str = ""  # the datasheet's GPU name ("H200 SXM")
    matmul_tflops: float = 0.0  # the check's measured bf16 matmul rate (a second figure)
    eval_basis: str = "measured for B/2"
    memory_gib: float = 0.0  # the GPU's memory
    max_batch: dict[str, dict] = field(default_factory=dict)  # label -> the largest-batch search
    timed_oom: dict[str, int] = field(default_factory=dict)  # label -> a timed step's OOM batch

    @staticmethod
    def of(gpu: str, mfu: float = 0.0) -> Rates:
        """The newest benchmarks/gpu/*.json whose GPU name holds `gpu` (e.g. "h200")."""
        records = []
        for path in sorted(GPU_CHECKS.glob("*.json")):
            record = json.loads(path.read_text())
            name = record.get("machine", {}).get("gpu", "")
            if gpu.lower() in name.lower() and record.get("speed"):
                records.append((record["machine"]["date"], path, record))
        if not records:
            if mfu and datasheet_peak(gpu) is not None:
                return Rates.assumed(gpu, mfu)
            known = sorted(
                {json.loads(p.read_text())["machine"]["gpu"] for p in GPU_CHECKS.glob("*.json")}
            )
            names = ", ".join(key for key, _, _ in DATASHEET_BF16_TFLOPS)
            why = "" if datasheet_peak(gpu) else f"; no datasheet peak for {gpu!r}"
            raise LookupError(
                f"no GPU check of a {gpu!r} in {GPU_CHECKS} (checked: {known}){why}; for another "
                f"GPU give an assumed MFU: --gpu NAME --mfu X, NAME one of: {names}"
            )
        _, path, record = max(records, key=lambda r: r[0])
        peak = datasheet_peak(record["machine"]["gpu"])
        if peak is None:
            raise LookupError(f"no datasheet peak for {record['machine']['gpu']} ({path.name})")
        rates = Rates(
            record["machine"]["gpu"],
            peak[1],
            path.name,
            peak_basis=peak[0],
            matmul_tflops=record["machine"]["matmul"]["tflops"],
        )
        for e in record["speed"]["entries"]:
            if e.get("compile") == "step" and "images_per_s" in e:
                rates.mfu[(e["model"], e["objective"])] = restated_mfu(path.name, record, e)
        sampling = record.get("sampling", {}).get("fp32", {})
        rates.eval_images_per_s = sampling.get("all", 0.0)
        rates.generate_images_per_s = sampling.get("generate", 0.0)
        rates.assumed_mfu = mfu
        rates.memory_gib = record["machine"].get("gpu_memory_gib", 0.0)
        rates.max_batch = record.get("max_batch", {})
        for e in record["speed"]["entries"]:
            if e.get("error") == "out of memory":
                rates.timed_oom[e["model"]] = min(
                    e["batch"], rates.timed_oom.get(e["model"], e["batch"])
                )
        return rates

    @staticmethod
    def assumed(gpu: str, mfu: float) -> Rates:
        """A GPU with no check of its own: its datasheet peak at the assumed MFU; evaluation at
        the newest check's measured rate, scaled by the two peaks (an assumption too)."""
        measured = Rates.of("")
        label, peak = datasheet_peak(gpu)
        scale = peak / measured.peak_tflops
        return Rates(
            label,
            peak,
            f"assumed, no GPU check of it; evaluation: {measured.source} x {scale:.2f}",
            eval_images_per_s=measured.eval_images_per_s * scale,
            generate_images_per_s=measured.generate_images_per_s * scale,
            assumed_mfu=mfu,
            peak_basis=label,
            eval_basis=f"assumed: {measured.gpu}'s x {scale:.2f}",
        )

    def training_mfu(self, preset: str, objective: str) -> tuple[float, str]:
        """The MFU to cost a training with, and what it rests on."""
        if self.assumed_mfu:
            return self.assumed_mfu, f"assumed {100 * self.assumed_mfu:.0f} % MFU"
        label = CHECKED_PRESETS.get(preset, "B/2")
        for key, why in (
            ((label, objective), "measured"),
            ((label, "imf_aux"), f"measured for imf_aux at {label}"),
            (("B/2", "imf_aux"), "measured for B/2 imf_aux"),
        ):
            if key in self.mfu:
                return self.mfu[key], f"{why}, {100 * self.mfu[key]:.1f} % MFU"
        best = max(self.mfu.values())
        return best, f"best measured, {100 * best:.1f} % MFU"


# ------------------------------------------------------------------ what fits on a GPU
def checked_label(cfg) -> str | None:
    """The GPU check's label of the config's model: a preset it measures, unchanged."""
    from tasks.train import MODEL_RUNTIME_ONLY

    label = CHECKED_PRESETS.get(cfg.model.name)
    runtime = {k: getattr(preset(cfg.model.name), k) for k in MODEL_RUNTIME_ONLY} if label else {}
    if label and dataclasses.replace(cfg.model_config(), **runtime) == preset(cfg.model.name):
        return label
    return None


def largest_fitting(rates: Rates, label: str, adam_gib: float) -> tuple[int | None, dict, str]:
    """(the largest per-GPU batch of `label` that fit, {batch: peak GiB of a steady-state step},
    how the figures were taken). Checks before 2026-12-06 measured a first step, before AdamW's
    state: their peaks get that state added, and a timed step's out-of-memory caps the batch."""
    search = rates.max_batch[label]
    probes = {int(b): gib for b, gib in search["probes"].items() if gib != "oom"}
    largest = search["largest_fitting"]
    if search.get("after_optimizer_step"):
        return largest, probes, "a steady-state step"
    probes = {b: gib + adam_gib for b, gib in probes.items()}
    how = f"a first step + {adam_gib:.1f} GiB of AdamW state"
    oom = rates.timed_oom.get(label)
    if oom is not None and largest is not None and largest >= oom:
        largest = max((b for b in probes if b < oom), default=None)
        how += f"; a timed step ran out of memory at {oom}"
    return largest, probes, how


def expected_gib(probes: dict[int, float], batch: int) -> float:
    """Peak memory at `batch`, linear through the two nearest probes (memory is the weights'
    and optimizer's share plus the activations' share, proportional to the batch)."""
    points = sorted(probes, key=lambda b: (abs(b - batch), b))[:2]
    if len(points) == 1:
        return probes[points[0]] * batch / points[0]
    (b0, b1) = sorted(points)
    return probes[b0] + (probes[b1] - probes[b0]) * (batch - b0) / (b1 - b0)


def per_gpu_memory(cfg, rates: Rates | None) -> str:
    """What a GPU training holds per GPU, from the GPU check's largest-batch search ("" without
    train.use_gpu). Refuses (ConfigError) a per-GPU batch over the largest that fit there."""
    import torch

    from tasks.config import ConfigError

    t = cfg.train
    if not t.use_gpu:
        return ""
    per_worker = t.batch_size // t.num_workers
    batch = min(t.micro_batch or per_worker, per_worker)
    steps = f" (train.micro_batch: {per_worker // batch} micro-steps)" if batch < per_worker else ""
    line = f"per GPU: batch {batch}{steps}"
    label = checked_label(cfg)
    if rates is None or not rates.max_batch:
        return f"{line}; no GPU check on record to check its memory against"
    if label not in rates.max_batch:
        what = label or f"{cfg.model.name} as configured"
        return f"{line}; the GPU check ({rates.source}) has no figure for {what}"
    with torch.device("meta"):
        adam_gib = 8 * count_params(build(cfg.model_config()), inference=False) / 2**30
    largest, probes, how = largest_fitting(rates, label, adam_gib)
    where = f"the {rates.gpu} ({rates.source}; imf_aux, eager, bf16, {how})"
    if largest is None or batch > largest:
        fits = [d for d in range(1, per_worker + 1) if per_worker % d == 0 and d <= (largest or 0)]
        hint = f"set train.micro_batch={fits[-1]}" if fits else "no batch fit there"
        raise ConfigError(
            f"per-GPU batch {batch} of {label} is over the {largest or 0} that fit on {where}: "
            f"{hint}"
        )
    gib = expected_gib(probes, batch)
    return f"{line}, ~{gib:.0f} GiB of {rates.memory_gib:.0f}: {largest} fit on {where}"


def check_gpu_memory(configs, gpu: str = "") -> None:
    """per_gpu_memory's refusal for configs about to run, against the newest GPU check of `gpu`
    (default h200), without a plan: for the validation a command runs before it starts."""
    gpu_configs = [cfg for cfg in configs if cfg.train.use_gpu]
    if not gpu_configs:
        return
    try:
        rates = Rates.of(gpu or "h200")
    except LookupError:
        if gpu:
            raise
        return  # no GPU check on record: nothing to check against (the plan says so)
    for cfg in gpu_configs:
        per_gpu_memory(cfg, rates)


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
    out = Path(cfg.paths.artifacts).resolve() / "train" / key if key else None
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
        pre_path = PrecomputeJob.of(cfg).out()
        pre = PrecomputeResult(pre_path, pre_path.name, False, [], 0, [])

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
    return Plan(title, stages, rates)
