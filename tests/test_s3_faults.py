"""The object store going away mid-run (issue 38): a SeaweedFS of this module's own (the
session's stays up for the other tests), SIGKILLed after a training's first checkpoint and
started again on the same ports and data. Back within the retries, the training goes on; past
them, the stage fails in one line naming the store, and the relaunch resumes from the last
checkpoint in the store. Both with the losses of a run the store never left."""

import functools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from services import BUCKET, s3_server
from test_train import history

from tasks import lease
from tasks.config import load_config
from tasks.precompute import PrecomputeJob, precompute
from tasks.storage import Store, StoreAway
from tasks.train import TrainJob, train

pytestmark = pytest.mark.slow

STEPS, EVERY = 24, 8
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints
FAST = [
    f"train.steps={STEPS}",
    f"train.checkpoint_every={EVERY}",
    "train.keep_checkpoints=10",  # every checkpoint kept: which steps the launches saved
    "train.batch_size=16",
    "train.log_every=1",
    "train.eval_every=0",
    "precompute.classifier_steps=0",
]


def config(root: str, tmp_path: Path, *overrides: str):
    return load_config(
        "smoke",
        [f"paths.artifacts={root}", f"tracking.uri=sqlite:///{tmp_path}/m.db", *FAST, *overrides],
    )


def uninterrupted(root: Path) -> dict[int, list[float]]:
    """The losses of the same training in a local folder, which no server's kill reaches."""
    cfg = config(str(root), root)
    result = train(TrainJob.of(cfg, precompute(PrecomputeJob.of(cfg))))
    return history(cfg.tracking.uri, result.mlflow_run_id, "loss")


@pytest.fixture(scope="module")
def store(tmp_path_factory, local_ray):
    """This module's server, this process's AWS_ environment pointing at it, the smoke data
    precomputed in it once, and the losses of a run the store never left (`clean`, trained
    beside the first test's: a Future)."""
    folder = tmp_path_factory.mktemp("seaweedfs-faults")
    with s3_server(folder) as server, pytest.MonkeyPatch.context() as env:
        for name, value in server.env.items():
            env.setenv(name, value)
        env.setenv("IMF_CACHE_DIR", str(folder / "node-cache"))
        pre = precompute(PrecomputeJob.of(config(f"s3://{BUCKET}/data", folder)))
        with ThreadPoolExecutor(1) as pool:
            clean = pool.submit(uninterrupted, tmp_path_factory.mktemp("clean"))
            yield SimpleNamespace(server=server, pre=pre, clean=clean)


def kill_at_first_checkpoint(server, root: str, restart: bool) -> SimpleNamespace:
    """A thread that SIGKILLs the server once Ray Train has recorded the first checkpoint of a
    training under `root` in the store (its checkpoint manager's snapshot: what a relaunch
    resumes from) and, with `restart`, starts it again at once; what it saw then."""
    seen = SimpleNamespace(checkpoints=None, finished=None, thread=None)
    store = Store.of(root)

    def recorded() -> list:
        found = store.glob("train", f"*/ray/run/{SNAPSHOT}")
        if not found:
            return []
        return json.loads(store.read_bytes(f"train/{found[0]}"))["checkpoint_results"]

    def watch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and seen.checkpoints is None:
            if checkpoints := recorded():
                seen.finished = store.glob("train", "*/_SUCCESS")
                server.kill()
                seen.checkpoints = checkpoints
                if restart:
                    server.start()
            time.sleep(0.05)

    seen.thread = threading.Thread(target=watch, daemon=True)
    seen.thread.start()
    return seen


def saved_steps(root: str) -> list[int]:
    """The step of every checkpoint in the store, sorted."""
    store = Store.of(root)
    steps = []
    for name in store.glob("train", "*/ray/run/checkpoint_*/state.pt"):
        state = torch.load(store.local_path(f"train/{name}"), weights_only=True)
        steps.append(state["step"])
    return sorted(steps)


def assert_losses_of_a_clean_run(cfg, result, clean) -> None:
    loss = history(cfg.tracking.uri, result.mlflow_run_id, "loss")
    assert sorted(loss) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in loss.values())
    clean = clean.result()
    for step in loss:  # each step once, with the numbers of a run the store never left
        assert loss[step][0] == pytest.approx(clean[step][0], rel=1e-5)


def test_a_store_back_within_the_retries_costs_the_training_nothing(store, tmp_path, monkeypatch):
    # boto3 draws its backoff waits at random: 12 attempts outlast a restart (~5 s) always, the
    # default 8 on most draws only
    monkeypatch.setenv("IMF_S3_RETRIES", "12")
    root = f"s3://{BUCKET}/outage"
    killer = kill_at_first_checkpoint(store.server, root, restart=True)
    cfg = config(root, tmp_path)
    result = train(TrainJob.of(cfg, store.pre))
    killer.thread.join()
    assert len(killer.checkpoints) < STEPS // EVERY and not killer.finished  # killed mid-run
    assert result.computed and result.steps == STEPS
    assert saved_steps(root) == list(range(EVERY, STEPS + 1, EVERY))
    assert_losses_of_a_clean_run(cfg, result, store.clean)


def test_past_the_retries_the_stage_fails_in_one_line_and_the_relaunch_resumes(
    store, tmp_path, monkeypatch
):
    monkeypatch.setenv("IMF_S3_RETRIES", "2")
    # The failed launch cannot release its lease (the store is away). A relaunch from a new
    # process on this host takes it over at once (its holder is gone); this test relaunches
    # from the same, living process, which waits for it to expire: a short lease.
    monkeypatch.setattr(lease, "Lease", functools.partial(lease.Lease, seconds=3))
    root = f"s3://{BUCKET}/failed"
    killer = kill_at_first_checkpoint(store.server, root, restart=False)
    cfg = config(root, tmp_path, "train.max_failures=0")
    with pytest.raises(StoreAway) as failed:
        train(TrainJob.of(cfg, store.pre))
    killer.thread.join()
    assert len(killer.checkpoints) < STEPS // EVERY and not killer.finished  # killed mid-run
    message = str(failed.value)
    assert "\n" not in message and message.startswith("training ")
    assert f"paths.artifacts={root}: no S3 server answers at" in message
    assert store.server.env["AWS_ENDPOINT_URL"] in message and "IMF_S3_RETRIES" in message
    # the cleanups that met the dead store too are notes on the training's error, not errors
    notes = "\n".join(failed.value.__cause__.__notes__)
    assert "ending its MLflow run failed too" in notes and "releasing the lock" in notes

    store.server.start()
    result = train(TrainJob.of(cfg, store.pre))
    assert result.computed and result.steps == STEPS
    # The relaunch resumed from the failed launch's checkpoint: no step saved twice
    assert saved_steps(root) == list(range(EVERY, STEPS + 1, EVERY))
    assert_losses_of_a_clean_run(cfg, result, store.clean)
