"""The GPU check: one prepared run that measures what a GPU gives this project (`make gpu-check`).

    python3 -m benchmarks.gpu_check [--out DIR] [--budget-s 280] [--parts PART ...] [--toy]

Made for a GPU machine that has torch (>= 2.11) and Triton but none of the pipeline's other
packages and no network: it imports torch, imf_core, benchmarks.{step_time, sampling,
random_weights} and, where installed, three wheels copied along with the repository
(6.5 MB; a part whose package is missing says so and the others run):

    jvp-flash-attention==0.14.0   the flash_jvp attention (model.jvp_attention)
    diffusers==0.42.1             the SD-VAE decoder (AutoencoderKL, ft-mse architecture)
    torch_fidelity==0.4.0         InceptionV3, as the evaluation uses it
    importlib_metadata            a requirement of diffusers

Fetched where there is network, installed there without it:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl jvp-flash-attention==0.14.0 \\
        diffusers==0.42.1 torch_fidelity==0.4.0 importlib_metadata
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 -m benchmarks.gpu_check --out "$OUT"

Parts, in this order, so that a run cut off still reports the first ones. After each part the
report is written again: DIR/gpu_check.md (a section for benchmarks/RESULTS.md) and
DIR/gpu_check.json.

  machine    GPU, driver, torch, Triton, and the measured 8192^3 bf16 matmul rate, which is the
             MFU denominator used below
  attention  the JVP-attention options (math, flash_jvp; eager and compiled) against float64
             math at B/2's shapes, bf16 and fp32: values, tangents, time
  compiled   a compiled step (train.compile=step) against eager, each objective: loss, gradients
  precision  30 steps of B/2 imf_aux + omega-interval CFG in bf16 against fp32, same init, draws
  speed      B/2 at batch 256: step time of each objective x compile x JVP attention, img/s,
             model TFLOP/s, MFU, peak memory; 1-NFE sampling + SD-VAE decode + Inception
             features; the largest batch that fits in a steady-state step (B/2, XL/2; L/2
             and M/2 with the time left), what --plan checks micro-batches against; XL/2's
             step times

Everything keeps to --budget-s: a measurement that would not fit in what is left is listed as
skipped, with its estimate. Without CUDA (or with --toy) the same code runs at toy sizes on the
CPU in under a minute, compiling with the aot_eager backend (a CI test keeps it working).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.sampling import sampling_rates
from benchmarks.step_time import StepTimer
from imf_core.guidance import GuidanceConfig
from imf_core.models import create
from imf_core.models.layers import HAS_FLASH_JVP, flash_jvp_attention, math_attention
from imf_core.objectives import DrawKey, ObjectiveConfig, draw, loss_of_draws
from imf_core.training import compiled_loss, step_flops_per_image

PARTS = ("machine", "attention", "compiled", "precision", "speed")
# The most of the budget each correctness part may take (what it leaves goes on to the next):
# speed, last, gets the rest -- at least 55 % of the budget in a full run.
SHARES = {"attention": 0.12, "compiled": 0.22, "precision": 0.11}


@dataclass
class Sizes:
    """The shapes of each measurement: the paper's on a GPU, toy ones on the CPU."""

    models: dict[str, tuple[str, dict]]  # label -> (preset, overrides)
    small: dict  # overrides of B/2 for the compiled-vs-eager check (its widths, fewer blocks)
    batch: int  # per-GPU training batch
    attention_batch: int
    heads: int
    head_dim: int
    tokens: tuple[int, ...]  # sequence lengths for the attention check
    matmul: int
    compiled_batch: int
    precision_batch: int
    precision_steps: int
    timed_steps: int
    sample_batch: int
    batch_limits: dict[str, int]  # label -> upper bound of the batch search

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
                compiled_batch=8,
                precision_batch=8,
                precision_steps=3,
                timed_steps=2,
                sample_batch=4,
                batch_limits={"B/2": 64, "XL/2": 64},
            )
        return Sizes(
            models={
                "B/2": ("imf_b2", {}),
                "XL/2": ("imf_xl2", {}),
                "M/2": ("imf_m2", {}),
                "L/2": ("imf_l2", {}),
            },
            small=dict(depth=1, aux_head_depth=1),  # one u-head block, one v-head block
            batch=256,
            attention_batch=64,
            heads=12,
            head_dim=64,
            tokens=(276, 256),  # B/2's 256 patch tokens + 20 condition tokens; patches alone
            matmul=8192,
            compiled_batch=16,
            precision_batch=32,
            precision_steps=30,
            timed_steps=5,
            sample_batch=256,
            batch_limits={"B/2": 2048, "XL/2": 1024, "M/2": 2048, "L/2": 1024},
        )


