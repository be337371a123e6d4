"""The GPU check: one prepared call that measures what a GPU gives this project (`make gpu-check`).

    python3 -m benchmarks.gpu_check [--out DIR] [--budget-s 540] [--parts PART ...] [--toy]
                                    [--compile-cache FILE]

Made for a GPU machine that has torch (>= 2.11) and Triton but none of the pipeline's other
packages and no network: it imports torch, imf_core, benchmarks.{step_time, sampling,
random_weights} and, where installed, two wheels copied along with the repository (a part
whose package is missing says so and the others run):

    diffusers==0.42.1             the SD-VAE decoder (AutoencoderKL, ft-mse architecture)
    torch_fidelity==0.4.0         InceptionV3, as the evaluation uses it
    importlib_metadata            a requirement of diffusers

Fetched where there is network, installed there without it (`make gpu-wheels` fetches them
into .whl/; `make gpu-check` and `make gpu-check-xl2` install them, then run the two calls):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl \\
        diffusers==0.42.1 torch_fidelity==0.4.0 importlib_metadata
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 -m benchmarks.gpu_check --out "$OUT"          # call 1, <= 540 s
    PYTHONPATH=/tmp/site python3 -m benchmarks.gpu_check --out "$OUT" --parts xl2 \\
        --compile-cache "$OUT/compile_cache.bin"                                 # call 2, <= 540 s

Parts, in this order, so that a call cut off still reports the first ones. After each part the
report is written again: DIR/gpu_check.md (a section for benchmarks/RESULTS.md) and
DIR/gpu_check.json; the compiler's cache artifacts go to DIR/compile_cache.bin
(torch.compiler.save_cache_artifacts), which `--compile-cache` loads first in a later call.

  machine     GPU, driver, torch, Triton; the datasheet dense bf16 peak of the GPU
              (imf_core.peak_flops, the MFU denominator) and the measured 8192^3 matmul rate
  gemm        the GEMMs of B/2's linears (qkv, proj, SwiGLU) at batch 256 x 276 tokens, bf16:
              forward and both backward products, TFLOP/s
  attention   SDPA backends (flash, efficient, cudnn, math) forward + backward at 276 and 256
              tokens, against float64 (the fastest is what train.sdpa_backend should name); the
              JVP attention options (math, eager and compiled; fused) against a float64 (out,
              d_out) written out here
  imf_aux     compiled B/2 imf_aux + omega-interval CFG at batch 256: step time, MFU,
              steady-state peak memory (steps >= 3, AdamW's state made), a torch.profiler kernel
              table (top kernels; GEMM / attention / element-wise / idle shares), and the GEMMs
              per linear of the compiled JVP pass (2 when no tangent of a weight is multiplied)
  objectives  compiled B/2 fm and imf_boundary in the same process: the imf_boundary / fm ratio
  precision   30 steps of B/2 imf_aux in bf16 against fp32, the same randomised init and draws
  decode      the evaluation's path: 1-NFE generation + SD-VAE decode + InceptionV3 features,
              images/s, before (fp32 NCHW) and now (imf_core.decoding: bf16 channels-last),
              eager and compiled (whether imf_core.decoding.COMPILE_ON_CUDA should be on)
  xl2         (call 2 only) XL/2: the largest batch of a steady-state step, then compiled
              imf_aux at it (~5-6 min of compile: the first call's cache helps), MFU; and B/2's
              largest batch with the time left (what --plan checks micro-batches against)

Everything keeps to --budget-s: a measurement that would not fit in what is left (less what the
later, cheap parts need) is listed as skipped, with its estimate. A compile's estimate is per
objective (COMPILE_GUESS_S), scaled by how this call's measured compiles compare with the guesses.
A call with only `xl2` adds its part to the report already in DIR when that was made on the same
GPU. Without CUDA (or with --toy) the same code runs at toy sizes on the CPU in about a minute,
compiling with the aot_eager backend (one small inductor compile, for the cache file); a CI test
keeps it working.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.sampling import sampling_rates
from benchmarks.step_time import StepTimer
from imf_core.decoding import DecodeOptions, LatentDecoder
from imf_core.guidance import GuidanceConfig
from imf_core.models import count_params, create
from imf_core.models.layers import math_attention_jvp
from imf_core.objectives import DrawKey, LossSpec, ObjectiveConfig, draw
from imf_core.peak_flops import datasheet_peak
from imf_core.sdpa import SDPA_BACKENDS
from imf_core.training import step_flops_per_image

try:  # the fused forward + tangent attention (another change of issue 35 brings it)
    from imf_core.models.fused_attention import FUSED_ATTENTION_AVAILABLE, fused_attention_jvp
except ImportError:
    FUSED_ATTENTION_AVAILABLE, fused_attention_jvp = False, None

PARTS = ("machine", "gemm", "attention", "imf_aux", "objectives", "precision", "decode", "xl2")
FIRST_CALL = PARTS[:-1]  # `make gpu-check`; xl2 is the second call (`make gpu-check-xl2`)
# Seconds kept for the cheap parts after the compiling ones, so that a slow compile cannot
# starve them (GPU; toy). What they do not use goes to whatever runs after them.
RESERVE_S = {"precision": (30.0, 3.0), "decode": (45.0, 5.0)}
# First-step seconds of a compiled step (train.compile=step) per (model, objective) on an H200:
# B/2 imf_aux 136 and fm 49 (2026-12-04); imf_boundary and mf were never compiled there, and XL/2
# imf_aux takes ~5-6 min (issue 35): guesses. Scaled by this call's measured / guessed ratio.
COMPILE_GUESS_S = {
    ("B/2", "imf_aux"): 140.0,
    ("B/2", "fm"): 50.0,
    ("B/2", "imf_boundary"): 100.0,
    ("B/2", "mf"): 100.0,
    ("XL/2", "imf_aux"): 330.0,
}
SD_VAE_SCALE = 0.18215  # the SD-VAE's scaling factor (what the latents were multiplied by)


@dataclass
class Sizes:
    """The shapes of each measurement: the paper's on a GPU, toy ones on the CPU."""

    models: dict[str, tuple[str, dict]]  # label -> (preset, overrides)
    small: dict  # overrides of B/2 for the GEMM count of the JVP pass (its widths, one block)
    batch: int  # per-GPU training batch
    attention_batch: int
    heads: int
    head_dim: int
    tokens: tuple[int, ...]  # sequence lengths for the attention check (the model's first)
    matmul: int
    count_batch: int  # batch of the JVP pass whose GEMMs are counted
    precision_batch: int
    precision_steps: int
    timed_steps: int
    sample_batch: int
    batch_limits: dict[str, int]  # label -> upper bound of the batch search
    dtypes: tuple[torch.dtype, ...]  # of the attention check

    @staticmethod
    def of(toy: bool) -> Sizes:
        if toy:
            # Latent-shaped like the paper's (4 channels; the toy VAE decodes them), 8x8.
            small = dict(depth=1, aux_head_depth=1, width=32, heads=2, in_channels=4)
            return Sizes(
                models={
                    "B/2": ("tiny", small),
                    "XL/2": ("tiny", small | dict(depth=2, width=64, heads=4)),
                },
                small=small,
                batch=32,
                attention_batch=2,
                heads=2,
                head_dim=16,
                tokens=(22,),
                matmul=512,
                count_batch=4,
                precision_batch=8,
                precision_steps=3,
                timed_steps=2,
                sample_batch=4,
                batch_limits={"B/2": 64, "XL/2": 64},
                dtypes=(torch.float32,),
            )
        return Sizes(
            models={"B/2": ("imf_b2", {}), "XL/2": ("imf_xl2", {})},
            small=dict(depth=1, aux_head_depth=1),  # one u-head block, one v-head block
            batch=256,
            attention_batch=64,
            heads=12,
            head_dim=64,
            tokens=(276, 256),  # B/2's 256 patch tokens + 20 condition tokens; patches alone
            matmul=8192,
            count_batch=8,
            precision_batch=32,
            precision_steps=30,
            timed_steps=5,
            sample_batch=256,
            batch_limits={"B/2": 2048, "XL/2": 1024},
            dtypes=(torch.bfloat16, torch.float32),
        )


