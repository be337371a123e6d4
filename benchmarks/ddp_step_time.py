"""Training-step throughput of each objective under DDP on Ray Train (the real train stage).

    python -m benchmarks.ddp_step_time [--workers 2] [--steps 60] [--batch 64]

Runs `tasks.train.train` for fm, mf, imf_boundary and imf_aux on the smoke experiment (tiny
model, digits) in a temporary artifact root, reads steps/s from each run's MLflow metrics
(measured inside the loop, so Ray's start-up is excluded) and prints the ratios to fm; the
last line is JSON with `ratio_<objective>_to_fm`.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from mlflow import MlflowClient

from imf_core.objectives import OBJECTIVES
from tasks.config import load_config
from tasks.precompute import PrecomputeJob, precompute
from tasks.train import TrainJob, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    rate = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in OBJECTIVES:
            cfg = load_config(
                "smoke",
                [
                    f"paths.artifacts={tmp}",
                    f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                    f"objective.name={name}",
                    f"train.steps={args.steps}",
                    f"train.batch_size={args.batch}",
                    f"train.num_workers={args.workers}",
                    f"train.log_every={args.steps}",
                    f"train.checkpoint_every={args.steps}",
                ],
            )
            pre = precompute(PrecomputeJob.of(cfg))
            result = train(TrainJob.of(cfg, pre))
            metrics = MlflowClient(cfg.tracking.uri).get_run(result.mlflow_run_id).data.metrics
            rate[name] = metrics["steps_per_s"]
    print(f"{args.workers} workers, global batch {args.batch}")
    print(f"{'objective':<14}{'steps/s':>10}{'x fm (time)':>14}")
    for name in OBJECTIVES:
        print(f"{name:<14}{rate[name]:>10.2f}{rate['fm'] / rate[name]:>14.2f}")
    out = {"workers": args.workers, "batch": args.batch, "steps_per_s": rate}
    out |= {f"ratio_{n}_to_fm": round(rate["fm"] / rate[n], 3) for n in OBJECTIVES[1:]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
