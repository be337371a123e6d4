"""Throughput of the training reader (imf_core.data.LatentDataset) against a raw read.

    python -m benchmarks.data_read [--rows 16384] [--shape 2 4 32 32] [--batch 256]

Writes synthetic latent rows shaped like ImageNet's SD-VAE rows ((mean, std) x 4 x 32 x 32)
with the precompute stage's own shard writer, then reads them (a) raw: every shard with
pyarrow.parquet.read_table into one numpy array, and (b) through a DataLoader over the
Dataset with a shuffling DistributedSampler, sampling mean + std * eps per row as training
does. Prints both rates; the last line is JSON with `ratio_dataset_to_raw`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, DistributedSampler

from imf_core.data import LatentDataset
from tasks.artifacts import FileRecord, Manifest
from tasks.precompute import _write_shard
from tasks.storage import Output


def write_synthetic(
    directory: Path, rows: int, shape: tuple[int, ...], rows_per_shard: int, row_group: int
) -> None:
    rng = np.random.default_rng(0)
    out, files = Output.at(directory), []
    for k, start in enumerate(range(0, rows, rows_per_shard)):
        n = min(rows_per_shard, rows - start)
        latents = rng.standard_normal((n, *shape), dtype=np.float32)
        name = f"shard-{k:05d}.parquet"
        idx = np.arange(start, start + n)
        _write_shard(out, name, latents, idx % 1000, idx, np.zeros(n, bool), row_group)
        files.append(FileRecord.of(out, name))
    extra = {"num_rows": rows, "num_classes": 1000, "latent_shape": list(shape)}
    Manifest("synthetic", "precompute", {}, [], files, extra).write(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 4, 32, 32])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=4096)
    parser.add_argument("--row-group", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_synthetic(
            directory, args.rows, tuple(args.shape), args.rows_per_shard, args.row_group
        )
        files = sorted(directory.glob("shard-*.parquet"))
        start = time.perf_counter()
        raw = [pq.read_table(f)["latent"].combine_chunks().to_numpy_ndarray() for f in files]
        total = sum(len(r) for r in raw)
        raw_rate = total / (time.perf_counter() - start)

        ds = LatentDataset(directory)
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        start = time.perf_counter()
        seen = sum(len(x) for x, _ in DataLoader(ds, batch_size=args.batch, sampler=sampler))
        ds_rate = seen / (time.perf_counter() - start)
    mb_per_row = 4 * int(np.prod(args.shape)) / 2**20
    print(f"{total} rows of shape {tuple(args.shape)} ({mb_per_row * 1024:.0f} KiB each)")
    print(f"raw read_table      {raw_rate:10.0f} rows/s  {raw_rate * mb_per_row:8.0f} MiB/s")
    print(
        f"Dataset+DataLoader  {ds_rate:10.0f} rows/s  {ds_rate * mb_per_row:8.0f} MiB/s  "
        "(shuffled, eps sampled)"
    )
    print(
        json.dumps(
            {
                "rows": total,
                "shape": args.shape,
                "raw_rows_per_s": round(raw_rate),
                "dataset_rows_per_s": round(ds_rate),
                "ratio_dataset_to_raw": round(ds_rate / raw_rate, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