@dataclass
class Check:
    """The call: its budget, what it measured, what it skipped; written out after every part."""

    out: Path
    budget_s: float
    toy: bool
    device: torch.device
    started: float = field(default_factory=time.perf_counter)
    reserve_s: float = 0.0  # kept for the parts after the running one (RESERVE_S)
    part: str = ""
    results: dict = field(default_factory=dict)
    sections: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    compile_s: dict[tuple[str, str], float] = field(default_factory=dict)  # measured

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def fits(self, what: str, estimate_s: float) -> bool:
        """Whether `what` fits in what is left of the budget, less the later parts' reserve; if
        not, it is listed as skipped with its estimate."""
        if self.left() - self.reserve_s >= estimate_s:
            return True
        self.skipped.append(
            f"{self.part}: {what} (needs ~{estimate_s:.0f} s, {max(self.left(), 0):.0f} s left"
            + (f", {self.reserve_s:.0f} s of it kept for later parts)" if self.reserve_s else ")")
        )
        return False

    def compile_estimate(self, label: str, objective: str) -> float:
        """A compile's seconds: its guess, times this call's measured / guessed so far."""
        if self.toy:
            return 10.0
        guess = COMPILE_GUESS_S.get((label, objective), 140.0)
        ratios = [s / COMPILE_GUESS_S[key] for key, s in self.compile_s.items()]
        return guess * (statistics.mean(ratios) if ratios else 1.0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def peak(self) -> tuple[str, float] | None:
        """The datasheet peak of this GPU, or None (a CPU, a GPU not in the table)."""
        if self.device.type != "cuda":
            return None
        return datasheet_peak(torch.cuda.get_device_name(self.device))

    def save_compile_cache(self) -> None:
        """The compiler's cache artifacts of this process so far, for a later call to load."""
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return
        blob, info = artifacts
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "compile_cache.bin").write_bytes(blob)
        self.results["compile_cache"] = {
            "file": "compile_cache.bin",
            "bytes": len(blob),
            "artifacts": {kind: len(keys) for kind, keys in info.artifacts.items()},
        }

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.save_compile_cache()
        elapsed = round(time.perf_counter() - self.started, 1)
        self.results["calls"][-1] |= {"elapsed_s": elapsed, "skipped": self.skipped}
        self.results.setdefault("report_log", []).append([self.part, elapsed])
        self.results["elapsed_s"] = elapsed
        self.results["skipped"] = [s for call in self.results["calls"] for s in call["skipped"]]
        measured = {f"{label} {objective}": s for (label, objective), s in self.compile_s.items()}
        self.results.setdefault("compile_s", {}).update(measured)
        self.results["markdown"] = self.sections
        # FLOPs per image are step_flops_per_image's useful ones (no GEMM by a zero tangent):
        # flows.gpu_rates restates the records that counted those (2026-12-04) and trusts this
        # field.
        self.results["flops_counted"] = "useful"
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1))
        machine = self.results.get("machine", {})
        calls = "; ".join(
            f"{', '.join(c['parts'])}: {c.get('elapsed_s', 0):.0f} s of {c['budget_s']:.0f} s"
            for c in self.results["calls"]
        )
        head = [
            f"## GPU check: {machine.get('gpu', '?')}, {machine.get('date', '?')}",
            "",
            f"`python3 -m benchmarks.gpu_check` (`make gpu-check`, `make gpu-check-xl2`): {calls}"
            + (", toy sizes on the CPU" if self.toy else ""),
            "",
        ]
        body = [line for part in PARTS for line in self.sections.get(part, [])]
        skipped = self.results["skipped"]
        tail = ["### Skipped", "", *(f"- {s}" for s in skipped), ""] if skipped else []
        (self.out / "gpu_check.md").write_text("\n".join(head + body + tail))

    def resume(self, gpu: str) -> bool:
        """Takes up the report already in `out` if it was made on this GPU (a second call)."""
        path = self.out / "gpu_check.json"
        if not path.is_file():
            return False
        earlier = json.loads(path.read_text())
        if earlier.get("machine", {}).get("gpu") != gpu or "calls" not in earlier:
            return False
        self.results = earlier
        self.sections = earlier.get("markdown", {})
        return True


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # compiled graphs hold their models; each model compiles anew anyway


