"""The benchmark suite lists runnable benchmarks, and each ends with a JSON line."""

import importlib
import json
import subprocess
import sys

from benchmarks.__main__ import suite


def test_suite_entries_name_real_benchmarks():
    for gpu in (False, True):
        for _, args in suite(quick=True, gpu=gpu):
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
    assert result["images_per_s"] > 0 and result["decode_share"] < 0.2  # pixels: uint8 only