@dataclass
class Check:
    """The run: its budget, what it measured, what it skipped; written out after every part."""

    out: Path
    budget_s: float
    toy: bool
    device: torch.device
    started: float = field(default_factory=time.perf_counter)
    part_ends: float = float("inf")  # the running part's own deadline (SHARES)
    results: dict = field(default_factory=dict)
    sections: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def fits(self, what: str, estimate_s: float) -> bool:
        """Whether `what` fits in what is left of the budget and of its part's share; if not,
        it is listed as skipped."""
        part_left = self.part_ends - time.perf_counter()
        if min(self.left(), part_left) >= estimate_s:
            return True
        self.skipped.append(f"{what} (needs ~{estimate_s:.0f} s, {max(self.left(), 0):.0f} s left)")
        return False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.results["skipped"] = self.skipped
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1))
        machine = self.results.get("machine", {})
        head = [
            f"## GPU check: {machine.get('gpu', '?')}, {machine.get('date', '?')}",
            "",
            f"`python3 -m benchmarks.gpu_check` (`make gpu-check`): "
            f"{self.results['elapsed_s']:.0f} s of a {self.budget_s:.0f} s budget"
            + (", toy sizes on the CPU" if self.toy else ""),
            "",
        ]
        body = [line for part in PARTS for line in self.sections.get(part, [])]
        tail = ["### Skipped", "", *(f"- {s}" for s in self.skipped), ""] if self.skipped else []
        (self.out / "gpu_check.md").write_text("\n".join(head + body + tail))


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


#################################################################################
#                                 The machine                                   #
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
        info |= {"gpu": f"none (CPU: {platform.processor() or platform.machine()})"}
        dtype = torch.float32
    n = sizes.matmul
    gen = torch.Generator(device=check.device).manual_seed(0)
    a = torch.randn(n, n, device=check.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=check.device, dtype=dtype, generator=gen)
    seconds = timed(check, lambda: a @ b, 10)
    # Four significant figures, not one decimal: a toy-size matmul on a loaded CPU ran under
    # 0.05 TFLOP/s, which one decimal wrote as 0.0 (and every MFU below divided by it).
    tflops = float(f"{2 * n**3 / seconds / 1e12:.4g}")
    info["matmul"] = {"n": n, "dtype": str(dtype), "tflops": tflops}
    check.results["machine"] = info
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
        f"- matmul {n}^3 {info['matmul']['dtype']}: **{info['matmul']['tflops']} TFLOP/s** "
        "(random data; the MFU denominator below)",
        "",
    ]


def peak_tflops(check: Check) -> float:
    return check.results["machine"]["matmul"]["tflops"]


#################################################################################
#                                  Correctness                                  #
#################################################################################