def rel(a: Tensor, b: Tensor) -> float:
    """Relative Frobenius distance of a from the reference b."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def timed(check: Check, fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of fn over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        check.sync()
        start = time.perf_counter()
        fn()
        check.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def perturbed(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Random weights everywhere: a fresh model's zero-initialised output layers make u = 0."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def table(header: list[str], rows: list[list]) -> list[str]:
    def cell(c: object) -> str:  # error messages span lines; a table row cannot
        return " ".join(str(c).split()).replace("|", "/")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]


#################################################################################
#                           The machine and its rates                           #
#################################################################################


def machine(check: Check, sizes: Sizes) -> None:
    info: dict = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(smi, capture_output=True, text=True).stdout.strip()
        except OSError:
            info["driver"] = None
        dtype = torch.bfloat16
    else:
        info |= {"gpu": machine_name_of(check)}
        dtype = torch.float32
    peak = check.peak()
    info["peak"] = (
        {"name": peak[0], "tflops": peak[1], "basis": "datasheet dense bf16"} if peak else None
    )
    n = sizes.matmul
    gen = torch.Generator(device=check.device).manual_seed(0)
    a = torch.randn(n, n, device=check.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=check.device, dtype=dtype, generator=gen)
    seconds = timed(check, lambda: a @ b, 10)
    # Four significant figures, not one decimal: a toy-size matmul on a loaded CPU ran under
    # 0.05 TFLOP/s, which one decimal wrote as 0.0.
    tflops = float(f"{2 * n**3 / seconds / 1e12:.4g}")
    info["matmul"] = {"n": n, "dtype": str(dtype), "tflops": tflops}
    check.results["machine"] = info
    peak_line = (
        f"- datasheet dense bf16 peak ({peak[0]}): **{peak[1]:g} TFLOP/s**, the MFU denominator"
        if peak
        else f"- {no_peak(check)}: MFU is not stated, only the share of the measured matmul rate"
    )
    check.sections["machine"] = [
        f"- {info['gpu']}"
        + (
            f" ({info['gpu_memory_gib']} GiB, {info['sms']} SMs, sm_{info['capability']}), "
            f"driver {info['driver']}, CUDA {info['cuda']}"
            if check.device.type == "cuda"
            else ""
        ),
        f"- torch {info['torch']}, Triton {info['triton']}, Python {info['python']}, "
        f"{info['cpu_cores']} CPU cores",
        peak_line,
        f"- matmul {n}^3 {info['matmul']['dtype']} (random data): {tflops} TFLOP/s"
        + (f", {100 * tflops / peak[1]:.0f} % of the peak" if peak else "")
        + "; the second MFU column is the share of this rate",
        "",
    ]


def no_peak(check: Check) -> str:
    name = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "a CPU"
    return f"n/a (no datasheet peak for {name})"


def rates(check: Check, flops_per_s: float) -> dict:
    """What a rate of useful FLOPs is worth: TFLOP/s, MFU over the datasheet peak (None without
    one), and its share of the measured matmul rate."""
    peak = check.results["machine"]["peak"]
    matmul = check.results["machine"]["matmul"]["tflops"]
    tflops = flops_per_s / 1e12
    return {
        "tflops": float(f"{tflops:.4g}"),
        # three significant digits: a slow toy step on a loaded CPU is not 0.000
        "mfu": float(f"{tflops / peak['tflops']:.3g}") if peak else None,
        "mfu_basis": "datasheet dense bf16 peak",
        "of_matmul": float(f"{tflops / matmul:.3g}"),
    }


def percent(value: float | None, check: Check) -> str:
    return no_peak(check) if value is None else f"{100 * value:.1f} %"


#################################################################################
#                            GEMMs at the model's shapes                        #
#################################################################################


def linear_shapes(sizes: Sizes, label: str = "B/2") -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of a block of the model (advanced blocks: SwiGLU)."""
    preset, overrides = sizes.models[label]
    cfg = create(preset, device="meta", **overrides).cfg
    hidden = int(cfg.width * cfg.ratio)
    return {
        "qkv": (cfg.width, 3 * cfg.width),
        "proj": (cfg.width, cfg.width),
        "mlp w1 / w3": (cfg.width, hidden),
        "mlp w2": (hidden, cfg.width),
    }


def gemm(check: Check, sizes: Sizes) -> None:
    """Each linear's three products at batch x tokens rows (M): forward Y = X W^T (M x out x in),
    the input's gradient dX = dY W (M x in x out) and the weight's dW = dY^T X (out x in x M)."""
    if not check.fits("GEMMs", 5 if check.toy else 15):
        return
    dtype = torch.bfloat16 if check.device.type == "cuda" else torch.float32
    rows = sizes.batch * sizes.tokens[0]
    gen = torch.Generator(device=check.device).manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, device=check.device, dtype=dtype, generator=gen)

    entries, lines = [], []
    for name, (fan_in, fan_out) in linear_shapes(sizes).items():
        x, w, dy = randn(rows, fan_in), randn(fan_out, fan_in), randn(rows, fan_out)
        products = {
            "forward": (lambda x=x, w=w: x @ w.T, (rows, fan_out, fan_in)),
            "grad input": (lambda dy=dy, w=w: dy @ w, (rows, fan_in, fan_out)),
            "grad weight": (lambda dy=dy, x=x: dy.T @ x, (fan_out, fan_in, rows)),
        }
        for product, (fn, (m, n, k)) in products.items():
            seconds = timed(check, fn, 10)
            entry = {"linear": name, "product": product, "mnk": [m, n, k]}
            entry |= {"ms": round(1e3 * seconds, 3)} | rates(check, 2 * m * n * k / seconds)
            entries.append(entry)
            lines.append(
                [name, product, f"{m} x {n} x {k}", entry["ms"], entry["tflops"]]
                + [percent(entry["mfu"], check), f"{100 * entry['of_matmul']:.0f} %"]
            )
        del x, w, dy
    check.results["gemm"] = {"rows": rows, "dtype": str(dtype), "entries": entries}
    check.sections["gemm"] = [
        f"### GEMMs of B/2's linears ({str(dtype).removeprefix('torch.')}, batch {sizes.batch} x "
        f"{sizes.tokens[0]} tokens = {rows} rows)",
        "",
        *table(["linear", "product", "M x N x K", "ms", "TFLOP/s", "of peak", "of matmul"], lines),
    ]


#################################################################################
#                                   Attention                                   #
#################################################################################

# Relative tolerances against float64: float32 kernels with TF32 matmuls inside, bf16 storage.
ATTENTION_TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def attention_reference(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor):
    """(out, d_out) of softmax(q k^T / sqrt(K)) v and its tangent along (dq, dk, dv), in float64,
    written out: S = q k^T / sqrt(K), P = softmax(S), out = P v; dS = (dq k^T + q dk^T) / sqrt(K),
    dP = P * (dS - rowsum(P * dS)), d_out = dP v + P dv."""
    q, k, v, dq, dk, dv = (x.double() for x in (q, k, v, dq, dk, dv))
    scale = q.shape[-1] ** -0.5
    p = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, H, T, T)
    ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale
    dp = p * (ds - (p * ds).sum(dim=-1, keepdim=True))
    return p @ v, dp @ v + p @ dv


