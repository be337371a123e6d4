"""The benchmark suite lists runnable benchmarks, and each ends with a JSON line."""

import importlib
import json
import subprocess
import sys

from benchmarks.__main__ import suite


def test_suite_entries_name_real_benchmarks():
    for _, args in suite(quick=True):
        module = importlib.import_module(f"benchmarks.{args[0]}")
        assert callable(module.main)


def test_sampling_benchmark_reports_throughput():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.sampling", "--batch", "64", "--batches", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stages = result["images_per_s_by_stage"]
    assert result["images_per_s"] > 0 and "decode" not in stages  # pixels: nothing to decode
    assert result["images_per_s"] == stages["generate"]  # the only stage that ran