# Relative tolerances: float32 kernels with TF32 matmuls inside, bf16 storage.
ATTENTION_TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def attention(check: Check, sizes: Sizes) -> None:
    """JVP attention (values and tangents) of each option against float64 math attention."""
    impls = {"math": math_attention}
    if HAS_FLASH_JVP and check.device.type == "cuda":
        impls["flash_jvp"] = flash_jvp_attention
    rows, results = [], []
    for tokens in sizes.tokens:
        shape = (sizes.attention_batch, sizes.heads, tokens, sizes.head_dim)
        gen = torch.Generator(device=check.device).manual_seed(tokens)
        primals = [torch.randn(shape, device=check.device, generator=gen) for _ in range(3)]
        tangents = [torch.randn(shape, device=check.device, generator=gen) for _ in range(3)]
        ref_out, ref_tan = torch.func.jvp(
            math_attention, tuple(p.double() for p in primals), tuple(t.double() for t in tangents)
        )
        for dtype in (torch.bfloat16, torch.float32):
            args = tuple(x.to(dtype) for x in primals + tangents)
            entry = {"impl": "sdpa (no JVP)", "mode": "eager", "tokens": tokens}
            entry |= fused_sdpa(check, args[:3], ref_out)
            results.append(entry)
            rows.append(attention_row(entry, dtype))
            for name, impl in impls.items():
                # Compiled: flash_jvp (torch.compile may drop a custom jvp rule, PITFALLS.md)
                # and math in bf16 (the speed baseline), at the first (the model's) length.
                modes = ["eager"]
                if tokens == sizes.tokens[0] and (name != "math" or dtype == torch.bfloat16):
                    modes.append("compiled")
                for mode in modes:
                    if not check.fits(f"attention {name} {mode} T={tokens} {dtype}", 10):
                        continue

                    def run(impl=impl, args=args) -> tuple[Tensor, Tensor]:
                        return torch.func.jvp(impl, args[:3], args[3:])

                    backend = "aot_eager" if check.toy else "inductor"
                    compiled = torch.compile(run, fullgraph=True, backend=backend)
                    fn = compiled if mode == "compiled" else run
                    entry = {"impl": name, "mode": mode, "tokens": tokens, "dtype": str(dtype)}
                    try:
                        out, tan = fn()
                        seconds = timed(check, fn, 10)
                        entry |= {
                            "out_rel_err": rel(out, ref_out),
                            "tangent_rel_err": rel(tan, ref_tan),
                            "ms": round(1e3 * seconds, 3),
                        }
                        tol = ATTENTION_TOL[dtype]
                        entry["ok"] = max(entry["out_rel_err"], entry["tangent_rel_err"]) < tol
                    except Exception as err:  # a kernel that refuses these shapes: reported
                        entry |= {"error": f"{type(err).__name__}: {err}"[:300], "ok": False}
                    results.append(entry)
                    rows.append(attention_row(entry, dtype))
            free_memory()
    check.results["attention"] = {
        "shape": [sizes.attention_batch, sizes.heads, list(sizes.tokens), sizes.head_dim],
        "tolerance": {str(k): v for k, v in ATTENTION_TOL.items()},
        "flash_jvp_installed": HAS_FLASH_JVP,
        "entries": results,
    }
    check.sections["attention"] = [
        f"### JVP attention against float64 math (batch {sizes.attention_batch}, "
        f"{sizes.heads} heads, head dim {sizes.head_dim})",
        "",
        "Relative errors of the output and of its tangent; tolerance "
        + ", ".join(f"{str(k).removeprefix('torch.')} {v:g}" for k, v in ATTENTION_TOL.items())
        + ("" if HAS_FLASH_JVP else "; jvp-flash-attention is not installed here")
        + ".",
        "",
        *table(["impl", "mode", "tokens", "dtype", "out err", "tangent err", "ms", "ok"], rows),
    ]


def attention_row(entry: dict, dtype: torch.dtype) -> list:
    nan = float("nan")
    return [
        entry["impl"],
        entry["mode"],
        entry["tokens"],
        str(dtype).removeprefix("torch."),
        f"{entry.get('out_rel_err', nan):.1e}",
        f"{entry.get('tangent_rel_err', nan):.1e}",
        entry.get("ms", "-"),
        "yes" if entry["ok"] else entry.get("error", "**no**")[:80],
    ]


