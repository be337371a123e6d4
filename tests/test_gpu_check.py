"""`make gpu-check` cannot rot before a GPU shows up: the same code at toy sizes on the CPU (a
background scenario beside the session's other tests), importing nothing the GPU machine lacks
(prefect, ray, mlflow, omegaconf...): the first call, then the second (`make gpu-check-xl2`)
loading the first's compile cache on a budget too small for its measurements."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

# What the GPU machine does not have; diffusers and torch_fidelity travel there as wheels.
ABSENT_THERE = ("prefect", "ray", "mlflow", "omegaconf", "pyarrow", "tasks", "flows")


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    """benchmarks.gpu_check with `args`, with only what the GPU machine has."""
    runner = textwrap.dedent(
        f"""
        import runpy, sys
        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ABSENT_THERE!r}:
                    raise ModuleNotFoundError(f"{{name}} is not on the GPU machine")
        sys.meta_path.insert(0, Absent())
        sys.argv = ["gpu_check", *{list(args)!r}]
        runpy.run_module("benchmarks.gpu_check", run_name="__main__")
        """
    )
    # the check keeps its own time budget; the limit here only catches a hang
    return subprocess.run(
        [sys.executable, "-c", runner], capture_output=True, text=True, timeout=1200
    )


def toy_gpu_checks(out: Path) -> SimpleNamespace:
    """`make gpu-check` at toy sizes into `out`; the report as it stood after it; then the xl2
    call on a 6 s budget with its compile cache."""
    first = gpu_check("--out", str(out))
    report = json.loads((out / "gpu_check.json").read_text()) if first.returncode == 0 else {}
    second = gpu_check(
        "--out", str(out), "--parts", "xl2", "--budget-s", "6",
        "--compile-cache", str(out / "compile_cache.bin"),
    )  # fmt: skip
    return SimpleNamespace(first=first, report=report, second=second, out=out)


FIRST_CALL = ["machine", "gemm", "attention", "imf_aux", "objectives", "precision", "decode"]


@pytest.mark.background(scenario=toy_gpu_checks)
def test_gpu_check_runs_at_toy_sizes_with_only_what_the_gpu_machine_has(background):
    first, report, out = background.first, background.report, background.out
    assert first.returncode == 0, first.stderr[-3000:]
    # every part ran, in order, the report written after each (and after each measurement)
    assert list(report["part_s"]) == FIRST_CALL
    parts_written = [part for part, _ in report["report_log"]]
    assert [p for i, p in enumerate(parts_written) if p not in parts_written[:i]] == FIRST_CALL
    elapsed = [s for _, s in report["report_log"]]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= report["calls"][0]["budget_s"]
    assert "errors" not in report and report["skipped"] == []
    machine = report["machine"]
    assert machine["matmul"]["tflops"] > 0 and machine["peak"] is None  # no datasheet for a CPU
    gemms = report["gemm"]["entries"]
    assert len(gemms) == 12 and all(e["tflops"] > 0 and e["mfu"] is None for e in gemms)
    # SDPA: the CPU's kernels (flash, math, PyTorch's choice) agree with float64; cuDNN and
    # memory-efficient have none here, and say so
    sdpa = {e["backend"]: e for e in report["attention"]["sdpa"]}
    assert all(sdpa[b]["ok"] for b in ("auto", "flash", "math"))
    assert "not available" in sdpa["cudnn"]["error"]
    assert report["attention"]["sdpa_fastest"] in ("auto", "flash", "math")
    jvp = report["attention"]["jvp"]
    assert {(e["impl"], e["mode"]) for e in jvp} >= {("math", "eager"), ("math", "compiled")}
    assert all(e["ok"] for e in jvp)
    # the JVP pass's GEMMs: the plain forward's one per linear, about 3 per linear in the JVP
    # today (2 needed), the zero tangents' GEMMs found
    counts = report["imf_aux"]["jvp_gemms"]
    assert counts["linears"] > 10 and counts["gemms_by_zero"] >= 0
    assert 1.5 < counts["per_linear"] <= 3.0
    profile = report["imf_aux"]["profile"]
    assert profile["top"] and 0 < sum(profile["shares"].values()) <= 1.0
    # compiled steps side by side: useful FLOPs recorded with each, MFU n/a without a peak
    speed = report["speed"]["entries"]
    assert [e["objective"] for e in speed] == ["imf_aux", "fm", "imf_boundary"]
    assert all(e["compile"] == "step" and e["step_ms"] > 0 for e in speed)
    assert all(e["flops_per_image"] > 0 and e["mfu"] is None and e["of_matmul"] > 0 for e in speed)
    assert set(report["compile_s"]) == {"B/2 imf_aux", "B/2 fm", "B/2 imf_boundary"}
    assert set(report["objectives"]) == {"imf_boundary_to_fm", "imf_aux_to_fm"}
    assert all(ratio > 0 for ratio in report["objectives"].values())
    assert report["precision"]["ok"] and len(report["precision"]["curves"]["bf16"]) == 3
    sampling = report["sampling"]
    assert sampling["fp32"]["all"] > 0 and sampling["compiled"]["all"] > 0
    assert "decode_gflop_per_image" in sampling
    # the compiler's cache: written, and loadable by the second call
    assert report["compile_cache"]["bytes"] == (out / "compile_cache.bin").stat().st_size > 0
    markdown = (out / "gpu_check.md").read_text()
    for title in ("GEMMs of B/2", "SDPA backends", "JVP attention", "Compiled B/2 imf_aux"):
        assert title in markdown
    assert "n/a (no datasheet peak for a CPU)" in markdown

    second = background.second
    assert second.returncode == 0, second.stderr[-3000:]
    merged = json.loads((out / "gpu_check.json").read_text())
    loaded = merged["calls"][1]["compile_cache_loaded"]
    assert loaded["bytes"] == report["compile_cache"]["bytes"] and sum(loaded["artifacts"].values())
    # added to the first call's report; on 6 s nothing of XL/2 fits: each skip with its estimate
    assert list(merged["part_s"]) == [*FIRST_CALL, "xl2"] and merged["speed"] == report["speed"]
    assert merged["calls"][1]["elapsed_s"] <= 6 + 2  # (the interpreter's start is not counted)
    skipped = merged["calls"][1]["skipped"]
    assert skipped and all(s.startswith("xl2: ") and "needs ~" in s for s in skipped)
    assert "XL/2 compiled (the second call)" in (out / "gpu_check.md").read_text()
