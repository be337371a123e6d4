"""Two Ray nodes that share nothing but the object store (issue 38): each node's workers run in
a working directory, a temporary folder and a node cache of its own, none of them the
driver's, and hold no credentials; every output is in the S3 store (SeaweedFS, started by the
session). A two-worker training, one rank per node, with its in-run evaluation, then the final
evaluation on an actor per node; then the same training with one node lost mid-run (its raylet
and workers killed, its folders wiped, the node started again): Ray Train restarts the worker
group and the run completes from the store's checkpoint with the loss history of the first.

A background scenario (tests/conftest.py): the whole of it runs as this file's own process, with
an S3 server, an MLflow server and a Ray of its own, beside the session's other tests; its
assertions are that process's, and the test reads its exit.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import (
    BUCKET,
    RayNode,
    free_port,
    mlflow_server,
    ray_nodes,
    ray_temp_dir,
    s3_server,
    stop,
)
from test_train import history

from tasks.artifacts import Manifest
from tasks.storage import Output, Store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
TINY = [
    "precompute.classifier_steps=50",  # the in-run and final evaluations' features
    f"train.steps={STEPS}",
    "train.batch_size=16",
    "train.num_workers=2",
    "train.placement_strategy=STRICT_SPREAD",  # one rank per node
    "train.checkpoint_every=4",
    "train.eval_every=4",
    "train.log_every=1",
    "train.max_failures=1",
    "eval.during_samples=20",
    "eval.during_points=[[1.0,0.0,1.0]]",
    "eval.omegas=[1.0]",
    "eval.n_samples=40",
    "eval.shard_size=20",
    "eval.batch_size=20",
    "eval.many_steps=0",
    "eval.grid_per_class=0",
    "eval.workers=2",  # an actor per node
]

REGISTERED = "ray/run/checkpoint_manager_snapshot.json"  # Ray Train's, once it has a checkpoint

# The driver: the stages as a command runs them, then where each node's workers run (a task
# pinned to each node). Its last line is the JSON the test reads.
DRIVER = """
import json, os, sys, tempfile
from tasks.config import load_config
from tasks.evaluate import EvalJob, evaluate
from tasks.precompute import PrecomputeJob, precompute
from tasks.train import TrainJob, train

cfg = load_config("smoke", sys.argv[2:])
pre = precompute(PrecomputeJob.of(cfg))
trained = train(TrainJob.of(cfg, pre))
seen = {"train": str(trained.path), "run_id": trained.mlflow_run_id, "steps": trained.steps}
if sys.argv[1] == "evaluate":
    seen["evaluate"] = str(evaluate(EvalJob.of(cfg, pre), trained).path)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On

    def where():
        return os.getcwd(), tempfile.gettempdir(), os.environ.get("IMF_CACHE_DIR", "")

    task = ray.remote(num_cpus=0)(where)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    pinned = [task.options(scheduling_strategy=On(n, soft=False)) for n in nodes]
    seen["nodes"] = ray.get([t.remote() for t in pinned])
print(json.dumps(seen))
"""


def folders(home: Path) -> dict[str, str]:
    """A machine's own folders under `home` (work, tmp, cache), made; its environment."""
    for name in ("work", "tmp", "cache"):
        (home / name).mkdir(parents=True, exist_ok=True)
    return {"TMPDIR": str(home / "tmp"), "IMF_CACHE_DIR": str(home / "cache")}


def driver(cluster, home: Path, what: str, overrides: list[str]) -> subprocess.Popen:
    """The driver, in `home`'s empty working directory with its own scratch, the store's
    variables in its environment (the test's, set by s3_root)."""
    store_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env = cluster.env | store_env | folders(home) | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, what, *overrides],
        cwd=home / "work",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # stopped as a group (services.stop)
    )


def finished(proc: subprocess.Popen) -> tuple[dict, str]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    return json.loads(out.strip().splitlines()[-1]), out


def inrun_fids(training: Output) -> list[float]:
    names = training.list("during/*/step*/results.json")
    return [p["fid"] for name in names for p in training.read_json(name)["points"]]


def nodes_that_share_nothing(directory: Path) -> None:
    """The scenario, in its own process: its own S3 server, whose variables it sets as
    s3_root does for a test."""
    with s3_server(directory / "s3") as s3:
        os.environ.update(s3.env | {"IMF_CACHE_DIR": str(directory / "driver-cache")})
        train_evaluate_and_lose_a_node(f"s3://{BUCKET}/two-nodes/artifacts", directory)


