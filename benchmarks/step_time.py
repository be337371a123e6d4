"""Time one training step of each objective on the same model and batch.

    python -m benchmarks.step_time [--model tiny] [--batch 256] [--steps 30] [--guidance none]

Prints a table, then as its last line one JSON object with the step-time ratios to flow
matching (`ratio_<objective>_to_fm`) and the memory ratios (`mem_ratio_<objective>_to_fm`):
peak allocated memory on a GPU; on the CPU, bytes autograd saved for backward (the activation
memory, which dominates training memory; the no-grad JVP pass saves none).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from imf_core.guidance import GuidanceConfig
from imf_core.models import count_params, create
from imf_core.objectives import OBJECTIVES, ObjectiveConfig
from imf_core.training import OptimConfig, make_optimizer, train_step


class SavedBytes:
    """Counts the bytes autograd saves for backward while active."""

    def __init__(self) -> None:
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.total += t.numel() * t.element_size()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


# Dense bf16 peak of known accelerators (TFLOP/s), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=INT", help="model config overrides"
    )
    parser.add_argument("--batch", type=int, default=256, help="the paper's ablation batch")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per objective")
    parser.add_argument("--guidance", default="none", help="none | fixed | omega | omega_interval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--compile-jvp", action="store_true", help="torch.compile the JVP pass")
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="for MFU (default: known GPUs)"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
    model = create(args.model, **overrides).to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = model.cfg
    x = torch.randn(args.batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (args.batch,), device=device)
    guidance = GuidanceConfig(mode=args.guidance)
    optim = OptimConfig()
    optimizer = make_optimizer(model, optim)

    def step(name: str) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            train_step(
                model,
                optimizer,
                None,
                x,
                y,
                ObjectiveConfig(name=name),
                guidance,
                cfg.num_classes,
                10,
                optim,
                compile_jvp=args.compile_jvp,
            )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    memory: dict[str, int] = {}
    flops: dict[str, float] = {}
    for name in OBJECTIVES:  # warm-up, one step counting FLOPs, one measuring memory
        step(name)
        sync()
        with FlopCounterMode(display=False) as counter:  # forward, JVP and backward ops
            step(name)
        flops[name] = 2 * counter.get_total_flops() / args.batch  # FLOPs (2 per multiply-add)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(name)
            sync()
            memory[name] = torch.cuda.max_memory_allocated()
        else:
            saved = SavedBytes()
            with saved.hooks():
                step(name)
            memory[name] = saved.total
    for _ in range(args.steps):  # round-robin so that drift in machine speed hits all alike
        for name in OBJECTIVES:
            sync()
            start = time.perf_counter()
            step(name)
            sync()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    print(
        f"model {args.model} ({count_params(model, inference=False) / 1e6:.2f} M params in "
        f"training), batch {args.batch}, guidance {args.guidance}, compile_jvp {args.compile_jvp}, "
        f"bf16 {args.bf16}, {device_name}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'objective':<14}{'step ms':>10}{'x fm':>8}{'memory MB':>12}{'x fm':>8}")
    for name in OBJECTIVES:
        print(
            f"{name:<14}{1e3 * median[name]:>10.1f}{median[name] / median['fm']:>8.2f}"
            f"{memory[name] / 2**20:>12.1f}{memory[name] / memory['fm']:>8.2f}"
        )
    result = {
        "model": args.model,
        "batch": args.batch,
        "guidance": args.guidance,
        "compile_jvp": args.compile_jvp,
        "bf16": args.bf16,
        "device": device_name,
        "memory_measure": "cuda_peak_allocated"
        if device.type == "cuda"
        else "autograd_saved_bytes",
        "step_ms": {k: round(1e3 * v, 2) for k, v in median.items()},
    }
    peak = args.peak_tflops or next(
        (tf for key, tf in PEAK_BF16_TFLOPS.items() if key in device_name), 0.0
    )
    for name in OBJECTIVES:
        result[f"images_per_s_{name}"] = round(args.batch / median[name], 1)
        result[f"gflop_per_image_{name}"] = round(flops[name] / 1e9, 2)
        if peak and args.bf16:  # model FLOPs utilisation against the dense bf16 peak
            result[f"mfu_{name}"] = round(flops[name] * args.batch / median[name] / 1e12 / peak, 4)
    for name in OBJECTIVES[1:]:
        result[f"ratio_{name}_to_fm"] = round(median[name] / median["fm"], 3)
        result[f"mem_ratio_{name}_to_fm"] = round(memory[name] / memory["fm"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
