"""tasks.train_loop in this process, as one Ray Train worker runs it (Ray's worker calls
stand-ins): the batches it trains on, read ahead on a thread of their own (imf_core.data.
Prefetcher), in the sampler's order across epochs; the agreement on a non-finite loss or a
stop read a step late (imf_core.training.StopAgreement), yet no checkpoint after a
non-finite step and a stop at a checkpointed step. The real TorchTrainer: tests/test_train.py."""

import dataclasses
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.train
import ray.train.torch
import torch
from torch.utils.data import BatchSampler, DistributedSampler, default_collate

import imf_core.training
import tasks.train_loop
from imf_core.data import LatentDataset, Prefetcher
from imf_core.training import StopAgreement
from tasks import preemption
from tasks.config import load_config
from tasks.precompute import PrecomputeJob, precompute
from tasks.storage import Store
from tasks.train import TrainJob

BATCH, STEPS, CHECKPOINT_EVERY = 256, 10, 3  # 1,797 digits: 8 steps an epoch, so two epochs


def loop_data(root: Path, overrides: list[str]) -> SimpleNamespace:
    """The smoke config with a small network, and its precomputed digits."""
    cfg = load_config(
        "smoke",
        [
            f"paths.artifacts={root}",
            f"train.batch_size={BATCH}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "train.log_every=1000",  # only the end is logged: the flags are read a step late
            "train.eval_every=0",
            "train.compile=none",
            "model.width=32",  # a small network: the loop is under test, not the model
            "model.depth=1",
            "model.heads=2",
            "model.aux_head_depth=1",
            "precompute.classifier_steps=0",
            *overrides,
        ],
    )
    pre = precompute(PrecomputeJob.of(cfg))
    return SimpleNamespace(job=TrainJob.of(cfg, pre), data=str(pre.path))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> SimpleNamespace:
    return loop_data(tmp_path_factory.mktemp("loop"), [f"train.steps={STEPS}"])


class Logger:
    """RankZeroLogger's stand-in: the steps it was asked to log."""

    def __init__(self, *args):  # (job, run id, dataset, total, utilisation)
        self.run = SimpleNamespace(tags=lambda tags: None, close=lambda: None)
        self.logged: list[int] = []
        LOGGERS.append(self)

    def step(self, step, parts, optimizer, start, start_step) -> None:
        self.logged.append(step)

    def samples(self, step, model, ema) -> None:
        pass


LOGGERS: list[Logger] = []


def run_loop(digits, tmp_path, monkeypatch, nan_at: int = -1, stop_at: int = -1):
    """train_loop on one rank: the batches each step got, the reports (step, the checkpoint's
    step or None), the steps logged. Step `nan_at` returns a NaN loss; the stop file appears
    during step `stop_at`."""
    job = dataclasses.replace(digits.job, store=Store.of(tmp_path))  # this test's output
    out = job.out.path
    out.mkdir(parents=True)
    seen, reports = [], []
    real_step = imf_core.training.train_step

    def train_step(model, optimizer, ema, x, y, spec, step, *args, **kwargs):
        seen.append((step, x.clone(), y.clone()))
        if step == stop_at:
            (out / preemption.STOP_FILE).write_text("")
        parts = real_step(model, optimizer, ema, x, y, spec, step, *args, **kwargs)
        return parts | {"loss": torch.tensor(math.nan)} if step == nan_at else parts

    def report(metrics, checkpoint=None):
        saved = None if checkpoint is None else torch.load(Path(checkpoint) / "state.pt")["step"]
        reports.append((metrics, saved))

    context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setattr(imf_core.training, "train_step", train_step)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.Checkpoint, "from_directory", staticmethod(lambda d: d))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(tasks.train_loop, "RankZeroLogger", Logger)
    LOGGERS.clear()
    tasks.train_loop.train_loop({"job": job, "mlflow_run_id": ""})
    return SimpleNamespace(out=out, seen=seen, reports=reports, logged=LOGGERS[0].logged)


def test_the_steps_train_on_the_samplers_batches_in_order_across_epochs(
    digits, tmp_path, monkeypatch
):
    got = run_loop(digits, tmp_path, monkeypatch)
    dataset = LatentDataset(digits.data, seed=0)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    want = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for indices in BatchSampler(sampler, BATCH, drop_last=False):
            want.append(default_collate(dataset.__getitems__(indices)))
    assert [s for s, _, _ in got.seen] == list(range(STEPS))
    for (_, x, y), (want_x, want_y) in zip(got.seen, want, strict=False):
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert got.reports == [({"step": s}, s) for s in (3, 6, 9, 10)]
    assert got.logged == [STEPS]
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch")]