def attention(check: Check, sizes: Sizes) -> None:
    """The plain passes' SDPA backends, forward + backward, and the JVP pass's attention options
    (values and tangents), each against float64."""
    sdpa_rows, jvp_rows, sdpa_entries, jvp_entries = [], [], [], []
    for tokens in sizes.tokens:
        if not check.fits(f"attention at {tokens} tokens", 5 if check.toy else 20):
            continue
        shape = (sizes.attention_batch, sizes.heads, tokens, sizes.head_dim)
        gen = torch.Generator(device=check.device).manual_seed(tokens)
        primals = [torch.randn(shape, device=check.device, generator=gen) for _ in range(3)]
        tangents = [torch.randn(shape, device=check.device, generator=gen) for _ in range(3)]
        ref_out, ref_tan = attention_reference(*primals, *tangents)
        for entry in sdpa_backends(check, primals, ref_out):
            sdpa_entries.append(entry := {"tokens": tokens} | entry)
            sdpa_rows.append(
                [entry["backend"], tokens, entry.get("dtype", "-")]
                + [f"{entry['out_rel_err']:.1e}" if "out_rel_err" in entry else "-"]
                + [entry.get("forward_ms", "-"), entry.get("forward_backward_ms", "-")]
                + [entry.get("tflops", "-"), ok_text(entry)]
            )
        for dtype in sizes.dtypes:
            args = tuple(x.to(dtype) for x in primals + tangents)
            for entry in jvp_options(check, sizes, tokens, args, ref_out, ref_tan):
                jvp_entries.append(entry := {"tokens": tokens, "dtype": str(dtype)} | entry)
                jvp_rows.append(
                    [entry["impl"], entry["mode"], tokens, str(dtype).removeprefix("torch.")]
                    + [f"{entry.get(k, float('nan')):.1e}" for k in ("out_rel_err", "tan_rel_err")]
                    + [entry.get("ms", "-"), ok_text(entry)]
                )
        del primals, tangents, ref_out, ref_tan
        free_memory()
    model_tokens = [e for e in sdpa_entries if e["tokens"] == sizes.tokens[0] and e["ok"]]
    fastest = min(model_tokens, key=lambda e: e["forward_backward_ms"], default=None)
    auto = next((e for e in model_tokens if e["backend"] == "auto"), None)
    choice = fastest["backend"] if fastest else None
    check.results["attention"] = {
        "shape": [sizes.attention_batch, sizes.heads, list(sizes.tokens), sizes.head_dim],
        "tolerance": {str(k): v for k, v in ATTENTION_TOL.items()},
        "sdpa": sdpa_entries,
        "sdpa_fastest": choice,  # what train.sdpa_backend should name
        "fused_available": FUSED_ATTENTION_AVAILABLE,
        "jvp": jvp_entries,
    }
    advice = "no backend ran"
    if fastest and auto:
        gain = auto["forward_backward_ms"] / fastest["forward_backward_ms"]
        advice = (
            f"fastest at {sizes.tokens[0]} tokens: **{choice}**, x{gain:.2f} PyTorch's own choice"
            + (f": set `train.sdpa_backend={choice}`" if choice != "auto" and gain > 1.03 else "")
        )
    check.sections["attention"] = [
        f"### SDPA backends of the plain passes (batch {sizes.attention_batch}, {sizes.heads} "
        f"heads, head dim {sizes.head_dim}), forward + backward",
        "",
        "Each backend alone (`sdpa_kernel`), its output against float64; TFLOP/s of forward + "
        f"backward (4 B H T^2 K x 3.5). {advice}.",
        "",
        *table(
            ["backend", "tokens", "dtype", "out err", "fwd ms", "fwd+bwd ms", "TFLOP/s", "ok"],
            sdpa_rows,
        ),
        "### JVP attention against float64 (out, d_out)",
        "",
        "The JVP pass's options: math (torch.func.jvp of written-out attention; eager and "
        "compiled), fused (imf_core.models.fused_attention"
        + ("" if FUSED_ATTENTION_AVAILABLE else ": not available here")
        + "). Relative errors of the output and its tangent; tolerance "
        + ", ".join(f"{str(k).removeprefix('torch.')} {v:g}" for k, v in ATTENTION_TOL.items())
        + ".",
        "",
        *table(["impl", "mode", "tokens", "dtype", "out err", "tangent err", "ms", "ok"], jvp_rows),
    ]


def ok_text(entry: dict) -> str:
    return "yes" if entry["ok"] else entry.get("error", "**no**")[:80]


def sdpa_backends(check: Check, primals: list[Tensor], ref_out: Tensor) -> list[dict]:
    """Forward, and forward + backward, of F.scaled_dot_product_attention under each backend
    alone, and under PyTorch's own choice ("auto"), in the training's dtype."""
    from torch.nn.attention import sdpa_kernel

    dtype = torch.bfloat16 if check.device.type == "cuda" else torch.float32
    q, k, v = (x.to(dtype).requires_grad_() for x in primals)
    grad = torch.randn_like(q)
    b, h, t, d = q.shape
    flops = 4 * b * h * t * t * d * 3.5  # the backward ~2.5x the forward (flash's count)
    entries = []
    for name in ("auto", *SDPA_BACKENDS):
        entry: dict = {"backend": name, "dtype": str(dtype).removeprefix("torch.")}
        backends = SDPA_BACKENDS[name] if name != "auto" else list(SDPA_BACKENDS.values())

        def forward(backends=backends) -> Tensor:
            with sdpa_kernel(backends):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        try:
            out = forward()
            entry["out_rel_err"] = rel(out, ref_out)
            with torch.no_grad():
                entry["forward_ms"] = round(1e3 * timed(check, forward, 10), 3)
            seconds = timed(check, lambda: forward().backward(grad), 10)
            entry["forward_backward_ms"] = round(1e3 * seconds, 3)
            entry |= rates(check, flops / seconds)
            entry["ok"] = entry["out_rel_err"] < ATTENTION_TOL[dtype]
        except Exception as err:  # no such kernel here, or not for these inputs
            entry |= {"error": f"not available: {err}"[:300], "ok": False}
        entries.append(entry)
    return entries


def jvp_options(
    check: Check, sizes: Sizes, tokens: int, args: tuple[Tensor, ...], ref_out, ref_tan
) -> list[dict]:
    """Values and tangents of each JVP attention option, and their time."""

    options: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"math": math_attention_jvp}
    if FUSED_ATTENTION_AVAILABLE:
        options["fused"] = fused_attention_jvp
    entries = []
    for name, fn in options.items():
        # compiled at the model's length: math is the JVP pass's attention in a compiled step;
        # fused is a custom op that must survive torch.compile with its tangent (PITFALLS.md).
        # The toy compiles with inductor too: its graph is small, and it gives the cache file.
        modes = ("eager", "compiled") if tokens == sizes.tokens[0] else ("eager",)
        for mode in modes:
            if not check.fits(f"JVP attention {name} {mode} T={tokens}", 5 if check.toy else 20):
                continue
            run = torch.compile(fn, fullgraph=True, dynamic=False) if mode == "compiled" else fn
            entry: dict = {"impl": name, "mode": mode}
            try:
                start = time.perf_counter()
                out, tan = run(*args)
                check.sync()
                if mode == "compiled":
                    entry["compile_s"] = round(time.perf_counter() - start, 1)
                entry |= {"out_rel_err": rel(out, ref_out), "tan_rel_err": rel(tan, ref_tan)}
                entry["ms"] = round(1e3 * timed(check, lambda run=run: run(*args), 10), 3)
                tol = ATTENTION_TOL[args[0].dtype]
                entry["ok"] = max(entry["out_rel_err"], entry["tan_rel_err"]) < tol
            except Exception as err:  # a kernel that refuses these shapes: reported
                entry |= {"error": error_text(err), "ok": False}
            entries.append(entry)
    return entries


#################################################################################
#                               Compiled steps                                  #
#################################################################################


def flops_per_image(sizes: Sizes, label: str, objective: str) -> float:
    """Useful FLOPs of one step per image (training.step_flops_per_image), counted on the meta
    device: no memory, ~3-8 s."""
    preset, overrides = sizes.models[label]
    return preset_flops_per_image(preset, tuple(sorted(overrides.items())), objective)


@functools.cache
def preset_flops_per_image(preset: str, overrides: tuple, objective: str) -> float:
    meta = create(preset, device="meta", **dict(overrides))
    guidance = GuidanceConfig(mode="omega_interval")
    spec = LossSpec(ObjectiveConfig(name=objective), guidance, meta.cfg.num_classes)
    return step_flops_per_image(meta, spec)