def train_evaluate_and_lose_a_node(s3_root: str, directory: Path) -> None:
    store = Store.of(s3_root)
    homes = [directory / "node0", directory / "node1"]
    # The nodes' environment: none of the store's credentials (the job carries the launcher's)
    # and none of the driver's folders.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env = env | {"PYTHONPATH": str(ROOT)}
    env.pop("IMF_CACHE_DIR", None)
    port = free_port()
    server = mlflow_server(
        port,
        f"sqlite:///{directory}/mlflow.db",
        directory / "mlflow.log",
        f"{s3_root}/mlflow",  # the runs' artifacts through the server's proxy, to the store
        env={"MLFLOW_S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]},
    )
    uri = f"http://127.0.0.1:{port}"
    with server, ray_temp_dir() as temp:
        nodes = [
            RayNode(home / "work", folders(home), (f"--temp-dir={temp}/n{i}",))
            for i, home in enumerate(homes)
        ]
        with ray_nodes(temp, nodes, env, directory) as cluster:
            overrides = [
                f"paths.artifacts={s3_root}",
                f"tracking.uri={uri}",
                f"train.ray_address={cluster.address}",
                *TINY,
            ]
            first, _ = finished(driver(cluster, directory / "driver", "evaluate", overrides))
            # Each node's workers ran in its own folders, none of them the driver's, and read
            # what they needed through the store into their own cache: the training data, the
            # classifier (both ranks evaluate during training), the trained weights (an
            # evaluation actor on each node).
            assert sorted(map(tuple, first["nodes"])) == [
                (str(h / "work"), str(h / "tmp"), str(h / "cache")) for h in homes
            ]
            for home in homes:
                cached = {p.name for p in (home / "cache").rglob("*") if p.is_file()}
                assert {"classifier.pt", "ema.safetensors", "_SUCCESS"} <= cached, cached
                assert any(name.endswith(".parquet") for name in cached), cached

            # The same training again, from nothing: the first one's output kept aside.
            training = Output.at(first["train"])
            kept = store.output("kept", training.name)
            training.move_to(kept)
            second = driver(cluster, directory / "driver2", "train", overrides)
            try:
                # Node 1 lost once Ray Train has registered a checkpoint in the store: its
                # raylet and workers killed, its folders gone with it; then started again.
                deadline = time.time() + 240
                while not training.exists(REGISTERED) and second.poll() is None:
                    assert time.time() < deadline, "no checkpoint registered"
                    time.sleep(0.2)
                cluster.kill(1)
                shutil.rmtree(homes[1])
                folders(homes[1])
                cluster.start(1)
                again, printed = finished(second)
            finally:
                stop(second, signals=(signal.SIGKILL,), grace=1)
        clean, lost = history(uri, first["run_id"], "loss"), history(uri, again["run_id"], "loss")

    # Every output in the store, whole and verified, the in-run evaluations' beside them; the
    # final evaluation names the weights by their URI, not by a node's copy.
    assert first["steps"] == again["steps"] == STEPS
    for location in (kept.uri, first["evaluate"], again["train"]):
        assert location.startswith(f"{s3_root}/")
        out = Output.at(location)
        done = Manifest.read(out)
        assert done is not None and all(f.valid_in(out, "sha256") for f in done.files)
    assert len(kept.list("during/*/step*/results.json")) == 2  # at steps 4 and 8
    results = Output.at(first["evaluate"]).read_json("results.json")
    assert results[0]["weights"] == f"{first['train']}/ema.safetensors"
    # Nothing of the run in any working directory: only the store and scratch hold it.
    for home in (directory / "driver", directory / "driver2", *homes):
        assert not list((home / "work").iterdir()), home

    # Node 1 lost: Ray Train restarted the group, which resumed from the store's checkpoint
    # (not from step 0) and trained on with the numbers of the uninterrupted run.
    resumed = [int(s) for s in re.findall(r"resumed from the checkpoint of step (\d+)", printed)]
    assert len(resumed) == 1 and 0 < resumed[0] < STEPS, printed[-5000:]
    assert sorted(lost) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in lost.values())
    for step in clean:
        assert lost[step][0] == pytest.approx(clean[step][0], rel=1e-5)
    assert inrun_fids(Output.at(again["train"])) == pytest.approx(inrun_fids(kept), rel=1e-6)


def two_nodes_apart(directory: Path) -> subprocess.CompletedProcess:
    """The scenario as this file's own process (its environment its own)."""
    return subprocess.run(
        [sys.executable, __file__, str(directory)],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )


@pytest.mark.background(scenario=two_nodes_apart)
def test_nodes_that_share_nothing_train_evaluate_and_survive_a_lost_node(background):
    done = background
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-6000:])
    assert done.stdout.strip().splitlines()[-1] == "shared nothing, lost a node, lost nothing"


if __name__ == "__main__":
    nodes_that_share_nothing(Path(sys.argv[1]))
    print("shared nothing, lost a node, lost nothing")