def fused_sdpa(check: Check, qkv: tuple[Tensor, ...], ref_out: Tensor) -> dict:
    """The plain (no-JVP) attention of every other pass, restricted to the fused kernels: it
    raises if neither flash nor memory-efficient attention takes these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    entry: dict = {"dtype": str(qkv[0].dtype)}

    def run() -> Tensor:
        with sdpa_kernel(fused):
            return torch.nn.functional.scaled_dot_product_attention(*qkv)

    try:
        out = run()
        entry |= {"out_rel_err": rel(out, ref_out), "ms": round(1e3 * timed(check, run, 10), 3)}
        entry["ok"] = entry["out_rel_err"] < ATTENTION_TOL[qkv[0].dtype]
    except RuntimeError as err:  # no fused kernel for these inputs (or no such kernel on CPU)
        entry |= {"error": f"no fused kernel: {err}"[:300], "ok": False}
    return entry


# The compiled-vs-eager check's backend per objective on a GPU: inductor (Triton kernels) for
# imf_aux, whose graph holds every piece (aux head, guidance passes, JVP), and for fm; the other
# two trace the same ops (aot_eager, seconds) -- on an H200 their inductor compiles took 14-18 s
# each and agreed to 1.1e-7 (2026-12-04), time the five-minute check spends on the speed part.
COMPILED_BACKEND = {"fm": "inductor", "mf": "aot_eager", "imf_boundary": "aot_eager"}


def compiled(check: Check, sizes: Sizes) -> None:
    """Loss and gradients of train.compile=step against eager, per objective, float32."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    guidance = GuidanceConfig(mode="omega_interval")
    rows, results = [], []
    preset, _ = sizes.models["B/2"]
    try:
        for objective in ("imf_aux", "fm", "mf", "imf_boundary"):
            backend = "aot_eager" if check.toy else COMPILED_BACKEND.get(objective, "inductor")
            estimate = 10 if check.toy or backend == "aot_eager" else 30
            if not check.fits(f"compiled vs eager {objective} ({backend})", estimate):
                continue
            torch.manual_seed(0)
            model = create(preset, device=check.device, jvp_attention="math", **sizes.small)
            model = perturbed(model)
            cfg = model.cfg
            gen = torch.Generator().manual_seed(1)
            shape = (sizes.compiled_batch, cfg.in_channels, cfg.input_size, cfg.input_size)
            x = torch.randn(shape, generator=gen).to(check.device)
            y = torch.randint(0, cfg.num_classes, shape[:1], generator=gen).to(check.device)
            obj = ObjectiveConfig(name=objective)
            draws = draw(x, y, obj, guidance, cfg.num_classes, DrawKey(seed=1))

            def loss_and_grad(fn, x=x, y=y, draws=draws, obj=obj, net=model) -> tuple[Tensor, ...]:
                net.zero_grad(set_to_none=True)
                loss, _ = fn(net, x, y, draws, obj, guidance, net.cfg.num_classes)
                loss.backward()
                grads = [p.grad.flatten() for p in net.parameters() if p.grad is not None]
                return loss.detach(), torch.cat(grads)

            eager_loss, eager_grad = loss_and_grad(loss_of_draws)
            start = time.perf_counter()
            entry = {"objective": objective, "backend": backend}
            try:
                loss, grad = loss_and_grad(compiled_loss(backend))
                entry |= {
                    "compile_s": round(time.perf_counter() - start, 1),
                    "loss_rel_err": rel(loss, eager_loss),
                    "grad_rel_err": rel(grad, eager_grad),
                }
                entry["ok"] = max(entry["loss_rel_err"], entry["grad_rel_err"]) < 1e-4
            except Exception as err:
                entry |= {"error": f"{type(err).__name__}: {err}"[:300], "ok": False}
            results.append(entry)
            nan = float("nan")
            rows.append(
                [
                    objective,
                    backend,
                    f"{entry.get('loss_rel_err', nan):.1e}",
                    f"{entry.get('grad_rel_err', nan):.1e}",
                    entry.get("compile_s", "-"),
                    "yes" if entry["ok"] else entry.get("error", "**no**")[:80],
                ]
            )
            del model
            free_memory()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    check.results["compiled"] = {"model": [preset, sizes.small], "entries": results}
    check.sections["compiled"] = [
        "### Compiled step (train.compile=step) against eager, float32",
        "",
        f"{preset} with {sizes.small} (its widths and token count, fewer blocks), batch "
        f"{sizes.compiled_batch}, omega-interval CFG, JVP attention math, TF32 off; relative "
        "errors of the loss and of all gradients, tolerance 1e-4.",
        "",
        *table(["objective", "backend", "loss err", "grad err", "compile s", "ok"], rows),
    ]


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
#                                     Speed                                     #
#################################################################################