def compiled_steps(
    check: Check, sizes: Sizes, label: str, objectives: tuple[str, ...], batch: int
) -> list[dict]:
    """Times a compiled step (train.compile=step, bf16 on a GPU) of each objective on one model:
    the first step (compiling, its seconds recorded per objective), a second one (AdamW's state
    made), then sizes.timed_steps timed steps, whose peak memory is the steady state's."""
    preset, overrides = sizes.models[label]
    bf16 = check.device.type == "cuda"
    backend = "aot_eager" if check.toy else "inductor"
    entries = []
    for objective in objectives:
        step_guess = 0.1 if check.toy else (0.5 if label == "B/2" else 2.0) * batch / 256
        estimate = check.compile_estimate(label, objective) + (sizes.timed_steps + 3) * step_guess
        if not check.fits(f"compiled {label} {objective} at batch {batch}", estimate):
            continue
        torch.manual_seed(0)
        model = create(preset, device=check.device, **overrides)
        entry: dict = {"model": label, "batch": batch, "objective": objective, "compile": "step"}
        entry["jvp_attention"] = model.cfg.jvp_attention
        try:
            timer = StepTimer(model, batch, "omega_interval", "step", bf16, backend)
            start = time.perf_counter()
            timer.step(objective)
            check.sync()
            entry["first_step_s"] = round(time.perf_counter() - start, 1)
            check.compile_s[(label, objective)] = entry["first_step_s"]
            timer.step(objective)  # AdamW's state now exists: the steps after are steady
            if check.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(check, lambda o=objective, t=timer: t.step(o), sizes.timed_steps)
            flops = flops_per_image(sizes, label, objective)
            entry |= {
                "step_ms": round(1e3 * seconds, 1),
                "images_per_s": round(batch / seconds, 1),
                "flops_per_image": flops,
                "gflop_per_image": float(f"{flops / 1e9:.4g}"),
            } | rates(check, flops * batch / seconds)
            if check.device.type == "cuda":
                entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
                entry["params"] = count_params(model, inference=False)
            entry["timer"] = timer  # (taken out before the report is written)
        except torch.OutOfMemoryError:
            entry["error"] = "out of memory"
        except Exception as err:
            entry["error"] = error_text(err)
        entries.append(entry)
    return entries


def speed_entry(check: Check, entry: dict) -> None:
    """Adds a step entry to the report's speed table (what flows.gpu_rates reads) and writes the
    report: a call cut off in its next compile keeps it."""
    entry = {k: v for k, v in entry.items() if k != "timer"}
    check.results.setdefault("speed", {"entries": []})["entries"].append(entry)
    rows = []
    speed = check.results["speed"]["entries"]
    fm = {(e["model"], e["batch"]): e.get("step_ms") for e in speed if e["objective"] == "fm"}
    for e in speed:
        base = fm.get((e["model"], e["batch"]))
        ratio = f"{e['step_ms'] / base:.2f}" if base and "step_ms" in e else "-"
        rows.append(
            [e["model"], e["batch"], e["objective"]]
            + (
                [e["step_ms"], ratio, e["images_per_s"], e["gflop_per_image"], e["tflops"]]
                + [percent(e["mfu"], check), f"{100 * e['of_matmul']:.1f} %"]
                + [e.get("peak_gib", "-"), e["first_step_s"]]
                if "step_ms" in e
                else [e["error"][:60], *["-"] * 8]
            )
        )
    bf16 = "bf16 autocast" if check.device.type == "cuda" else "float32"
    check.sections["objectives"] = [
        f"### Compiled training steps (train.compile=step, {bf16}, omega-interval CFG)",
        "",
        "One process: the ratios to fm are side by side (target: imf_boundary <= 1.3 x fm). "
        "GFLOP per image: useful FLOPs (training.step_flops_per_image: forward, guidance passes, "
        "JVP, backward); MFU over the datasheet peak, then the share of the measured matmul "
        "rate; peak GiB of steady-state steps (AdamW's state made); first step s = the compile.",
        "",
        *table(
            ["model", "batch", "objective", "step ms", "x fm", "img/s", "GFLOP/img", "TFLOP/s"]
            + ["MFU", "of matmul", "peak GiB", "first step s"],
            rows,
        ),
    ]
    check.write()


