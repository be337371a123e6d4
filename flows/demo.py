"""The README's demo: the whole pipeline on scikit-learn's digits, then where to look.

    make demo                      # = python -m flows.demo
    python -m flows.demo train.steps=3000 guidance.mode=omega
    python -m flows.demo --record benchmarks/runs   # and write the run's record there

Runs `imf run -e demo` (precompute -> train the `tiny` iMF model -> evaluate a CFG grid) as a
Prefect flow tracked in MLflow, and prints a summary: each stage computed or reused, FID per
CFG point with the best marked, the plots and sample grids, and the UI commands. A second run
reuses every stage and takes seconds. `--record DIR` writes DIR/<date>-demo.json: the date,
commit, command, wall time, the machine's load, and the best point and calibration copied from
the run's results.json; the docs quote the demo's numbers from it (tests/test_doc_runs.py).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

from flows.pipeline import run_pipeline
from flows.run_printout import print_results, print_where_to_look
from tasks.cluster import quiet_known_warnings
from tasks.provenance import installed_code_state


def run_record(result, seconds: float, overrides: list[str], load: dict, code) -> dict:
    """The demo run as the docs quote it: its numbers copied from the results.json it wrote."""
    results = result.evaluate.out.read_json("results.json")
    best = next(r for r in results if r["best"])
    return {
        "date": datetime.date.today().isoformat(),
        "commit": code.commit,
        "changed": list(code.changed),
        "command": " ".join(["python -m flows.demo", *overrides]),
        "stages": result.stages,
        "wall_seconds": round(seconds, 1),
        "load": load,
        "results_file": f"{result.evaluate.out.uri}/results.json",
        "n_samples": best["n_samples"],
        "best": {k: best[k] for k in ("omega", "t_min", "t_max", "fid", "is", "accuracy")}
        | {k: best[k] for k in ("precision", "recall") if k in best},
        "real_data_floor": best["real_data_floor"]["fid"],
        "class_mean_ceiling": best["class_mean_ceiling"]["fid"],
        "many_step": {
            f"omega {r['omega']:g} [{r['t_min']:g}, {r['t_max']:g}]": r["many_step"]
            for r in results
            if "many_step" in r
        },
    }


def parse_args(argv: list[str]) -> tuple[list[str], Path | None]:
    """The demo's arguments: `demo` overrides, and `--record DIR` anywhere among them."""
    overrides = list(argv)
    if "--record" not in overrides:
        return overrides, None
    at = overrides.index("--record")
    if at + 1 == len(overrides):
        raise SystemExit("flows.demo: --record needs a folder (e.g. --record benchmarks/runs)")
    record_dir = Path(overrides[at + 1])
    del overrides[at : at + 2]
    return overrides, record_dir


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    overrides, record_dir = parse_args(sys.argv[1:] if argv is None else argv)
    code, load = installed_code_state(), {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    started = time.perf_counter()
    result = run_pipeline("demo", overrides)
    seconds = time.perf_counter() - started
    load["loadavg_after"] = os.getloadavg()
    ev = result.evaluate
    print(f"\nimf demo: done in {seconds:.0f} s")
    for stage in ("precompute", "train", "evaluate"):
        print(f"  {stage:<10} {result.stages[stage]:<8} {getattr(result, stage).out.uri}")
    print(
        f"\nFID per CFG point ({ev.results[0]['n_samples']} samples each, "
        "digit-classifier features):"
    )
    print_results(ev.results)
    print_where_to_look(result.config, result)
    if record_dir is not None:
        record = run_record(result, seconds, overrides, load, code)
        record_dir.mkdir(parents=True, exist_ok=True)
        path = record_dir / f"{record['date']}-demo.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"  run record      {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