@dataclass
class Speed:
    """Step-time entries; FLOPs per image counted once per (model, objective), eagerly."""

    check: Check
    sizes: Sizes
    entries: list[dict] = field(default_factory=list)
    flops: dict[tuple[str, str], float] = field(default_factory=dict)
    compile_s: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, mode) -> s
    step_s: dict[str, float] = field(default_factory=dict)  # model -> slowest step seen

    def model(self, label: str, attention: str) -> torch.nn.Module:
        preset, overrides = self.sizes.models[label]
        torch.manual_seed(0)
        return create(preset, device=self.check.device, jvp_attention=attention, **overrides)

    def flops_per_image(self, label: str, objective: str) -> float:
        """Counted on the meta device (training.step_flops_per_image): no memory, ~3-8 s."""
        key = (label, objective)
        if key not in self.flops:
            preset, overrides = self.sizes.models[label]
            meta = create(preset, device="meta", **overrides)
            self.flops[key] = step_flops_per_image(
                meta,
                ObjectiveConfig(name=objective),
                GuidanceConfig(mode="omega_interval"),
                meta.cfg.num_classes,
            )
        return self.flops[key]

    def estimate(self, label: str, compile: str) -> float:
        """Seconds one entry takes: its steps, and its compile as last measured for this model
        and mode (a guess until then)."""
        steps = self.step_s.get(label, 0.1 if self.check.toy else (1.0 if label == "B/2" else 5.0))
        first = {"step": 140.0, "jvp": 60.0}[compile] if compile != "none" else 0.0  # H200, B/2
        compile_s = self.compile_s.get((label, compile), 10.0 if self.check.toy else first)
        if compile == "none":
            compile_s = 0.0
        return (self.sizes.timed_steps + 3) * steps + compile_s

    def run(self, label: str, objectives: tuple[str, ...], compile: str, attention: str) -> None:
        """Times `objectives` on one model: warm-up (compiling, if any), then timed steps."""
        check, sizes = self.check, self.sizes
        what = f"speed {label} compile={compile} jvp_attention={attention}"
        if not check.fits(f"{what} {objectives}", self.estimate(label, compile)):
            return
        backend = "aot_eager" if check.toy else "inductor"
        bf16 = check.device.type == "cuda"
        batch = self.fitting_batch(label)
        model = self.model(label, attention)
        timer = StepTimer(model, batch, "omega_interval", compile, bf16, backend)
        for objective in objectives:
            if not check.fits(f"{what} {objective}", self.estimate(label, compile)):
                continue
            entry = {
                "model": label,
                "batch": batch,
                "objective": objective,
                "compile": compile,
                "jvp_attention": attention,
            }
            try:
                start = time.perf_counter()
                timer.step(objective)
                check.sync()
                entry["first_step_s"] = round(time.perf_counter() - start, 1)
                if check.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds = timed(check, lambda o=objective, t=timer: t.step(o), sizes.timed_steps)
                self.step_s[label] = max(self.step_s.get(label, 0.0), seconds)
                if compile != "none":
                    self.compile_s[(label, compile)] = entry["first_step_s"]
                flops = self.flops_per_image(label, objective) * batch
                entry |= {
                    "step_ms": round(1e3 * seconds, 1),
                    "images_per_s": round(batch / seconds, 1),
                    "gflop_per_image": round(flops / batch / 1e9, 1),
                    "tflops": round(flops / seconds / 1e12, 1),
                    # three significant digits: a slow toy step on a loaded CPU is not 0.000
                    "mfu": float(f"{flops / seconds / 1e12 / peak_tflops(check):.3g}"),
                }
                if check.device.type == "cuda":
                    entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            except torch.OutOfMemoryError:
                entry["error"] = "out of memory"
            except Exception as err:
                entry["error"] = f"{type(err).__name__}: {err}"[:300]
            self.entries.append(entry)
            self.report()
            check.write()
        del model, timer
        free_memory()

    def fitting_batch(self, label: str) -> int:
        """sizes.batch, or the largest batch found to fit if that is smaller."""
        found = self.check.results.get("max_batch", {}).get(label, {}).get("largest_fitting")
        return min(self.sizes.batch, found) if found else self.sizes.batch

    def report(self) -> None:
        fm = {
            (e["model"], e["compile"], e["jvp_attention"]): e["step_ms"]
            for e in self.entries
            if e["objective"] == "fm" and "step_ms" in e
        }
        rows = []
        for e in self.entries:
            base = fm.get((e["model"], e["compile"], e["jvp_attention"]))
            ratio = f"{e['step_ms'] / base:.2f}" if base and "step_ms" in e else "-"
            rows.append(
                [e["model"], e["batch"], e["objective"], e["compile"], e["jvp_attention"]]
                + (
                    [
                        e["step_ms"],
                        ratio,
                        e["images_per_s"],
                        e["tflops"],
                        f"{100 * e['mfu']:.1f} %",
                        e.get("peak_gib", "-"),
                        e["first_step_s"],
                    ]
                    if "step_ms" in e
                    else [e["error"][:60], *["-"] * 6]
                )
            )
        self.check.results["speed"] = {"entries": self.entries}
        bf16 = "bf16 autocast" if self.check.device.type == "cuda" else "float32"
        self.check.sections["speed"] = [
            f"### Training step time ({bf16}, omega-interval CFG)",
            "",
            "FLOPs per image counted by PyTorch on the meta device (forward, guidance passes, JVP, "
            "backward); MFU against the matmul rate above; first step s = the warm-up step, "
            "compiling included.",
            "",
            *table(
                [
                    "model",
                    "batch",
                    "objective",
                    "compile",
                    "JVP attention",
                    "step ms",
                    "x fm",
                    "img/s",
                    "TFLOP/s",
                    "MFU",
                    "peak GiB",
                    "first step s",
                ],
                rows,
            ),
            *self.check.sections.get("sampling", []),
            *self.check.sections.get("max_batch", []),
        ]