# Kernel families by name: attention first (cutlass-based fmha kernels are attention).
KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|sdpa|attention|attn", re.I)),
    ("GEMM", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|matmul|^aten::(mm|addmm|bmm)$", re.I)),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "element-wise")


def kernel_table(check: Check, step: Callable[[], object], steps: int = 2, top: int = 15) -> dict:
    """Where a step's time goes: torch.profiler over `steps` steps; the kernels (GPU; on the CPU
    the aten ops) by self time, each family's share of the wall time, and the GPU's idle share."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = check.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    check.sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        check.sync()
        wall_us = 1e6 * (time.perf_counter() - start)
    events = prof.key_averages()
    if cuda:
        kernels = [
            (e.key, e.count, e.self_device_time_total)
            for e in events
            if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
        ]
    else:  # the CPU: leaf aten ops (self time), what the kernels are there
        kernels = [
            (e.key, e.count, e.self_cpu_time_total) for e in events if e.key.startswith("aten::")
        ]
    kernels.sort(key=lambda k: -k[2])
    busy = sum(us for _, _, us in kernels)
    shares = Counter()
    for name, _, us in kernels:
        shares[kernel_kind(name)] += us / wall_us
    result = {
        "steps": steps,
        "wall_ms_per_step": round(wall_us / steps / 1e3, 2),
        "shares": {k: round(shares[k], 4) for k in ("GEMM", "attention", "element-wise")},
        "idle": round(max(0.0, 1 - busy / wall_us), 4) if cuda else None,
        "top": [
            {
                "name": name[:120],
                "calls_per_step": count / steps,
                "ms_per_step": round(us / steps / 1e3, 3),
                "share": round(us / wall_us, 4),
                "kind": kernel_kind(name),
            }
            for name, count, us in kernels[:top]
        ],
    }
    return result


def profile_lines(profile: dict) -> list[str]:
    shares = ", ".join(f"{k} {100 * v:.1f} %" for k, v in profile["shares"].items())
    idle = f", idle {100 * profile['idle']:.1f} %" if profile["idle"] is not None else ""
    rows = [
        [
            k["name"][:80],
            k["kind"],
            k["calls_per_step"],
            k["ms_per_step"],
            f"{100 * k['share']:.1f} %",
        ]
        for k in profile["top"]
    ]
    return [
        f"Profile of {profile['steps']} steps ({profile['wall_ms_per_step']} ms a step): "
        f"{shares}{idle} of the wall time.",
        "",
        *table(["kernel", "kind", "calls / step", "ms / step", "share"], rows),
    ]


GEMM_OPS = ("aten.mm.default", "aten.addmm.default")
# Ops that pass a tensor on unchanged in value (views, copies): a GEMM operand traced back
# through them to a zeros tensor is a product by zero.
PASS_ON = {
    f"aten.{op}"
    for op in (
        "t.default", "view.default", "_unsafe_view.default", "reshape.default", "expand.default",
        "alias.default", "_to_copy.default", "permute.default", "transpose.int", "clone.default",
    )
}  # fmt: skip
ZEROS = {"aten.zeros.default", "aten.zeros_like.default", "aten.new_zeros.default"}


def is_zeros(node: object) -> bool:
    while isinstance(node, torch.fx.Node) and str(node.target) in PASS_ON:
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and str(node.target) in ZEROS


def graph_gemms(fn: Callable, *args: Tensor) -> tuple[int, int]:
    """(GEMMs, GEMMs with a zero operand) in the graph torch.compile hands its backend for `fn`
    (AOTAutograd's ATen graph, what inductor lowers), under no-grad."""
    from torch._dynamo.backends.common import aot_autograd

    counts = [0, 0]

    def count(gm: torch.fx.GraphModule, _) -> torch.fx.GraphModule:
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target) in GEMM_OPS:
                counts[0] += 1
                counts[1] += any(is_zeros(a) for a in node.args)
        return gm

    with torch.no_grad():
        torch.compile(fn, backend=aot_autograd(fw_compiler=count), fullgraph=True)(*args)
    return counts[0], counts[1]


def jvp_gemms(check: Check, sizes: Sizes) -> dict:
    """The GEMMs of the compiled JVP pass (the model's tangent pass, u_and_tangent: B/2's widths,
    one block and its aux block) per linear of the plain forward (one GEMM each). A linear whose
    input carries a tangent needs 2 (x W^T, dx W^T), the condition embedders' (omega, interval:
    no tangent) 1; forward-mode AD of a closed-over weight adds a third, by its zero tangent
    (PITFALLS.md): counted apart, as the GEMMs with a zero operand."""
    preset, _ = sizes.models["B/2"]
    torch.manual_seed(0)
    model = create(preset, device=check.device, **sizes.small).eval()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    shape = (sizes.count_batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    x = torch.randn(shape, generator=gen)
    y = torch.randint(0, cfg.num_classes, shape[:1], generator=gen)
    guidance = GuidanceConfig(mode="omega_interval")
    spec = LossSpec(ObjectiveConfig(name="imf_aux"), guidance, cfg.num_classes)
    draws = draw(x, y, spec, DrawKey(seed=0))
    cond = type(draws.cond)(*(c.to(check.device) for c in draws.cond))
    z, t, r = (a.to(check.device) for a in (x, draws.t, draws.r))

    def plain(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model(z_, t_, t_ - r_, cond)

    def jvp(z_: Tensor, r_: Tensor, t_: Tensor, v_: Tensor) -> Tensor:
        return model.u_and_tangent(z_, v_, t_, t_ - r_, cond)[1]

    linears, _ = graph_gemms(plain, z, r, t)
    in_jvp, by_zero = graph_gemms(jvp, z, r, t, torch.randn_like(z))
    return {
        "linears": linears,
        "gemms_in_jvp": in_jvp,
        "gemms_by_zero": by_zero,
        "per_linear": round(in_jvp / linears, 2),
        "needed_per_linear": 2,  # a little under: the condition embedders' need 1
    }


def imf_aux(check: Check, sizes: Sizes) -> None:
    """Compiled B/2 imf_aux at batch 256: MFU, steady-state memory, where the time goes."""
    result: dict = {}
    if check.fits("GEMMs per JVP linear", 5 if check.toy else 20):
        try:
            result["jvp_gemms"] = jvp_gemms(check, sizes)
        except Exception as err:
            result["jvp_gemms"] = {"error": error_text(err)}
        free_memory()
    check.results["imf_aux"] = result
    for entry in compiled_steps(check, sizes, "B/2", ("imf_aux",), sizes.batch):
        timer = entry.get("timer")
        if timer is not None and check.fits("profile", 5 if check.toy else 15):
            try:
                result["profile"] = kernel_table(check, lambda t=timer: t.step("imf_aux"))
            except Exception as err:
                result["profile_error"] = error_text(err)
        speed_entry(check, entry)
        entry.pop("timer", None)
        del timer
    free_memory()
    counts = result.get("jvp_gemms", {})
    count_line = (
        f"GEMMs per linear in the compiled JVP pass: **{counts['per_linear']}** "
        f"({counts['gemms_in_jvp']} mm/addmm for {counts['linears']} linears; B/2's widths, one "
        "block + aux block), 2 needed (a little under: the omega and interval embedders have no "
        f"tangent); **{counts['gemms_by_zero']}** of them multiply by a zero tangent."
        if "per_linear" in counts
        else f"GEMMs per JVP linear: not counted ({counts.get('error', 'skipped')})."
    )
    steps = [
        e for e in check.results.get("speed", {}).get("entries", []) if e["objective"] == "imf_aux"
    ]
    headline = (
        f"{steps[-1]['images_per_s']} img/s, MFU {percent(steps[-1]['mfu'], check)} "
        f"({100 * steps[-1]['of_matmul']:.1f} % of the measured matmul), steady-state peak "
        f"{steps[-1].get('peak_gib', '-')} GiB, compiled in {steps[-1]['first_step_s']} s."
        if steps and "step_ms" in steps[-1]
        else "not measured (skipped or failed: see below)."
    )
    check.sections["imf_aux"] = [
        f"### Compiled B/2 imf_aux + omega-interval CFG, batch {sizes.batch}",
        "",
        f"Target >= 45 % MFU. Measured: {headline}",
        "",
        count_line,
        "",
        *(profile_lines(result["profile"]) if "profile" in result else []),
    ]


def objectives(check: Check, sizes: Sizes) -> None:
    """Compiled fm and imf_boundary beside imf_aux, in the same process: the ratios."""
    for entry in compiled_steps(check, sizes, "B/2", ("fm", "imf_boundary"), sizes.batch):
        speed_entry(check, entry)
    free_memory()
    step_ms = {
        e["objective"]: e["step_ms"]
        for e in check.results.get("speed", {}).get("entries", [])
        if e["model"] == "B/2" and "step_ms" in e
    }
    ratios = {
        f"{name}_to_fm": round(step_ms[name] / step_ms["fm"], 3)
        for name in ("imf_boundary", "imf_aux")
        if name in step_ms and "fm" in step_ms
    }
    check.results["objectives"] = ratios
    line = (
        f"Step time over fm's, one process: imf_boundary **{ratios['imf_boundary_to_fm']}** "
        f"(target <= 1.3)"
        + (f", imf_aux {ratios['imf_aux_to_fm']}" if "imf_aux_to_fm" in ratios else "")
        + "."
        if "imf_boundary_to_fm" in ratios
        else "The imf_boundary / fm ratio: not measured (see Skipped)."
    )
    table_lines = check.sections.get("objectives", [])
    check.sections["objectives"] = table_lines[:2] + [line, ""] + table_lines[2:]


def precision(check: Check, sizes: Sizes) -> None:
    """B/2 imf_aux + omega-interval CFG: bf16 autocast against float32, same init and draws."""
    steps = sizes.precision_steps
    if not check.fits("precision (bf16 vs fp32)", 5 if check.toy else 25):
        return
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    preset, overrides = sizes.models["B/2"]
    curves = {}
    try:
        for name, bf16 in (("fp32", False), ("bf16", True)):
            torch.manual_seed(0)  # random output layers too: a fresh model's u is 0 whatever
            model = perturbed(
                create(preset, device=check.device, jvp_attention="math", **overrides)
            )
            timer = StepTimer(model, sizes.precision_batch, "omega_interval", "none", bf16)
            curve = []
            for step in range(steps):
                timer.x = torch.randn(timer.x.shape, generator=torch.Generator().manual_seed(step))
                timer.x = timer.x.to(check.device)
                parts = timer.step("imf_aux", seed=step)  # fresh draws each step, same in both
                curve.append({k: float(v) for k, v in parts.items()})
            curves[name] = curve
            del model, timer
            free_memory()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    tol = 0.05
    errs = {
        key: [abs(b[key] - a[key]) / abs(a[key]) for a, b in zip(*curves.values(), strict=True)]
        for key in ("loss", "mse_u", "mse_v")
    }
    worst = {k: max(v) for k, v in errs.items()}
    ok = all(w < tol for w in worst.values())
    check.results["precision"] = {
        "model": preset,
        "batch": sizes.precision_batch,
        "steps": steps,
        "tolerance": tol,
        "curves": curves,
        "max_rel_err": worst,
        "ok": ok,
    }
    first, last = curves["fp32"][0]["mse_u"], curves["fp32"][-1]["mse_u"]
    check.sections["precision"] = [
        f"### bf16 against float32: {steps} steps of {preset} imf_aux, omega-interval CFG",
        "",
        f"Batch {sizes.precision_batch}, lr 1e-4, the same (randomised) initial weights and draws; "
        f"mse_u falls {first:.4f} -> {last:.4f} in float32. Largest relative difference of "
        "any step: "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        + f" (tolerance {tol:g}): **{'within' if ok else 'outside'}**.",
        "",
    ]


#################################################################################
#                         The evaluation's decode path                          #
#################################################################################


def decode(check: Check, sizes: Sizes) -> None:
    """1-NFE B/2 generation + SD-VAE decode + InceptionV3 features, images/s, as the evaluation
    runs them (generation in float32; tasks.eval_units.UnitRunner), with the decoder before
    (float32 NCHW) and now (imf_core.decoding on this device), eager and compiled."""
    if not check.fits("decode", 10 if check.toy else 30):
        return
    from benchmarks.random_weights import inception_extractor, sd_vae

    entry: dict = {"batch": sizes.sample_batch}
    vae = extractor = None
    try:
        vae = sd_vae(check.toy).to(check.device).eval()
    except Exception as err:  # diffusers missing: generation and features still run
        entry["decoder_error"] = error_text(err)
    try:
        extractor = inception_extractor().to(check.device)
    except Exception as err:
        entry["extractor_error"] = error_text(err)
    preset, overrides = sizes.models["B/2"]
    model = perturbed(create(preset, device=check.device, **overrides)).eval()
    now = DecodeOptions.fastest(check.device)
    variants = {"fp32": DecodeOptions()}  # the key flows.gpu_rates has read: the decode before
    if now != DecodeOptions():
        variants["evaluation"] = now
    variants["compiled"] = dataclasses.replace(now, compile=True)
    if vae is not None:
        from torch.utils.flop_counter import FlopCounterMode

        c = model.cfg
        latent = torch.zeros(1, c.in_channels, c.input_size, c.input_size, device=check.device)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.decode(latent)
        entry["decode_gflop_per_image"] = counter.get_total_flops() / 1e9
    backend = "aot_eager" if check.toy else "inductor"
    for name, options in variants.items():
        compiling = options.compile
        if (compiling and vae is None) or not check.fits(
            f"decode {name}", (5 if check.toy else 20) + (10 if check.toy else 90) * compiling
        ):
            continue
        decoder = LatentDecoder(vae, SD_VAE_SCALE, options, backend) if vae is not None else None
        try:
            batches = 1 if check.toy else 3  # (InceptionV3 at 299 x 299 is slow on a CPU)
            start = time.perf_counter()
            rates_ = sampling_rates(model, sizes.sample_batch, batches, decoder, extractor)
            entry[name] = {k: round(v, 1) for k, v in rates_.items()}
            entry[name]["call_s"] = round(time.perf_counter() - start, 1)  # compiling included
            entry[name]["options"] = {
                "dtype": str(options.dtype).removeprefix("torch."),
                "channels_last": options.channels_last,
                "compile": options.compile,
            }
        except Exception as err:
            entry[name] = {"error": error_text(err)}
        del decoder
    eager = entry.get("evaluation", entry.get("fp32", {}))
    compiled = entry.get("compiled", {})
    if "all" in eager and "all" in compiled:
        entry["faster_compiled"] = compiled["all"] > 1.03 * eager["all"]
    check.results["sampling"] = entry
    del model, vae, extractor
    free_memory()
    rows = [
        [name, *(entry[name].get(k, "-") for k in ("generate", "decode", "features", "all"))]
        for name in variants
        if name in entry
    ]
    lines = []
    if "decode_gflop_per_image" in entry:
        gflop = entry["decode_gflop_per_image"]
        peak = check.results["machine"]["peak"]
        at_peak = (
            f"at the datasheet peak at most {peak['tflops'] * 1e3 / gflop:.0f} img/s"
            if peak
            else ""
        )
        lines.append(
            f"The SD-VAE decoder costs {gflop:.3g} GFLOP an image"
            + (at_peak and ": ")
            + at_peak
            + "."
        )
    if "faster_compiled" in entry and check.device.type == "cuda":  # (COMPILE_ON_CUDA's question)
        lines.append(
            "Compiled decoding is "
            + (
                "faster: set `imf_core.decoding.COMPILE_ON_CUDA = True`."
                if entry["faster_compiled"]
                else "not faster: keep `COMPILE_ON_CUDA` off."
            )
        )
    errors = " ".join(entry.get(k, "") for k in ("decoder_error", "extractor_error"))
    check.sections["decode"] = [
        f"### The evaluation's path, images/s ({preset}, batch {sizes.sample_batch})",
        "",
        "Generation (one network evaluation, float32 as the evaluation runs it), SD-VAE decode "
        "(ft-mse architecture, random weights; fp32 = float32 NCHW as before, evaluation = "
        "imf_core.decoding on this device: bf16 weights, channels-last, cudnn.benchmark; "
        "compiled = the same under torch.compile), uint8 and InceptionV3 features "
        "(torch-fidelity); each stage timed alone and all in a row. Target >= 500 img/s. "
        + " ".join(lines),
        "",
        *table(["decoder", "generate", "decode", "features", "all"], rows),
        *([f"Not measured: {errors}", ""] if errors.strip() else []),
    ]


#################################################################################
#                         XL/2 (the second call)                                #
#################################################################################


def xl2(check: Check, sizes: Sizes) -> None:
    """XL/2's largest steady-state batch (eager: what fits there fits compiled, which holds
    less), compiled imf_aux at it, and B/2's largest batch with the time left."""
    largest_batch(check, sizes, "XL/2")
    found = check.results.get("max_batch", {}).get("XL/2", {}).get("largest_fitting")
    batch = found or sizes.batch_limits["XL/2"] // 8
    for entry in compiled_steps(check, sizes, "XL/2", ("imf_aux",), batch):
        if "peak_gib" in entry:  # what would fit compiled: weights, gradients, AdamW (16 bytes
            # a parameter), plus activations in proportion to the batch
            fixed = 16 * entry["params"] / 2**30
            total = check.results["machine"]["gpu_memory_gib"] * 0.95
            per_image = (entry["peak_gib"] - fixed) / batch
            entry["compiled_largest_batch_estimate"] = int((total - fixed) / per_image) // 16 * 16
        speed_entry(check, entry)
    free_memory()
    largest_batch(check, sizes, "B/2")
    entries = [e for e in check.results.get("speed", {}).get("entries", []) if e["model"] == "XL/2"]
    check.sections["xl2"] = [
        "### XL/2 compiled (the second call)",
        "",
        "imf_aux + omega-interval CFG at the largest batch of a steady-state eager step (target "
        ">= 50 % MFU): "
        + (
            "; ".join(
                f"batch {e['batch']}: {e['images_per_s']} img/s, MFU {percent(e['mfu'], check)}, "
                f"peak {e.get('peak_gib', '-')} GiB, compiled in {e['first_step_s']} s"
                + (
                    f", compiled would fit ~{e['compiled_largest_batch_estimate']} (estimate)"
                    if "compiled_largest_batch_estimate" in e
                    else ""
                )
                if "step_ms" in e
                else f"batch {e['batch']}: {e['error'][:80]}"
                for e in entries
            )
            or "not measured (skipped: see below)"
        )
        + ". The step's row is in the table above.",
        "",
        *check.sections.get("max_batch", []),
    ]


def largest_batch(check: Check, sizes: Sizes, label: str) -> None:
    """The largest per-GPU batch of imf_aux + omega-interval CFG (bf16, eager) that fits in a
    steady-state step (the second, after AdamW made its state: StepTimer.memory): doubling
    from 64, then two bisection steps (a bounded search). What `--plan` checks a training's
    per-GPU micro-batch against (flows.gpu_memory)."""
    if not check.fits(f"largest batch {label}", 10 if check.toy else 60):
        return
    preset, overrides = sizes.models[label]
    torch.manual_seed(0)
    model = create(preset, device=check.device, jvp_attention="math", **overrides)
    bf16 = check.device.type == "cuda"
    probes: dict[int, float | None] = {}

    def fits(batch: int, model=model) -> bool:
        if batch not in probes:
            try:
                timer = StepTimer(model, batch, "omega_interval", "none", bf16)
                probes[batch] = timer.memory("imf_aux") / 2**30
            except torch.OutOfMemoryError:
                probes[batch] = None
            timer = None
            free_memory()
        return probes[batch] is not None

    lo, hi = 0, None
    batch = 16 if check.toy else 64
    while batch <= sizes.batch_limits[label] and check.left() > 5:
        if not fits(batch):
            hi = batch
            break
        lo, batch = batch, batch * 2
    for _ in range(2):  # bisection, in multiples of 16
        if hi is None or hi - lo <= 16 or check.left() < 5:
            break
        mid = (lo + hi) // 32 * 16
        if fits(mid):
            lo = mid
        else:
            hi = mid
    del model
    free_memory()
    memory_kind = "peak allocated GiB" if bf16 else "autograd saved GiB"
    check.results.setdefault("max_batch", {})[label] = {
        "largest_fitting": lo or None,
        "smallest_failing": hi,
        "limit": sizes.batch_limits[label],
        "probes": {b: (round(m, 1) if m is not None else "oom") for b, m in probes.items()},
        "memory": memory_kind,
        "after_optimizer_step": True,  # checks before 2026-12-06 measured the first step
    }
    rows = [
        [
            lab,
            r["largest_fitting"],
            r["smallest_failing"] or f"> {r['limit']} (not tried)",
            ", ".join(f"{b}: {m}" for b, m in r["probes"].items()),
        ]
        for lab, r in check.results["max_batch"].items()
    ]
    check.sections["max_batch"] = [
        "### Largest batch per GPU (imf_aux, aux head, omega-interval CFG, bf16, eager; the "
        "step after one optimizer step, AdamW's state allocated)",
        "",
        *table(["model", "fits", "fails", f"probes (batch: {memory_kind})"], rows),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget")
    parser.add_argument("--parts", nargs="*", default=list(FIRST_CALL), choices=PARTS)
    parser.add_argument("--toy", action="store_true", help="toy sizes (default without CUDA)")
    parser.add_argument(
        "--compile-cache", type=Path, help="a compile_cache.bin of an earlier call, loaded first"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    toy = args.toy or not cuda
    device = torch.device("cuda" if cuda and not toy else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64
    check = Check(args.out, args.budget_s, toy, device)
    sizes = Sizes.of(toy)
    call: dict = {"parts": [p for p in PARTS if p in args.parts], "budget_s": args.budget_s}
    if args.compile_cache:
        blob = args.compile_cache.read_bytes()
        info = torch.compiler.load_cache_artifacts(blob)
        call["compile_cache_loaded"] = {
            "file": str(args.compile_cache),
            "bytes": len(blob),
            "artifacts": {k: len(v) for k, v in info.artifacts.items()} if info else {},
        }
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    # A call without the machine part adds to the report of an earlier call on this GPU.
    resumed = "machine" not in args.parts and check.resume(gpu or machine_name_of(check))
    check.results.setdefault("calls", []).append(call | {"skipped": check.skipped})
    parts = {
        "machine": machine,
        "gemm": gemm,
        "attention": attention,
        "imf_aux": imf_aux,
        "objectives": objectives,
        "precision": precision,
        "decode": decode,
        "xl2": xl2,
    }
    todo = [p for p in PARTS if p in args.parts or (p == "machine" and not resumed)]
    for i, name in enumerate(todo):
        print(f"== {name} ({check.left():.0f} s left)", flush=True)
        check.part = name
        check.reserve_s = sum(RESERVE_S[p][toy] for p in todo[i + 1 :] if p in RESERVE_S)
        started = time.perf_counter()
        try:
            parts[name](check, sizes)
        except Exception:  # one part's failure is reported; the next part still runs
            check.results.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
            check.sections.setdefault(name, []).append(
                f"**{name} failed**: `{traceback.format_exc().strip().splitlines()[-1][:200]}`\n"
            )
        check.results.setdefault("part_s", {})[name] = round(time.perf_counter() - started, 1)
        check.write()
    print((check.out / "gpu_check.md").read_text())


def machine_name_of(check: Check) -> str:
    """The `gpu` a CPU run's machine part writes (a toy call resumes a toy report)."""
    return f"none (CPU: {platform.processor() or platform.machine()})"


if __name__ == "__main__":
    main()
