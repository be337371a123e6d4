"""Overhead of sharded evaluation: N shards against one pass over the same samples.

    python -m benchmarks.eval_shards [--samples 16000] [--shards 8]

Evaluates a tiny iMF model (random weights; no training needed) on digits with the pixel
classifier as feature extractor, at one grid point, once as a single unit and once split into
`--shards` units; the samples are identical (noise per sample index), so are the metrics. The
last line is JSON with `overhead` = sharded time / single time - 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from imf_core.models import create
from tasks.config import load_config
from tasks.evaluate import EvalJob, evaluate
from tasks.precompute import PrecomputeJob, precompute
from tasks.train import TrainResult


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16000)
    parser.add_argument("--shards", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = create("tiny")
        (root / "train").mkdir()
        meta = {"model_config": json.dumps(asdict(model.cfg))}
        save_file(dict(model.state_dict()), root / "train" / "ema.safetensors", metadata=meta)
        trained = TrainResult(root / "train", "bench", False, 0, "")
        layouts = {"single": args.samples, "sharded": -(-args.samples // args.shards)}
        seconds: dict[str, float] = {}
        results: dict[str, dict] = {}
        # A warm-up pass first (imports, first calls), then each layout twice; the best counts.
        for run, label in enumerate(["single", "single", "sharded", "single", "sharded"]):
            cfg = load_config(
                "smoke",
                [
                    f"paths.artifacts={root / str(run)}",
                    f"eval.n_samples={args.samples}",
                    f"eval.shard_size={layouts[label]}",
                    "eval.omegas=[2.0]",
                    "eval.grid_per_class=0",
                ],
            )
            pre = precompute(PrecomputeJob.of(cfg))
            start = time.perf_counter()
            results[label] = evaluate(EvalJob.of(cfg, pre), trained).results[0]
            if run:
                seconds[label] = min(seconds.get(label, float("inf")), time.perf_counter() - start)
    overhead = seconds["sharded"] / seconds["single"] - 1
    single, sharded = seconds["single"], seconds["sharded"]
    print(f"{args.samples} samples: one pass {single:.2f} s, {args.shards} shards {sharded:.2f} s")
    print(f"FID single {results['single']['fid']:.6f}, sharded {results['sharded']['fid']:.6f}")
    summary = {"samples": args.samples, "shards": args.shards, "seconds": seconds}
    print(json.dumps(summary | {"overhead": round(overhead, 4)}))


if __name__ == "__main__":
    main()
