"""The paper's epoch (issue 36): one pass over the images, each in one of its stored
orientations drawn per epoch, so that ImageNet's stored flips do not double train.epochs."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from imf_core.data import LatentDataset
from tasks.datasets import digits
from tasks.precompute import PrecomputeJob, precompute
from tasks.schema import DataConfig, PrecomputeConfig, TokenizerConfig

IMAGES = 1797  # scikit-learn's digits
PIXEL = TokenizerConfig(name="pixel")
SHARDS = PrecomputeConfig(rows_per_shard=501, rows_per_row_group=100)  # pairs cross shards


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    return precompute(
        PrecomputeJob(
            DataConfig(name="digits", flips=True), PIXEL, SHARDS, tmp_path_factory.mktemp("art")
        )
    )


def epoch_rows(ds: LatentDataset, epoch: int, world: int = 1) -> list[int]:
    """The stored rows an epoch reads, over every rank's sampler."""
    ds.set_epoch(epoch)
    rows = []
    for rank in range(world):
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        rows += ds.row_of(list(sampler))
    return rows


def test_an_epoch_reads_every_image_once_in_one_of_its_orientations(flipped):
    ds = LatentDataset(flipped.path, seed=0, sample_posterior=False)
    assert flipped.num_rows == 2 * IMAGES and len(ds) == IMAGES
    # What tasks/train_loop.py counts steps an epoch from (warmup and eval_every_epochs too).
    assert len(DistributedSampler(ds, num_replicas=3, rank=0)) == IMAGES // 3
    rows = np.array(epoch_rows(ds, 3))
    assert sorted(rows // 2) == list(range(IMAGES))  # a permutation of the images
    images = digits()[0]
    ds.set_epoch(3)
    for item in (0, 1, 900, IMAGES - 1):  # the item is the image, flipped when its row is odd
        sample, label = ds[item]
        flip = ds.row_of([item])[0] % 2
        torch.testing.assert_close(sample, images[item].flip(-1) if flip else images[item])
        assert label == int(ds.labels[2 * item])


def test_orientations_are_fair_and_redrawn_every_epoch(flipped):
    ds = LatentDataset(flipped.path, seed=0)
    items = list(range(IMAGES))
    flips = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        flips.append(np.array(ds.row_of(items)) % 2)
    for f in flips:  # Binomial(1797, 1/2): sd 21 flips
        assert abs(f.sum() - IMAGES / 2) < 5 * 21
    for a, b in zip(flips, flips[1:], strict=False):  # independent epochs agree on about half
        assert abs((a == b).sum() - IMAGES / 2) < 5 * 21
    ds.set_epoch(0)
    other_seed = LatentDataset(flipped.path, seed=1)  # the seed draws them too
    assert ds.row_of(items) != other_seed.row_of(items)


def test_a_resumed_or_sharded_run_reads_the_same_rows(flipped):
    ds = LatentDataset(flipped.path, seed=0)
    one = epoch_rows(ds, 2)
    # A resumed process: a fresh dataset (as a new worker unpickles it), set straight to the epoch.
    fresh = pickle.loads(pickle.dumps(LatentDataset(flipped.path, seed=0)))
    assert epoch_rows(fresh, 2) == one
    # Ranks each draw the orientations of their items: together they read one process's rows.
    assert sorted(epoch_rows(LatentDataset(flipped.path, seed=0), 2, world=3)) == sorted(
        one
    )  # 1797 = 3 x 599
    ds.set_epoch(2)
    batch = one[:7]
    items = [r // 2 for r in batch]
    got = torch.stack([x for x, _ in ds.__getitems__(items)])
    torch.testing.assert_close(got, ds.rows(batch)[0])


def test_without_flips_an_item_is_its_row(tmp_path):
    result = precompute(PrecomputeJob(DataConfig(name="digits"), PIXEL, SHARDS, tmp_path))
    ds = LatentDataset(result.path, seed=0)
    ds.set_epoch(5)
    assert len(ds) == result.num_rows == IMAGES and ds.row_of([0, 7, 1796]) == [0, 7, 1796]


def test_a_manifest_whose_rows_are_not_flip_pairs_is_refused(tmp_path):
    import json

    result = precompute(PrecomputeJob(DataConfig(name="digits"), PIXEL, SHARDS, tmp_path))
    manifest = json.loads((result.path / "_SUCCESS").read_text())
    manifest["extra"]["flips"] = True  # says flips, stores one row per image
    (result.path / "_SUCCESS").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not \\(original, flip\\) pairs"):
        LatentDataset(result.path)


def test_the_training_key_changes_with_flips_only():
    from tasks.config import load_config
    from tasks.train import train_key_of

    # Keys of main before issue 36 (commit 048e88e): data without flips keeps its trainings.
    assert train_key_of(load_config("smoke"), "0" * 16) == "0b2e09661207a95b"
    assert train_key_of(load_config("demo"), "0" * 16) == "9d6214a13c244f1f"
    # ImageNet (flips stored): an epoch means half the steps, so the old key must not be found.
    assert train_key_of(load_config("imagenet_b2"), "0" * 16) != "c8fbf8461b82a986"


def test_a_training_job_keys_what_the_experiment_keys(tmp_path):
    """TrainJob.of(cfg, pre).key() is the key train_key_of(cfg, ...) pins above: the job is
    built once from the experiment, and its key from the job itself."""
    from pathlib import Path

    from tasks.config import load_config
    from tasks.precompute import PrecomputeResult
    from tasks.train import TrainJob

    pre = PrecomputeResult(tmp_path, "0" * 16, False, [], 0, [])
    for name, key in (("smoke", "0b2e09661207a95b"), ("demo", "9d6214a13c244f1f")):
        cfg = load_config(name, ["train.eval_every=0", "train.eval_every_epochs=0"])
        job = TrainJob.of(cfg, pre)
        assert job.key() == key
        assert job.out.path == Path(cfg.paths.artifacts).resolve() / "train" / key
