"""infra/slurm/imf.sbatch on a real SLURM (tests/slurm.py): the smoke pipeline as a batch job,
recorded where the environment says; a job stopped by SIGTERM mid-training checkpoints,
requeues itself and resumes with the losses of a run never stopped; nothing of Ray outlives
a job."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient
from services import service, started_together
from slurm import available, slurm_cluster
from test_integration import prefect_runs
from test_preemption import GRACE, journal_steps, losses

from tasks.cluster import free_port

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "slurm" / "imf.sbatch"
STEPS = 60
# The training job is stopped twice: after step 10 by SIGTERM to every process of the job (as
# the time limit's or preemption's last signal), after step 30 by SIGTERM to its steps only (as
# preemption's first, within GraceTime)
STOPS = [(10, ["--full"]), (30, [])]
# One training config for both jobs (the same content key): the pipeline's run is the
# stopped training's run never stopped. FID on 100 samples: the pipeline's last stage, fast.
CONFIG = [
    "-e",
    "smoke",
    f"train.steps={STEPS}",
    "train.batch_size=16",
    "train.log_every=1",
    "train.eval_every=0",
    "train.checkpoint_every=1000",  # no periodic checkpoint before the end
    f"train.preempt_grace_s={GRACE}",
    "precompute.classifier_steps=50",
    "eval.n_samples=100",
    "eval.shard_size=100",
    "eval.omegas=[1.0]",
    "eval.grid_per_class=0",
    "eval.calibrate=false",
    "eval.many_steps=0",
]


BIN = Path(sys.executable).parent


def submit(cluster, root: Path, command: str, prefect_port: int, nodes: int) -> str:
    """`sbatch imf.sbatch <command> ...` with the settings a team exports: tracking URI,
    Prefect server and artifact root (`root`/m.db, `root`/a, as test_preemption's helpers read
    them). One CPU a node: the jobs run side by side on this machine's two."""
    root.mkdir(parents=True)
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/m.db",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "IMF_ARTIFACTS": str(root / "a"),
        "IMF_RAY_PORT": str(free_port()),
        "PREFECT_HOME": str(root / "prefect"),
    }
    args = [f"--nodes={nodes}", "--oversubscribe", "--cpus-per-task=1", f"--output={root}/job.out"]
    return cluster.sbatch(*args, str(SCRIPT), command, *CONFIG, env=env)


def output(root: Path) -> str:
    """What a job printed (both runs of a requeued one)."""
    path = root / "job.out"
    return path.read_text() if path.exists() else ""


def ray_left(job_id: str) -> list[str]:
    """The command lines of processes still running from the job's Ray (its RAY_TMPDIR)."""
    left = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"/tmp/imf-ray-{job_id}/" in cmdline:
            left.append(cmdline[:120])
    return left


def stop(cluster, job_id: str, root: Path, at: int, how: list[str], n: int) -> SimpleNamespace:
    """`scancel --signal=TERM <how>` once the job's training journaled step `at`; when the job
    is back in the queue (its `n`th requeue), what the stop left: the step reached, the newest
    checkpoint's, the MLflow run's status (read before the next run moves on)."""
    deadline = time.monotonic() + 600
    while journal_steps(root) < at:
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), output(root)
        assert time.monotonic() < deadline, "the training did not get going"
        time.sleep(0.2)
    cluster.command("scancel", "--signal=TERM", *how, job_id)
    while int(cluster.job(job_id)["Restarts"]) < n:
        assert time.monotonic() < deadline, output(root)
        time.sleep(0.2)
    (train_dir,) = (root / "a" / "train").iterdir()
    run_id = (train_dir / "mlflow_run_id").read_text().strip()
    checkpoints = sorted((train_dir / "ray" / "run").glob("checkpoint_*/state.pt"))
    return SimpleNamespace(
        at=at,
        dir=train_dir,
        run_id=run_id,
        status=MlflowClient(f"sqlite:///{root}/m.db").get_run(run_id).info.status,
        reached=int((train_dir / "STOPPED").read_text()),
        saved=torch.load(checkpoints[-1], weights_only=True)["step"],
    )


def slurm_jobs(tmp: Path) -> SimpleNamespace:
    """Two batch jobs side by side on a two-node SLURM: `imf run` of the smoke pipeline on both
    nodes (a Ray head and a Ray worker), and `imf train` of the same training on one, stopped
    twice (STOPS), which requeues itself and resumes each time. What each left: SLURM's record,
    its output, MLflow's and Prefect's runs, each stop's step and checkpoint, Ray's
    processes."""
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    run_root, train_root = tmp / "run", tmp / "train"
    port = free_port()
    prefect = service(
        [str(BIN / "prefect"), "server", "start", "--host=127.0.0.1", f"--port={port}"],
        f"http://127.0.0.1:{port}/api/health",
        tmp / "prefect.log",
        env=os.environ | {"PREFECT_HOME": str(tmp / "prefect-server")},
    )
    with started_together(slurm_cluster(tmp / "slurm"), prefect) as (cluster, _):
        run_id = submit(cluster, run_root, "run", port, nodes=2)
        train_id = submit(cluster, train_root, "train", port, nodes=1)
        stops = [
            stop(cluster, train_id, train_root, at, how, n) for n, (at, how) in enumerate(STOPS, 1)
        ]
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        run_job = cluster.wait(run_id, *ended, timeout=600)
        train_job = cluster.wait(train_id, *ended, timeout=600)
        flows = prefect_runs(f"http://127.0.0.1:{port}/api", "")  # no auth on this server
    return SimpleNamespace(
        prefect=flows,
        run=SimpleNamespace(
            root=run_root, job=run_job, out=output(run_root), left=ray_left(run_id)
        ),
        train=SimpleNamespace(
            root=train_root,
            job=train_job,
            out=output(train_root),
            left=ray_left(train_id),
            stops=stops,
        ),
    )


