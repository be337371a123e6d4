"""What a GPU gives a training or an evaluation, from its GPU checks (benchmarks/gpu/).

    >>> Rates.of("h200").training_mfu("imf_b2", "imf_aux")
    >>> Rates.of("a100", mfu=0.35)  # no check of it: its datasheet peak at an assumed MFU

The newest check of a GPU gives its measured rates; an MFU is always useful FLOPs over the GPU's
datasheet dense bf16 peak, and restated so for checks that counted otherwise (restated_mfu). The
plan (flows.plan) costs GPU-hours with them; flows.gpu_memory checks a per-GPU batch against them.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path

from imf_core.guidance import GuidanceConfig
from imf_core.models import build, preset
from imf_core.objectives import LossSpec, ObjectiveConfig, draw
from imf_core.peak_flops import DATASHEET_BF16_TFLOPS, datasheet_peak
from imf_core.peak_flops import mfu as model_flops_utilisation

GPU_CHECKS = Path(str(importlib.resources.files("benchmarks"))) / "gpu"  # shipped (package data)
# The GPU check's model labels of the presets it measures.
CHECKED_PRESETS = {"imf_b2": "B/2", "imf_m2": "M/2", "imf_l2": "L/2", "imf_xl2": "XL/2"}
# The first H200 check counted every FLOP twice (fixed the same day, before the second run).
FLOPS_COUNTED_TWICE = frozenset({"2026-12-04-h200-run1.json"})


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
