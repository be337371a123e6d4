"""The benchmark suite: every benchmark, one command, results written to benchmarks/RESULTS.md.

    python -m benchmarks [--quick] [--out benchmarks/RESULTS.md]

Runs each benchmark as its own process (so one's threads or compiled graphs do not colour the
next), takes the JSON of its last line, and writes a markdown page with the machine, the
versions and every figure, followed by the GPU checks kept in benchmarks/gpu/ (the reports
of `make gpu-check` on a GPU machine, benchmarks/gpu_check.py, newest first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GPU_CHECKS = Path(__file__).resolve().parent / "gpu"
# The recorded checks are history, kept as written; what their MFU column means, and the
# figures as the field counts them (flows.gpu_rates.restated_mfu, which --plan reads).
MFU_NOTE = """\
> **MFU in the checks of 2026-12-04** (note of 2026-12-06, issue 35). Their MFU divides by the
> run's measured 8192³ bf16 matmul rate (770.0 and 746.3 TFLOP/s), and their FLOPs per image
> include the GEMMs by zero tangents that `torch.func.jvp` ran (23.45 GFLOP of B/2 imf_aux's
> 424.9; the first run also counted every FLOP twice). MFU as the field counts it, useful FLOPs
> over the datasheet dense bf16 peak (989.4 TFLOP/s for the H200 SXM), and what `--plan` reads
> from these records: the second run's compiled B/2 imf_aux step, printed 47.1 %, is **33.6 %**
> (401.5 useful GFLOP per image x 827.7 img/s = 332 TFLOP/s, 44.5 % of the measured matmul rate);
> its eager step 11.2 % (printed 15.7 %; the first run's, printed 30.8 %, 11.3 %); the first
> run's compiled B/2 fm step 35.8 % (printed 92.1 %). The first run timed no compiled imf_aux
> step (a graph break then)."""


def suite(quick: bool) -> list[tuple[str, list[str]]]:
    """(title, module + arguments) of every benchmark (the GPU's: benchmarks/gpu_check.py)."""
    steps = ["--steps", "5" if quick else "15"]
    cpu = ["step_time", "--device", "cpu", *steps]
    entries = [
        ("Step time, CPU, tiny, batch 256, the default: whole step compiled", cpu),
        ("Step time, CPU, tiny, batch 256, JVP compiled", [*cpu, "--compile", "jvp"]),
        ("Step time, CPU, tiny, batch 256, eager", [*cpu, "--compile", "none"]),
        (
            "Latent reader, ImageNet-shaped rows",
            ["data_read"] + (["--rows", "4096"] if quick else []),
        ),
        ("Latent reader, 8x8 digit rows", ["data_read", "--shape", "2", "1", "8", "8"]),
        (
            "Sharded evaluation overhead (8 shards vs 1 pass)",
            ["eval_shards"] + (["--samples", "4000"] if quick else []),
        ),
        ("Sampling, CPU, tiny, 1-NFE, pixels", ["sampling", "--device", "cpu"]),
        ("Pipeline: first run and cached rerun (imf run -e smoke)", ["pipeline_rerun"]),
    ]
    return entries


def run(module_args: list[str]) -> tuple[dict, str, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module_args[0]}", *module_args[1:]],
        capture_output=True,
        text=True,
        check=False,
        env=os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}, out.stdout, seconds
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1]), seconds


def machine() -> list[str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    packages = ", ".join(
        f"{p} {version(p)}" for p in ("torch", "ray", "prefect", "mlflow", "pyarrow", "diffusers")
    )
    return [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{memory:.0f} GiB",
        f"- GPU: {gpu}",
        f"- Python {platform.python_version()}; {packages}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    lines = ["# Benchmark results", "", "Written by `python -m benchmarks`.", "", *machine(), ""]
    for title, module_args in suite(args.quick):
        print(f"== {title}", flush=True)
        result, text, seconds = run(module_args)
        print(text, json.dumps(result), sep="\n", flush=True)
        lines += [
            f"## {title}",
            "",
            f"`python -m benchmarks.{' '.join(module_args)}` ({seconds:.0f} s)",
            "",
        ]
        if text.strip():
            lines += ["```", text.strip(), "```", ""]
        lines += ["```json", json.dumps(result, indent=1), "```", ""]
    lines += ["# GPU checks", "", "`make gpu-check` on a GPU machine, kept in benchmarks/gpu/.", ""]
    lines += [MFU_NOTE, ""]
    checks = sorted(GPU_CHECKS.glob("*.md"), reverse=True)
    lines += [p.read_text() for p in checks]  # each a "## GPU check" with ### parts
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