@pytest.mark.background(scenario=slurm_jobs)
def test_the_smoke_pipeline_runs_as_a_batch_job_recorded_where_the_environment_says(background):
    run = background.run
    assert (run.job["JobState"], run.job["ExitCode"]) == ("COMPLETED", "0:0"), run.out
    assert "imf.sbatch: 2 Ray node(s) up" in run.out  # a head and a worker, on the two nodes
    assert "imf.sbatch: imf exited with 0" in run.out and "imf.sbatch: Ray stopped" in run.out
    assert background.prefect["flow_runs"] == {"imf-pipeline": ["COMPLETED"]}  # PREFECT_API_URL
    for stage in ("precompute", "train", "evaluate"):
        (done,) = (run.root / "a" / stage).glob("*/_SUCCESS")
        assert f"{stage}: computed {done.parent}" in run.out
    client = MlflowClient(f"sqlite:///{run.root}/m.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.tags["stage"] for r in runs} >= {"train", "evaluate"}
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.background(scenario=slurm_jobs)
def test_a_job_stopped_by_sigterm_requeues_itself_and_resumes_the_run_never_stopped(background):
    """Stopped by `scancel --signal=TERM --full`, then by `scancel --signal=TERM`: each time
    a checkpoint at the step reached, a requeue, a run that starts from that checkpoint."""
    train, stops = background.train, background.train.stops
    assert (train.job["JobState"], train.job["ExitCode"]) == ("COMPLETED", "0:0"), train.out
    assert train.job["Restarts"] == str(len(stops))
    runs = re.split(r"imf\.sbatch: job \d+ \(run \d+\)", train.out)[1:]
    assert len(runs) == len(stops) + 1, train.out
    for stopped, before, after in zip(stops, runs[:-1], runs[1:], strict=True):
        assert "imf train: preempted (SIGTERM): stopped; relaunch to resume" in before
        assert "imf exited with 143" in before and "imf.sbatch: requeueing job" in before
        assert stopped.at <= stopped.reached < STEPS
        assert stopped.saved == stopped.reached  # a checkpoint at the step reached
        assert stopped.status == "KILLED"
        steps = [int(s) for s in re.findall(rf"step (\d+)/{STEPS} ", after)]
        assert steps[0] == stopped.reached + 1, after  # the next run starts from it
    assert [int(s) for s in re.findall(rf"step (\d+)/{STEPS} ", runs[-1])][-1] == STEPS

    stopped = stops[0]
    (clean_dir,) = (background.run.root / "a" / "train").iterdir()
    assert clean_dir.name == stopped.dir.name  # the same training
    mine = losses(train.root, stopped.run_id)
    theirs = losses(background.run.root, (clean_dir / "mlflow_run_id").read_text().strip())
    assert sorted(mine) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in mine.values())
    for step in mine:
        assert mine[step][0] == pytest.approx(theirs[step][0], rel=1e-5)
    final = MlflowClient(f"sqlite:///{train.root}/m.db").get_run(stopped.run_id)
    assert final.info.status == "FINISHED"


@pytest.mark.background(scenario=slurm_jobs)
def test_no_ray_process_outlives_its_job(background):
    for job in (background.run, background.train):
        assert job.left == [], job.left
        assert job.out.count("imf.sbatch: Ray stopped") == int(job.job["Restarts"]) + 1


def test_the_batch_script_is_valid_bash_and_refuses_to_run_outside_a_job():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True)
        assert check.returncode == 0, check.stdout.decode()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(SCRIPT), "run"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "not in a SLURM job: submit it with sbatch" in out.stderr


REPEATED_SIGTERM = """
import os, signal, time
from tasks import preemption
preemption.install(grace_s=60)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
print("still stopping", flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(30)
"""


def test_a_repeated_sigterm_changes_nothing_and_a_ctrl_c_after_it_ends_at_once():
    """SLURM sends SIGTERM more than once (`scancel --full` reaches a batch job's command
    directly and through imf.sbatch): the stop under way goes on, within its grace; an
    impatient Ctrl-C still ends the command at once."""
    out = subprocess.run(
        [sys.executable, "-c", REPEATED_SIGTERM], capture_output=True, text=True, timeout=60
    )
    assert "still stopping" in out.stdout, out.stdout + out.stderr
    assert out.stdout.count("stopping at the next step boundary") == 1
    assert out.returncode == 143  # the first signal's code, at once (no 30 s sleep)
