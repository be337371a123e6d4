"""Training on Ray Train: DDP equals one worker, a killed worker resumes, reuse, MLflow, a
tracking outage (the NaN guard: tests/test_flows.py, a sweep's variant; two launches at once:
tests/test_preemption.py).

Real TorchTrainers on the session's local Ray (CPU, gloo), tens of seconds each: the data-parallel
fits run once, side by side, and several tests read them.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tasks.config import load_config
from tasks.precompute import PrecomputeJob, precompute
from tasks.train import TrainJob, train

pytestmark = pytest.mark.slow


def run(tmp_path: Path, *overrides: str):
    cfg = load_config(
        "smoke",
        [
            f"paths.artifacts={tmp_path}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "train.batch_size=16",
            "train.log_every=1",
            "precompute.classifier_steps=0",  # evaluation's classifier is not needed here
            "train.eval_every=0",  # nor FID during training (tests/test_inrun_eval.py)
            *overrides,
        ],
    )
    pre = precompute(PrecomputeJob.of(cfg))
    return cfg, train(TrainJob.of(cfg, pre))


def history(uri: str, run_id: str, metric: str) -> dict[int, list[float]]:
    """Each step's values of the training metric `metric` of a run, in the tracking at `uri`."""
    out: dict[int, list[float]] = {}
    for m in MlflowClient(uri).get_metric_history(run_id, f"train/{metric}"):
        out.setdefault(m.step, []).append(m.value)
    return out


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory, local_ray) -> dict:
    """One training three ways, each in its own artifacts folder: on one worker, on two (each
    accumulating two micro-batches of 4, train.micro_batch), and on two whose last rank kills
    itself at step 6 (Ray restarts it from the step-4 checkpoint).
    Warmup in epochs (Tab. 4's unit): 1,797 digits / batch 16 = 113 steps an epoch (with 1 or
    2 workers), so 0.1 epoch = 11 warmup steps."""
    root = tmp_path_factory.mktemp("data_parallel")
    same = ["train.steps=12", "train.checkpoint_every=4"]
    same += ["optim.warmup_steps=0", "optim.warmup_epochs=0.1"]
    two = ["train.num_workers=2", "train.cpus_per_worker=1", "train.micro_batch=4"]
    fault = ["train.fault_at_step=6", "train.max_failures=1", "train.keep_checkpoints=2"]
    runs = {
        "one": (root / "one", *same, "train.num_workers=1"),
        "two": (root / "two", *same, *two),
        "killed": (root / "killed", *same, *two, *fault),
    }
    with ThreadPoolExecutor(len(runs)) as pool:  # side by side, as a sweep's variants train
        futures = {name: pool.submit(run, *args) for name, args in runs.items()}
    return {name: future.result() for name, future in futures.items()}