def largest_batch(check: Check, sizes: Sizes, label: str) -> None:
    """The largest per-GPU batch of imf_aux + omega-interval CFG (bf16, eager) that fits in a
    steady-state step (the second, after AdamW made its state: StepTimer.memory): doubling
    from 64, then two bisection steps (a bounded search). What `--plan` checks a training's
    per-GPU micro-batch against (flows.plan)."""
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


def sampling(check: Check, sizes: Sizes) -> None:
    """1-NFE B/2 sampling, SD-VAE decode and InceptionV3 features, images/s per stage."""
    if not check.fits("sampling", 10 if check.toy else 30):
        return
    from benchmarks.random_weights import inception_extractor, sd_vae

    entry: dict = {"batch": sizes.sample_batch}
    decoder = extractor = None
    try:
        decoder = sd_vae(check.toy).to(check.device).eval()
        decoder = decoder.to(memory_format=torch.channels_last)
    except Exception as err:  # diffusers missing: the rest still runs
        entry["decoder_error"] = f"{type(err).__name__}: {err}"[:200]
    try:
        extractor = inception_extractor().to(check.device)
    except Exception as err:
        entry["extractor_error"] = f"{type(err).__name__}: {err}"[:200]
    preset, overrides = sizes.models["B/2"]
    model = perturbed(create(preset, device=check.device, **overrides)).eval()
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the convolutions
    if decoder is not None:
        from torch.utils.flop_counter import FlopCounterMode

        c = model.cfg
        latent = torch.zeros(1, c.in_channels, c.input_size, c.input_size, device=check.device)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            decoder.decode(latent)
        entry["decode_gflop_per_image"] = counter.get_total_flops() / 1e9
    for name, bf16 in (("fp32", False), ("bf16", True)):
        if check.device.type != "cuda" and bf16:
            continue
        rates = sampling_rates(
            model, sizes.sample_batch, 3, decoder, extractor, bf16=bf16, omega=2.0
        )
        entry[name] = {k: round(v, 1) for k, v in rates.items()}
    check.results["sampling"] = entry
    del model, decoder, extractor
    free_memory()
    rows = [
        [name, *(entry[name].get(k, "-") for k in ("generate", "decode", "features", "all"))]
        for name in ("fp32", "bf16")
        if name in entry
    ]
    flop_line = ""
    if "decode_gflop_per_image" in entry:
        gflop = entry["decode_gflop_per_image"]
        flop_line = (
            f"The SD-VAE decoder costs {gflop:.3g} GFLOP an image: at the matmul rate above, "
            f"at most {peak_tflops(check) * 1e3 / gflop:.0f} images/s. "
        )
    errors = " ".join(entry.get(k, "") for k in ("decoder_error", "extractor_error"))
    check.sections["sampling"] = [
        f"### 1-NFE sampling, images/s ({preset}, batch {sizes.sample_batch})",
        "",
        "Generation (one network evaluation), SD-VAE decode (ft-mse architecture, random "
        "weights, channels-last), uint8 and InceptionV3 features (torch-fidelity, float32 "
        "inside as in the evaluation); each stage timed alone and all in a row. " + flop_line,
        "",
        *table(["precision", "generate", "decode", "features", "all"], rows),
        *([f"Not measured: {errors}", ""] if errors.strip() else []),
    ]


