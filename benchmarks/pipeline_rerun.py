"""Wall time of a cached rerun of the whole pipeline (`imf run`), against the first run.

    python -m benchmarks.pipeline_rerun [--experiment smoke] [key=value ...]

Runs `imf run` twice in a fresh temporary artifact root (each a new process, as a user would,
so the Prefect server start-up is included) and reports both wall times; the second reuses
every stage. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="smoke")
    parser.add_argument("overrides", nargs="*", default=["train.steps=100"])
    args = parser.parse_args()
    imf = Path(sys.executable).parent / "imf"
    with tempfile.TemporaryDirectory() as tmp:
        root = [f"paths.artifacts={tmp}/artifacts", f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
        walls = []
        for _ in range(2):
            start = time.perf_counter()
            subprocess.run(
                [str(imf), "run", "-e", args.experiment, *root, *args.overrides],
                check=True,
                capture_output=True,
            )
            walls.append(time.perf_counter() - start)
    print(f"imf run -e {args.experiment}: first {walls[0]:.1f} s, cached rerun {walls[1]:.1f} s")
    result = {"experiment": args.experiment, "first_s": round(walls[0], 1)}
    print(json.dumps(result | {"rerun_s": round(walls[1], 1)}))


if __name__ == "__main__":
    main()
