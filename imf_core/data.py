"""A torch Dataset over a precompute output: Parquet shards read through memory maps.

    >>> ds = LatentDataset("artifacts/precompute/<key>", seed=0)
    >>> sampler = DistributedSampler(ds, num_replicas=world, rank=rank)
    >>> loader = DataLoader(ds, batch_size=256, sampler=sampler)
    >>> ds.set_epoch(epoch); sampler.set_epoch(epoch)

Rows hold the tokenizer's posterior (mean, std) (or the deterministic latent alone); each read
returns a fresh sample mean + std * eps, with eps drawn from (seed, epoch, row), so a resumed
run sees the same noise.

An epoch is one pass over the images. Where precompute stored each image's horizontal flip as
the row after it (its manifest's `flips`), the dataset has one item per image, and item i of
epoch e reads row 2i + f, f drawn from (seed, epoch, i): every image once an epoch, in one of
its two orientations, the same on every rank and on a resume. The authors count epochs over
images too: their latent ImageNet pipeline caches one latent per image and takes
steps_per_epoch = len(loader) over them (Lyy-iiis/imeanflow utils/data_util.py
compute_latent_dataset, utils/vae_util.py LatentDataset, utils/input_pipeline.py
create_latent_split; MeanFlow's official JAX code the same), 1,281,167 items an epoch. (Their
latent path flips nothing: `use_flip` is accepted and unused; their loader drops an epoch's
last partial batch.)

Random access without decoding: the precompute stage writes the latent column uncompressed,
PLAIN-encoded, one data page per row group, so a row group's float values are the last bytes
of its column chunk and row j sits at a fixed offset. Each file is memory-mapped and that
layout is checked against pyarrow's own decoding of its first row group; a file that does
not match (written by another tool) is read by decoding row groups instead. The OS page cache
does the caching; the set is never loaded whole. pyarrow is imported lazily, so importing
imf_core still needs only torch.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

Item, Loaded = TypeVar("Item"), TypeVar("Loaded")


class LatentDataset(Dataset):
    def __init__(self, directory: str | Path, seed: int = 0, sample_posterior: bool = True):
        import pyarrow.parquet as pq

        self.directory = Path(directory)
        manifest_path = self.directory / "_SUCCESS"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.directory} has no _SUCCESS: not a finished precompute output"
            )
        manifest = json.loads(manifest_path.read_text())
        records = [f for f in manifest["files"] if f["name"].endswith(".parquet")]
        self.files = [self.directory / f["name"] for f in records]
        self.sha256 = [f["sha256"] for f in records]  # checked once per file and process
        self.num_classes = int(manifest["extra"]["num_classes"])
        self.row_shape = tuple(manifest["extra"]["latent_shape"])  # (k, C, H, W)
        self.row_values = int(np.prod(self.row_shape))
        self.seed, self.epoch, self.sample_posterior = seed, 0, sample_posterior
        # Per row group: its file, its index there, where its values start, its first global row.
        self.groups: list[tuple[int, int, int]] = []
        starts: list[int] = []
        labels = []
        total = 0
        for f, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            latent_column = (
                meta.schema.names.index("latent") if "latent" in meta.schema.names else 0
            )
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                chunk = meta.row_group(g).column(latent_column)
                offset = (
                    chunk.data_page_offset
                    + chunk.total_compressed_size
                    - rows * self.row_values * 4
                )
                self.groups.append((f, g, offset))
                starts.append(total)
                total += rows
            labels.append(pq.read_table(path, columns=["label"])["label"].to_numpy())
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.num_rows = total
        self.flips = bool(manifest["extra"].get("flips", False))
        if self.flips:
            self._check_flip_pairs(pq)
        self.starts = np.array(starts, np.int64)
        self.group_file = np.array([f for f, _, _ in self.groups], np.int64)
        self.group_offset = np.array([o for _, _, o in self.groups], np.int64)
        self.row_bytes = 4 * self.row_values
        self._maps: dict[int, np.ndarray | None] = {}  # per process: file -> mapped bytes or None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one training sample."""
        return self.row_shape[1:]

    def __len__(self) -> int:
        """Items an epoch: the images (stored rows / 2 where flips are stored)."""
        return self.num_rows // 2 if self.flips else self.num_rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _check_flip_pairs(self, pq) -> None:
        """Row 2i + 1 must be the flip of row 2i (tasks/precompute.py `_rows`; an image that
        could not be read is left out with its flip): the layout items are read through."""
        columns = [pq.read_table(p, columns=["source_index", "flipped"]) for p in self.files]
        source = np.concatenate([c["source_index"].to_numpy() for c in columns])
        flipped = np.concatenate([c["flipped"].to_numpy(zero_copy_only=False) for c in columns])
        if not (
            self.num_rows % 2 == 0
            and not flipped[0::2].any()
            and flipped[1::2].all()
            and np.array_equal(source[0::2], source[1::2])
        ):
            raise ValueError(
                f"{self.directory}: its manifest says flips are stored, but its rows are not "
                "(original, flip) pairs; rerun precompute to rebuild it"
            )

    def row_of(self, items: list[int]) -> list[int]:
        """The stored row each item reads this epoch: itself, or 2i + f (f: the orientation
        drawn for item i from (seed, epoch, i), a fair bit) where flips are stored."""
        if not self.flips:
            return list(items)
        idx = np.asarray(items, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"items out of range [0, {len(self)}): {items}")
        stream = np.uint64(hash((self.seed, self.epoch)) & (2**64 - 1))
        bits = _mix64(stream + idx.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> 63
        return (2 * idx + bits.astype(np.int64)).tolist()

    def __getstate__(self) -> dict:  # memory maps stay in the process that opened them
        return self.__dict__ | {"_maps": {}}

    def _map(self, f: int) -> np.ndarray | None:
        """The file's bytes, memory-mapped, if its layout allows direct row access. The first
        time a process maps a file it checks the bytes against the manifest's SHA-256: no
        setting trains on bytes the manifest does not vouch for."""
        if f not in self._maps:
            with open(self.files[f], "rb") as handle:
                mapped = np.frombuffer(
                    mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), np.uint8
                )
            if hashlib.sha256(mapped).hexdigest() != self.sha256[f]:
                raise ValueError(
                    f"{self.files[f]} does not match its manifest's SHA-256: the shard changed "
                    "on disk after precompute; rerun precompute (precompute.verify=sha256) to "
                    "rebuild it"
                )
            g = next(i for i, (fg, _, _) in enumerate(self.groups) if fg == f)
            _, rg, offset = self.groups[g]
            decoded = self._decode(f, rg)
            direct = self._view(mapped, offset, len(decoded))
            self._maps[f] = (
                mapped if direct is not None and np.array_equal(direct, decoded) else None
            )
        return self._maps[f]

    def _view(self, mapped: np.ndarray, offset: int, rows: int) -> np.ndarray | None:
        end = offset + rows * self.row_values * 4
        if offset < 0 or end > mapped.size:
            return None
        return mapped[offset:end].view(np.float32).reshape(rows, *self.row_shape)

    def _decode(self, f: int, rg: int) -> np.ndarray:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(self.files[f]).read_row_group(rg, columns=["latent"])
        values = table.column("latent").combine_chunks().storage.values
        return values.to_numpy(zero_copy_only=False).reshape(-1, *self.row_shape)

    def _gather(self, indices: list[int]) -> np.ndarray:
        """Rows (n, k, C, H, W) by global index, copied out of the memory maps."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"rows out of range [0, {self.num_rows}): {indices}")
        g = np.searchsorted(self.starts, idx, side="right") - 1
        in_group = idx - self.starts[g]
        offsets = self.group_offset[g] + in_group * self.row_bytes
        out = np.empty((len(idx), self.row_bytes), np.uint8)
        for f in np.unique(self.group_file[g]):
            sel = np.nonzero(self.group_file[g] == f)[0]
            mapped = self._map(int(f))
            if mapped is None:  # not directly addressable: decode its row groups
                for k in sel:
                    _, rg, _ = self.groups[g[k]]
                    out[k] = self._decode(int(f), rg)[in_group[k]].reshape(-1).view(np.uint8)
            elif self.row_bytes <= 4096:  # small rows: one vectorised gather
                out[sel] = mapped[offsets[sel, None] + np.arange(self.row_bytes)]
            else:
                for k in sel:
                    out[k] = mapped[offsets[k] : offsets[k] + self.row_bytes]
        return out.view(np.float32).reshape(len(idx), *self.row_shape)

    def _noise(self, index: int) -> Tensor:
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & (2**63 - 1))
        return torch.randn(self.latent_shape, generator=gen)

    def _samples(self, rows: Tensor, indices: list[int]) -> Tensor:
        """(n, k, C, H, W) rows -> (n, C, H, W) training samples mean + std * eps."""
        if self.row_shape[0] == 1 or not self.sample_posterior:
            return rows[:, 0]
        return rows[:, 0] + rows[:, 1] * torch.stack([self._noise(i) for i in indices])

    def rows(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """(samples (n, C, H, W), labels (n,)) of these stored rows, as one batch."""
        samples = self._samples(torch.from_numpy(self._gather(indices)), indices)
        return samples, torch.from_numpy(self.labels[indices]).long()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, int]]:
        """Batched fetch of items (the DataLoader calls this): one gather, one noise pass."""
        samples, labels = self.rows(self.row_of(indices))
        return list(zip(samples.unbind(0), labels.tolist(), strict=True))


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (uint64, wrapping): well-mixed bits of a counter, so that any
    item's orientation is drawn without drawing the rest of its epoch's."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Prefetcher(Generic[Item, Loaded]):
    """(item, load(item)) for each item, in order, each loaded on a background thread while the
    caller works on the one before: one slot, so at most one load runs ahead. An error in
    `load` is raised where its item is taken; leaving the `with` block (an end, a stop, an
    error) waits for the load under way and starts no other.

        >>> with Prefetcher(lambda i: collate(ds.__getitems__(i)), batches) as prefetched:
        ...     for indices, batch in prefetched: ...
    """

    def __init__(self, load: Callable[[Item], Loaded], items: Iterable[Item]):
        self._load, self._items = load, iter(items)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._ahead = self._submit()

    def _submit(self) -> tuple[Item, Future[Loaded]] | None:
        for item in self._items:
            return item, self._pool.submit(self._load, item)
        return None

    def __iter__(self) -> Iterator[tuple[Item, Loaded]]:
        return self

    def __next__(self) -> tuple[Item, Loaded]:
        if self._ahead is None:
            raise StopIteration
        item, future = self._ahead
        loaded = future.result()
        self._ahead = self._submit()
        return item, loaded

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher[Item, Loaded]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
