"""Time one training step of each objective on the same model and batch.

    python -m benchmarks.step_time [--model tiny] [--batch 256] [--steps 30]
                                   [--guidance omega_interval] [--compile auto]

Prints a table, then as its last line one JSON object with the step-time ratios to flow
matching (`ratio_<objective>_to_fm`) and the memory ratios (`mem_ratio_<objective>_to_fm`):
peak allocated memory on a GPU; on the CPU, bytes autograd saved for backward in an eager step
(the activation memory, which dominates training memory; the no-grad JVP pass saves none).
Each objective's model TFLOP/s (useful FLOPs, training.step_flops_per_image) and its MFU over
the datasheet dense bf16 peak of the GPU (imf_core.peak_flops); a device without one (the CPU)
has no MFU, and the table says so.
The defaults are the training defaults (base.yaml's objective and guidance; train.compile auto).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from imf_core.guidance import GuidanceConfig
from imf_core.models import build, count_params, create
from imf_core.objectives import OBJECTIVES, LossSpec, ObjectiveConfig
from imf_core.peak_flops import datasheet_peak, mfu, peak_basis
from imf_core.training import (
    COMPILE_MODES,
    DEFAULT_COMPILE,
    OptimConfig,
    Runtime,
    make_optimizer,
    step_flops_per_image,
    train_step,
)


class SavedBytes:
    """Counts the bytes autograd saves for backward while active."""

    def __init__(self) -> None:
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.total += t.numel() * t.element_size()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class StepTimer:
    """Runs and times training steps of one model on one fixed batch (random data and labels)."""

    model: nn.Module
    batch: int
    guidance: str = "omega_interval"
    compile: str = "none"
    bf16: bool = False
    compile_backend: str = "inductor"  # aot_eager: the same graph, no code generation (toy runs)

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        cfg = self.model.cfg
        gen = torch.Generator().manual_seed(0)
        shape = (self.batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        self.x = torch.randn(shape, generator=gen).to(self.device)
        self.y = torch.randint(0, cfg.num_classes, (self.batch,), generator=gen).to(self.device)
        self.optim = OptimConfig()
        self.optimizer = make_optimizer(self.model, self.optim)

    def spec(self, objective: str) -> LossSpec:
        """The loss of `objective` under the timer's guidance."""
        guidance = GuidanceConfig(mode=self.guidance)
        return LossSpec(ObjectiveConfig(name=objective), guidance, self.model.cfg.num_classes)

    def step(
        self, objective: str, compile: str | None = None, seed: int = 1
    ) -> dict[str, torch.Tensor]:
        runtime = Runtime(compile=compile or self.compile, compile_backend=self.compile_backend)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return train_step(
                self.model,
                self.optimizer,
                None,
                self.x,
                self.y,
                self.spec(objective),
                10,
                self.optim,
                seed=seed,
                runtime=runtime,
            )

    def flops_per_image(self, objective: str) -> float:
        """FLOPs of one step per image (training.step_flops_per_image), counted on a copy of
        the model on the meta device: every op is counted (fused CPU attention kernels have no
        FLOP formula) and a compiled step runs the same math. Until 2026-12-04 this doubled the
        count, which already holds 2 FLOPs per multiply-add."""
        with torch.device("meta"):
            meta = build(self.model.cfg)
        return step_flops_per_image(meta, self.spec(objective))

    def memory(self, objective: str) -> int:
        """Peak allocated bytes of a steady-state step on a GPU: a step after a first one, whose
        optimizer step made AdamW's state (two float32 copies of the weights, ~5 GiB at XL/2),
        which the first step's peak misses; autograd's saved bytes of an eager step on the CPU."""
        self.step(objective)  # on the CPU too: the toy run goes through the GPU's code
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats()
            self.step(objective)
            sync(self.device)
            return torch.cuda.max_memory_allocated()
        saved = SavedBytes()
        with saved.hooks():
            self.step(objective, compile="none")
        return saved.total

    def seconds(self, objective: str) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.step(objective)
        sync(self.device)
        return time.perf_counter() - start


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=INT", help="model config overrides"
    )
    parser.add_argument("--batch", type=int, default=256, help="the paper's ablation batch")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per objective")
    parser.add_argument("--guidance", default="omega_interval", help="none|fixed|omega|...")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument(
        "--compile", default="auto", choices=("auto", *COMPILE_MODES), help="train.compile"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    compile = DEFAULT_COMPILE if args.compile == "auto" else args.compile
    torch.manual_seed(0)
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
    model = create(args.model, **overrides).to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    timer = StepTimer(model, args.batch, args.guidance, compile, args.bf16)

    flops = {name: timer.flops_per_image(name) for name in OBJECTIVES}
    memory = {name: timer.memory(name) for name in OBJECTIVES}
    start = time.perf_counter()
    for name in OBJECTIVES:  # warm-up (a compiled step compiles here)
        timer.step(name)
    compile_s = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    for _ in range(args.steps):  # round-robin so that drift in machine speed hits all alike
        for name in OBJECTIVES:
            times[name].append(timer.seconds(name))

    median = {name: statistics.median(ts) for name, ts in times.items()}
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    print(
        f"model {args.model} ({count_params(model, inference=False) / 1e6:.2f} M params in "
        f"training), batch {args.batch}, guidance {args.guidance}, compile {compile}, "
        f"bf16 {args.bf16}, {device_name}, {torch.get_num_threads()} threads; "
        f"first steps (compiling) {compile_s:.0f} s"
    )
    peak = datasheet_peak(device_name)
    flops_per_s = {name: args.batch * flops[name] / median[name] for name in OBJECTIVES}
    print(f"MFU over {peak_basis(device_name)}")
    print(
        f"{'objective':<14}{'step ms':>10}{'x fm':>8}{'memory MB':>12}{'x fm':>8}"
        f"{'GFLOP/img':>11}{'TFLOP/s':>10}{'MFU':>8}"
    )
    for name in OBJECTIVES:
        utilisation = f"{100 * mfu(flops_per_s[name], peak[1]):.1f} %" if peak else "-"
        print(
            f"{name:<14}{1e3 * median[name]:>10.1f}{median[name] / median['fm']:>8.2f}"
            f"{memory[name] / 2**20:>12.1f}{memory[name] / memory['fm']:>8.2f}"
            f"{flops[name] / 1e9:>11.4g}{flops_per_s[name] / 1e12:>10.4g}{utilisation:>8}"
        )
    result = {
        "model": args.model,
        "batch": args.batch,
        "guidance": args.guidance,
        "compile": compile,
        "bf16": args.bf16,
        "device": device_name,
        "warmup_s": round(compile_s, 1),
        "memory_measure": "cuda_peak_allocated"
        if device.type == "cuda"
        else "autograd_saved_bytes",
        "step_ms": {k: round(1e3 * v, 2) for k, v in median.items()},
        "mfu_peak": peak_basis(device_name),
    }
    for name in OBJECTIVES:
        result[f"images_per_s_{name}"] = round(args.batch / median[name], 1)
        result[f"gflop_per_image_{name}"] = round(flops[name] / 1e9, 3)
        result[f"tflops_{name}"] = float(f"{flops_per_s[name] / 1e12:.4g}")
        if peak:
            result[f"mfu_{name}"] = round(mfu(flops_per_s[name], peak[1]), 4)
    for name in OBJECTIVES[1:]:
        result[f"ratio_{name}_to_fm"] = round(median[name] / median["fm"], 3)
        result[f"mem_ratio_{name}_to_fm"] = round(memory[name] / memory["fm"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
