"""SIGTERM (a scheduler's preemption) and SIGINT: checkpoint at the step reached, end cleanly
within the grace, resume with the losses of a run never stopped; nothing of a sweep left."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tasks.preemption import descendants

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
GRACE = 30


def launch(root: Path, *args: str) -> subprocess.Popen:
    env = os.environ | {"PREFECT_HOME": str(root / "prefect")}
    return subprocess.Popen(
        [str(BIN / "imf"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def journal_steps(root: Path) -> int:
    """The last training step rank 0 journaled (0 before the first)."""
    steps = [0]
    for journal in root.glob("a/train/*/mlflow_journal.jsonl"):
        for line in journal.read_text().splitlines():
            try:
                steps.append(json.loads(line).get("step", 0))
            except json.JSONDecodeError:
                pass
    return max(steps)


def wait_for_step(proc: subprocess.Popen, root: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while journal_steps(root) < step:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the training did not get going"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> tuple[int, float, str]:
    """SIGTERM to the command (as a scheduler sends it); its exit code, seconds, output."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=GRACE + 30)
    return proc.returncode, time.monotonic() - sent, out


def common(root: Path) -> list[str]:
    return [
        f"paths.artifacts={root}/a",
        f"tracking.uri=sqlite:///{root}/m.db",
        "train.batch_size=16",
        "train.log_every=1",
        "train.checkpoint_every=1000",  # no periodic checkpoint before the end
        f"train.preempt_grace_s={GRACE}",
    ]


def losses(root: Path, run_id: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in MlflowClient(f"sqlite:///{root}/m.db").get_metric_history(run_id, "train/loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


def test_sigterm_checkpoints_the_step_reached_and_the_resume_matches_a_run_never_stopped(
    tmp_path,
):
    steps = ["train.steps=120", "precompute.classifier_steps=0", "train.eval_every=0"]  # no FID
    root = tmp_path / "stopped"
    proc = launch(root, "train", "-e", "smoke", *common(root), *steps)
    wait_for_step(proc, root, 40)
    code, seconds, out = stop(proc)
    assert code == 128 + signal.SIGTERM, out
    assert seconds < GRACE, out
    assert "preempted (SIGTERM): stopped; relaunch to resume" in out
    (train_dir,) = (root / "a" / "train").iterdir()
    reached = int((train_dir / "STOPPED").read_text())
    assert 40 <= reached < 120
    checkpoints = sorted((train_dir / "ray" / "run").glob("checkpoint_*/state.pt"))
    saved = torch.load(checkpoints[-1], weights_only=True)["step"]
    assert saved == reached  # the step reached, not only a periodic one (there was none)
    run_id = (train_dir / "mlflow_run_id").read_text().strip()
    run = MlflowClient(f"sqlite:///{root}/m.db").get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "preempted (SIGTERM)"

    resumed = launch(root, "train", "-e", "smoke", *common(root), *steps)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    clean_root = tmp_path / "clean"
    clean = launch(clean_root, "train", "-e", "smoke", *common(clean_root), *steps)
    out, _ = clean.communicate(timeout=600)
    assert clean.returncode == 0, out
    (clean_dir,) = (clean_root / "a" / "train").iterdir()
    assert clean_dir.name == train_dir.name  # the same training

    mine = losses(root, run_id)
    theirs = losses(clean_root, (clean_dir / "mlflow_run_id").read_text().strip())
    assert sorted(mine) == list(range(1, 121)) and all(len(v) == 1 for v in mine.values())
    for step in mine:
        assert mine[step][0] == pytest.approx(theirs[step][0], rel=1e-5)
    a, b = load_file(train_dir / "ema.safetensors"), load_file(clean_dir / "ema.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert MlflowClient(f"sqlite:///{root}/m.db").get_run(run_id).info.status == "FINISHED"


SWEEP = """
title: "a sweep to stop"
columns: ["FID"]
scales:
  smoke: {experiment: smoke, overrides: [train.steps=2000, "eval.omegas=[1.0]"]}
variants:
  - {name: one, row: one, overrides: [], cells: {"FID": {metric: fid_best}}}
  - {name: two, row: two, overrides: [train.seed=1], cells: {"FID": {metric: fid_best}}}
"""


def test_sigterm_to_a_sweep_leaves_no_process_and_ends_its_runs(tmp_path):
    sweep_file = tmp_path / "stop.yaml"
    sweep_file.write_text(SWEEP)
    args = [str(sweep_file), "--scale", "smoke", "--concurrency", "2", *common(tmp_path)]
    proc = launch(tmp_path, "sweep", *args)
    wait_for_step(proc, tmp_path, 10)
    family = set(descendants(proc.pid))  # Ray's processes, Prefect's server, the workers
    assert family
    code, seconds, out = stop(proc)
    assert code == 128 + signal.SIGTERM and seconds < GRACE, out
    left = [pid for pid in family if Path(f"/proc/{pid}").exists()]
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]

    runs = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (parent,) = runs.search_runs(
        [e.experiment_id for e in runs.search_experiments()], "tags.stage = 'sweep'"
    )
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == "preempted (SIGTERM)"
    trainings = runs.search_runs([parent.info.experiment_id], "tags.stage = 'train'")
    assert {r.info.status for r in trainings} == {"KILLED"}
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        states = {row[0] for row in db.execute("select state_type from flow_run")}
    assert states <= {"CRASHED", "CANCELLED"}, states