def test_ddp_matches_one_worker_and_finished_runs_are_reused(data_parallel):
    (cfg1, one), (cfg2, two) = data_parallel["one"], data_parallel["two"]
    assert one.key == two.key  # nor the worker count nor micro-batches change what is computed
    loss1, loss2 = (
        history(cfg1.tracking.uri, one.mlflow_run_id, "loss"),
        history(cfg2.tracking.uri, two.mlflow_run_id, "loss"),
    )
    assert sorted(loss1) == sorted(loss2) == list(range(1, 13))
    for step in loss1:  # same global batch, same noise: the same loss, to float precision
        assert loss2[step][0] == pytest.approx(loss1[step][0], rel=1e-4)
    for cfg, result in ((cfg1, one), (cfg2, two)):  # 11 warmup steps, then the full rate
        lr = history(cfg.tracking.uri, result.mlflow_run_id, "lr")
        expected = {s: 3e-3 * min(s / 11, 1.0) for s in lr}
        assert {s: v[0] for s, v in lr.items()} == pytest.approx(expected)
    w1, w2 = load_file(one.path / "ema.safetensors"), load_file(two.path / "ema.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5)

    client = MlflowClient(cfg2.tracking.uri)
    # named for what it trains (experiment, model, objective, seed), not a hash
    assert client.get_run(two.mlflow_run_id).info.run_name == "smoke tiny imf_aux seed 0"
    logged = client.get_run(two.mlflow_run_id).data
    assert logged.params["train.batch_size"] == "16" and logged.params["model.name"] == "tiny"
    names = {"loss", "mse_u", "loss_v", "grad_norm", "lr", "samples_per_s"}
    assert {f"train/{n}" for n in names} <= set(logged.metrics)
    assert [a.path for a in client.list_artifacts(two.mlflow_run_id, "samples")]
    # Where it came from: the code, the locked packages, torch, the device its workers used,
    # and the precompute output it read (MLflow's Dataset column).
    tags = logged.tags
    assert tags["mlflow.source.git.commit"] and tags["imf.git_dirty"] in ("true", "false")
    assert len(tags["imf.lock_sha256"]) == 64 and tags["imf.torch"] == torch.__version__
    assert tags["imf.device"] == "2 x cpu"  # sent by rank 0 through the journal
    (dataset,) = client.get_run(two.mlflow_run_id).inputs.dataset_inputs
    assert (
        dataset.dataset.name == "digits (pixel)" and '"num_rows": 1797' in dataset.dataset.profile
    )
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"

    pre = precompute(PrecomputeJob.of(cfg2))
    again = train(TrainJob.of(cfg2, pre))
    assert not again.computed and again.steps == 12 and again.path == two.path


def test_a_killed_worker_resumes_from_its_checkpoint(data_parallel):
    (cfg, result), (clean_cfg, clean) = data_parallel["killed"], data_parallel["two"]
    assert result.steps == 12 and (result.path / "fault_injected").read_text() == "6"
    kept = sorted(p.name for p in (result.path / "ray" / "run").glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2, kept  # 3 reported (steps 4, 8, 12): the oldest is gone
    loss = history(cfg.tracking.uri, result.mlflow_run_id, "loss")
    # Steps 5 and 6 ran before the kill and again after resuming from the step-4 checkpoint;
    # the MLflow record has every step exactly once ...
    assert sorted(loss) == list(range(1, 13)) and all(len(v) == 1 for v in loss.values()), loss
    # ... with the numbers of a run that was never killed (same data order and noise).
    clean_loss = history(clean_cfg.tracking.uri, clean.mlflow_run_id, "loss")
    for step in loss:
        assert loss[step][0] == pytest.approx(clean_loss[step][0], rel=1e-5)


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    import signal
    import subprocess
    import sys

    from tasks.storage import Output

    out = Output.at(tmp_path / "train" / "key")
    script = (
        "import time\nfrom tasks.storage import Output\n"
        f"with Output.at({str(out.path)!r}).lock('x'):\n"
        "    print('held', flush=True)\n    time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    waited: list[str] = []  # what the lock says when it has to wait for a holder
    with out.lock("training", say=waited.append):
        assert waited == []  # the kernel released the dead holder's lock: taken at once


def test_a_tracking_outage_mid_run_loses_nothing(tmp_path, local_ray):
    """The MLflow server is SIGKILLed while a training runs: the training still ends with
    `_SUCCESS`; once the server is back, the next command's replay completes the record."""
    import threading

    from services import free_port, mlflow_server, stop

    from tasks.journal import JOURNAL, read_journal
    from tasks.storage import Output
    from tasks.tracking import prepare

    port, store = free_port(), f"sqlite:///{tmp_path}/server.db"
    uri = f"http://127.0.0.1:{port}"

    def server(log: str):
        return mlflow_server(port, store, tmp_path / log, tmp_path / "mlflow-artifacts")

    steps = 40
    overrides = [f"tracking.uri={uri}", f"train.steps={steps}", "train.checkpoint_every=10"]
    killed = threading.Event()
    with server("mlflow-1.log") as first:

        def kill_after_a_few_steps() -> None:
            deadline = time.time() + 300
            while time.time() < deadline:
                journals = list((tmp_path / "train").glob(f"*/{JOURNAL}"))
                if journals and len(read_journal(Output.at(journals[0].parent))) >= 5:
                    stop(first)
                    killed.set()
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_after_a_few_steps, daemon=True)
        watcher.start()
        cfg, result = run(tmp_path, *overrides)
        watcher.join()
    assert killed.is_set()
    assert (result.path / "_SUCCESS").is_file() and result.steps == steps
    records = read_journal(result.out)
    assert [r["step"] for r in records if "step" in r] == list(range(1, steps + 1))
    assert records[-1]["end"] == "FINISHED"
    sent_file = result.path / "mlflow_journal.sent"

    def sent() -> int:
        return int(sent_file.read_text()) if sent_file.is_file() else 0

    assert sent() < len(records)  # the outage kept some back

    with server("mlflow-2.log"):
        prepare(cfg)  # what every command does first
        assert sent() == len(records)
        loss = history(cfg.tracking.uri, result.mlflow_run_id, "loss")
        assert sorted(loss) == list(range(1, steps + 1)) and all(len(v) == 1 for v in loss.values())
        run_info = MlflowClient(uri).get_run(result.mlflow_run_id)
        assert run_info.info.status == "FINISHED" and "error" not in run_info.data.tags
        assert [a.path for a in MlflowClient(uri).list_artifacts(result.mlflow_run_id, "samples")]


def test_known_ray_messages_stay_dropped_after_ray_trains_logging_setup():
    """Ray Train's controller runs dictConfig on `ray.train` after our worker hook, resetting
    the level of every logger under it: the filters must survive and drop only the known line;
    a local Ray's own (DROPPED_ON_ONE_MACHINE) only where LOCAL_RAY says the Ray is local.
    (In a subprocess: dictConfig would rewire this test session's own loggers.)"""
    import subprocess
    import sys

    script = """
import logging, logging.config
from tasks.cluster import DROPPED, DropMessage, drop_known_messages
drop_known_messages(); drop_known_messages()
name = "ray.train.v2._internal.callbacks.placement_group_callback"
logger = logging.getLogger(name)
logger.setLevel(logging.CRITICAL)
logging.config.dictConfig({"version": 1, "disable_existing_loggers": False, "loggers": {
    "ray.train": {"level": "DEBUG", "handlers": [], "propagate": False}}})
assert logger.level == logging.NOTSET  # what made a level useless
record = lambda msg: logger.makeRecord(name, logging.ERROR, "f", 1, msg, None, None)
assert not logger.filter(record(DROPPED[name] + "."))
assert logger.filter(record("Failed to launch PlacementGroupCleaner: boom"))
assert sum(isinstance(f, DropMessage) for f in logger.filters) == 1
# A local Ray's own messages: kept on a cluster, dropped in the processes of a local Ray.
import os
from tasks.cluster import DROPPED_ON_ONE_MACHINE, LOCAL_RAY
(name, text), = DROPPED_ON_ONE_MACHINE.items()
logger = logging.getLogger(name)
assert logger.filter(record(text + " train-1."))
os.environ[LOCAL_RAY] = "1"
drop_known_messages()
assert not logger.filter(record(text + " train-1."))
assert logger.filter(record("Another warning"))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
