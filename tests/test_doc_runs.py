"""The docs quote the demo's numbers from the record its run wrote (issue 36).

`python -m flows.demo --record benchmarks/runs` writes benchmarks/runs/<date>-demo.json: its
best 1-NFE FID and ω, the real-data floor and the wall time, copied from the run's results.json.
README.md, docs/README.md and docs/getting-started.md give the demo's FID and time one way: the
newest record's, with its date.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORDS = sorted((ROOT / "benchmarks" / "runs").glob("*-demo.json"))
# Every page that states the demo's time; the pages that link the record state its FID too.
PAGES = {"README.md": True, "docs/README.md": False, "docs/getting-started.md": True}


def wall_time(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


@pytest.fixture(scope="module")
def record() -> dict:
    assert RECORDS, (
        "no benchmarks/runs/*-demo.json: run python -m flows.demo --record benchmarks/runs"
    )
    newest = json.loads(RECORDS[-1].read_text())
    assert RECORDS[-1].name == f"{newest['date']}-demo.json"
    return newest


def test_the_record_holds_a_run_of_committed_code(record):
    """What the docs quote came from a named commit, a fresh run (every stage computed), on a
    machine whose load was written down."""
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]) and record["changed"] == []
    assert set(record["stages"].values()) == {"computed"}
    assert record["wall_seconds"] > 0 and record["load"]["cpus"] >= 1
    assert len(record["load"]["loadavg_before"]) == 3 == len(record["load"]["loadavg_after"])
    assert 0 < record["real_data_floor"] < record["best"]["fid"] < record["class_mean_ceiling"]


@pytest.mark.parametrize("page", PAGES)
def test_each_page_quotes_the_record(page, record):
    text = " ".join((ROOT / page).read_text().split())  # as rendered: line breaks are spaces
    assert record["date"] in text
    assert wall_time(record["wall_seconds"]) in text
    if PAGES[page]:
        assert f"benchmarks/runs/{RECORDS[-1].name}" in text
        assert f"FID **{record['best']['fid']:.2f}** at ω {record['best']['omega']:g}" in text
        assert f"real-data floor of **{record['real_data_floor']:.2f}**" in text


@pytest.mark.parametrize("page", PAGES)
def test_every_make_demo_line_gives_the_records_time(page, record):
    """One time for the demo: a `make demo` line that states a time states the record's."""
    lines = [line for line in (ROOT / page).read_text().splitlines() if "make demo" in line]
    times = [m.group(0) for line in lines for m in re.finditer(r"~?\d+(\.\d+)? min( \d+ s)?", line)]
    assert set(times) <= {wall_time(record["wall_seconds"])}, f"{page}: {times}"


def test_the_demo_record_copies_the_results_file(tmp_path):
    """`flows.demo --record`: the best point and calibration as the run's results.json holds
    them (here a stand-in file), with the code and the machine's load."""
    from types import SimpleNamespace

    from flows.demo import parse_args, run_record
    from tasks.evaluate import EvalResult
    from tasks.provenance import CodeState

    point = {"omega": 1.0, "t_min": 0.0, "t_max": 1.0, "is": 9.0, "accuracy": 0.9, "n_samples": 8}
    calibration = {"real_data_floor": {"fid": 2.5}, "class_mean_ceiling": {"fid": 150.0}}
    rows = [
        point | calibration | {"fid": 20.0, "best": False, "many_step": {"steps": 32, "fid": 6.0}},
        point | calibration | {"omega": 1.25, "fid": 9.5, "best": True},
    ]
    evaluation = EvalResult(tmp_path / "evaluate" / "k", "k", True, 0, rows)
    evaluation.out.write_json("results.json", rows)
    result = SimpleNamespace(evaluate=evaluation, stages={"train": "computed"})
    overrides, folder = parse_args(["train.steps=10", "--record", "benchmarks/runs"])
    assert (overrides, folder) == (["train.steps=10"], Path("benchmarks/runs"))
    load = {"cpus": 2, "loadavg_before": (0.5, 0.4, 0.3), "loadavg_after": (2.0, 1.0, 0.5)}
    record = run_record(result, 61.2, overrides, load, CodeState("a" * 40, (), ""))
    assert record["best"] == {
        k: rows[1][k] for k in ("omega", "t_min", "t_max", "fid", "is", "accuracy")
    }
    assert (record["real_data_floor"], record["class_mean_ceiling"]) == (2.5, 150.0)
    assert record["many_step"] == {"omega 1 [0, 1]": {"steps": 32, "fid": 6.0}}
    assert record["command"] == "python -m flows.demo train.steps=10"
    assert (record["commit"], record["wall_seconds"], record["load"]) == ("a" * 40, 61.2, load)
    assert wall_time(record["wall_seconds"]) == "1 min 1 s"