def test_an_epoch_over_stored_flips_trains_each_image_once(tmp_path, monkeypatch):
    """Issue 36: with each flip stored as a row, one epoch is 1,797 images (8 steps), not the
    3,594 rows, each image read in the orientation the dataset draws for it."""
    flipped = loop_data(tmp_path / "art", ["data.flips=true", "train.steps=0", "train.epochs=1"])
    got = run_loop(flipped, tmp_path, monkeypatch)
    dataset = LatentDataset(flipped.data, seed=0)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    want = [
        default_collate(dataset.__getitems__(indices))
        for indices in BatchSampler(sampler, BATCH, drop_last=False)
    ]
    assert dataset.num_rows == 2 * 1797 and [s for s, _, _ in got.seen] == list(range(8))
    assert sum(len(x) for _, x, _ in got.seen) == 1797
    for (_, x, y), (want_x, want_y) in zip(got.seen, want, strict=True):
        assert torch.equal(x, want_x) and torch.equal(y, want_y)


@pytest.mark.parametrize("nan_at", [4, 5])
def test_a_non_finite_loss_ends_every_rank_with_no_checkpoint_after_it(
    digits, tmp_path, monkeypatch, nan_at
):
    """Step 4's flags are read after step 5 (a step late), step 5's at once: a checkpoint (at 6)
    follows. Either way the last checkpoint is step 3's, and the report names the step."""
    got = run_loop(digits, tmp_path, monkeypatch, nan_at=nan_at)
    assert got.reports == [({"step": 3}, 3), ({"step": nan_at, "nan": 1}, None)]
    assert f"not finite at step {nan_at};" in (got.out / "NAN").read_text()
    assert len(got.seen) == 6  # at most one step past it, never past the next checkpoint
    assert got.logged == []


@pytest.mark.parametrize(("stop_at", "stopped"), [(6, 8), (4, 6)])
def test_a_stop_checkpoints_the_step_it_ends_at(digits, tmp_path, monkeypatch, stop_at, stopped):
    """The stop asked during step 6 is read after step 7 (a step late) and checkpointed at 8;
    during step 4, read after step 5, at the checkpoint of 6."""
    got = run_loop(digits, tmp_path, monkeypatch, stop_at=stop_at)
    assert int((got.out / preemption.STOPPED_FILE).read_text()) == stopped
    assert got.reports[-1] == ({"step": stopped}, stopped) and len(got.seen) == stopped


def test_the_agreement_reads_a_step_late_unless_told_to_read_everything():
    agreement = StopAgreement(world=1)
    agreement.post(0, torch.tensor(1.0), False)
    agreement.settle()
    assert len(agreement.pending) == 1 and agreement.bad_step is None
    agreement.post(1, torch.tensor(math.inf), True)
    agreement.post(2, torch.tensor(math.nan), False)
    agreement.settle()
    assert agreement.bad_step == 1 and agreement.stop and len(agreement.pending) == 1
    agreement.settle(everything=True)
    assert agreement.bad_step == 1 and not agreement.pending  # the first bad step stays


def test_the_prefetcher_keeps_order_and_loads_one_item_ahead_on_its_own_thread():
    started, threads = [], set()

    def load(item: int) -> int:
        started.append(item)
        threads.add(threading.get_ident())
        time.sleep(0.01 * (item % 3))  # loads of uneven length
        return item * item

    got = []
    with Prefetcher(load, range(8)) as prefetched:
        for item, loaded in prefetched:
            time.sleep(0.02)  # the caller's work: the next load runs meanwhile
            assert max(started) <= item + 1  # one slot: never two ahead
            got.append((item, loaded))
    assert got == [(i, i * i) for i in range(8)]
    assert threads and threading.get_ident() not in threads


def test_the_prefetcher_stops_cleanly_and_raises_a_loads_error_at_its_item():
    started = []

    def load(item: int) -> int:
        started.append(item)
        if item == 3:
            raise ValueError("unreadable row group")
        return item

    with Prefetcher(load, range(100)) as prefetched:
        for item, _ in prefetched:
            if item == 1:
                break  # a stop: the load under way (item 2, if begun) ends, no other starts
    assert started in ([0, 1], [0, 1, 2])
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch")]
    taken = []
    with pytest.raises(ValueError, match="unreadable"), Prefetcher(load, range(100)) as again:
        for item, _ in again:
            taken.append(item)
    assert taken == [0, 1, 2] and started[-1] == 3
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch")]
