"""The README's demo: the whole pipeline on scikit-learn's digits, then where to look.

    make demo                      # = python -m flows.demo
    python -m flows.demo train.steps=3000 guidance.mode=omega

Runs `imf run -e demo` (precompute -> train the `tiny` iMF model -> evaluate a CFG grid) as a
Prefect flow tracked in MLflow, and prints a summary: each stage computed or reused, FID per
CFG point with the best marked, the plots and sample grids, and the UI commands. A second run
reuses every stage and takes seconds.
"""

from __future__ import annotations

import sys
import time

from flows.cli import print_results, print_where_to_look
from flows.pipeline import run_pipeline
from tasks.cluster import quiet_known_warnings


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    overrides = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    result = run_pipeline("demo", overrides)
    seconds = time.perf_counter() - started
    ev = result.evaluate
    print(f"\nimf demo: done in {seconds:.0f} s")
    for stage in ("precompute", "train", "evaluate"):
        print(f"  {stage:<10} {result.stages[stage]:<8} {getattr(result, stage).path.resolve()}")
    print(
        f"\nFID per CFG point ({ev.results[0]['n_samples']} samples each, "
        "digit-classifier features):"
    )
    print_results(ev.results)
    print_where_to_look(result.config, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