def speed(check: Check, sizes: Sizes) -> None:
    """In order of what matters, so that the five-minute budget ends on the least: the eager
    baseline, the default compiled step of B/2 (the MFU headline; its compile took 136 s on an
    H200), sampling, then the compiled ratios, the batch search, the other modes, XL/2 and
    the batch search of L/2 and M/2.
    A toy run takes each mode once: the same code in under a minute. (No preset runs the
    flash_jvp kernel: it is wrong at their 276 tokens, layers.flash_jvp_applies.)"""
    run = Speed(check, sizes)
    run.run("B/2", ("fm", "imf_aux"), "none", "math")
    run.run("B/2", ("imf_aux",), "step", "math")
    sampling(check, sizes)
    run.run("B/2", ("mf", "imf_boundary"), "none", "math")
    run.report()
    if not check.toy:
        run.run("B/2", ("fm", "imf_boundary", "mf"), "step", "math")
    largest_batch(check, sizes, "B/2")
    largest_batch(check, sizes, "XL/2")
    run.run("B/2", ("imf_aux", "fm"), "jvp", "math")
    run.run("XL/2", ("fm", "imf_aux"), "none", "math")
    if not check.toy:  # (the toy run has been through this code)
        run.run("XL/2", ("imf_aux", "fm"), "step", "math")
        run.run("B/2", ("mf", "imf_boundary"), "jvp", "math")
        for label in ("L/2", "M/2"):  # Tab. 2's other sizes, for --plan's memory check
            largest_batch(check, sizes, label)
    run.report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--budget-s", type=float, default=280.0, help="wall-clock budget")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--toy", action="store_true", help="toy sizes (default without CUDA)")
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
    parts = {"attention": attention, "compiled": compiled, "precision": precision, "speed": speed}
    machine(check, sizes)  # every report names its machine and its MFU denominator
    check.write()
    for name in PARTS[1:]:
        if name not in args.parts:
            continue
        print(f"== {name} ({check.left():.0f} s left)", flush=True)
        started = time.perf_counter()
        check.part_ends = started + SHARES.get(name, 1.0) * check.budget_s
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


if __name__ == "__main__":
    main()
