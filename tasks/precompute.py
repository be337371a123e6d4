"""Stage 1: encode a dataset once into sharded Parquet, content-addressed and restartable per shard.

    >>> result = precompute(PrecomputeJob.of(cfg))   # cfg: the experiment config (tasks.config)
    >>> result.path, result.computed, result.shards_written

Output `<artifacts>/precompute/<key>/`: `shard-NNNNN.parquet` files (columns `latent`, a
fixed-shape tensor (k, C, H, W) with k = 2 for (mean, std) or 1 for a deterministic tokenizer;
`label`; `source_index`; `flipped`) and `_SUCCESS`. Shards are stored uncompressed, without
dictionary encoding: latents are near-Gaussian floats that general-purpose codecs shrink by a
few percent at most, while decompression would cost every training read and rule out
zero-copy memory mapping.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, astuple, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from tasks import preemption
from tasks.artifacts import FileRecord, Manifest, StageTask, content_key, require_manifest
from tasks.datasets import UnreadableImages, open_source
from tasks.eval_classifier import CLASSIFIER_FILES, fit_classifier, makes_classifier
from tasks.schema import DataConfig, ExperimentConfig, PrecomputeConfig, TokenizerConfig
from tasks.storage import Output, Store, failing_cleanly
from tasks.tokenizers import open_tokenizer


def stage_key(
    data: DataConfig, tokenizer_fingerprint: dict, source_fingerprint: dict, pre: PrecomputeConfig
) -> str:
    config = {
        "data": asdict(data) | {"root": None},  # the content fingerprint stands for the folder
        "source": source_fingerprint,
        "tokenizer": tokenizer_fingerprint,
        "rows_per_shard": pre.rows_per_shard,
        "rows_per_row_group": pre.rows_per_row_group,
        "classifier_steps": pre.classifier_steps,
    }
    return content_key("precompute", config)


@dataclass
class PrecomputeResult:
    path: str | Path  # its output's location: a local directory, or an s3:// URI
    key: str
    computed: bool  # False: every shard was reused
    shards_written: list[str]
    num_rows: int
    skipped: list[str]  # unreadable images left out (data.on_bad_image=skip)

    @property
    def out(self) -> Output:
        return Output.at(self.path)


def stores_flips(data: DataConfig) -> bool:
    """Whether the output stores each image's flip as the row after it (a `parquet` copy of an
    output keeps its rows as they are); training then reads one orientation of each image an
    epoch (imf_core.data.LatentDataset)."""
    return data.flips and data.name != "parquet"


def _rows(num_images: int, flips: bool) -> list[tuple[int, bool]]:
    """(source index, flipped) for every output row; a flip sits next to its original."""
    return [(i, f) for i in range(num_images) for f in ((False, True) if flips else (False,))]


def _write_shard(
    out: Output,
    name: str,
    latents: np.ndarray,
    labels: np.ndarray,
    sources: np.ndarray,
    flipped: np.ndarray,
    row_group: int,
) -> None:
    n, shape = latents.shape[0], latents.shape[1:]
    tensor_type = pa.fixed_shape_tensor(pa.float32(), shape)
    storage = pa.FixedSizeListArray.from_arrays(
        pa.array(latents.reshape(-1), pa.float32()), int(np.prod(shape))
    )
    table = pa.table(
        {
            "latent": pa.ExtensionArray.from_storage(tensor_type, storage),
            "label": pa.array(labels, pa.int32()),
            "source_index": pa.array(sources, pa.int64()),
            "flipped": pa.array(flipped, pa.bool_()),
        }
    )
    assert table.num_rows == n
    # Uncompressed PLAIN values, one data page per row group, no statistics: the layout
    # imf_core.data reads rows from directly, at fixed offsets in a memory map.
    out.write_table(
        name,
        table,
        compression="none",
        use_dictionary=False,
        write_statistics=False,
        row_group_size=row_group,
        data_page_size=1 << 30,
        data_page_version="1.0",
    )


def _encode_shard(job: dict) -> tuple[str, list[str]]:
    """Computes one shard (in this process, a worker process or a Ray task); returns its name
    and the skipped files."""
    data, tok = DataConfig(**job["data"]), TokenizerConfig(**job["tokenizer"])
    row_group, out, name, rows = job["rows_per_row_group"], job["out"], job["name"], job["rows"]
    if data.name == "parquet":
        latents, labels, sources, flipped = _read_rows(Output.at(data.root), rows)
        _write_shard(out, name, latents, labels, sources, flipped, row_group)
        return name, []
    source = open_source(data.name, data.root, data.image_size, data.on_bad_image)
    tokenizer = open_tokenizer(tok.name, tok.path, tok.variant, tok.device)
    parts: list[tuple[np.ndarray, ...]] = []
    for start in range(0, len(rows), tok.batch_size):
        batch = rows[start : start + tok.batch_size]
        images, y, kept = source.load(sorted({i for i, _ in batch}))  # each image decoded once
        position = {i: k for k, i in enumerate(kept)}  # skipped images have none
        batch = [(i, f) for i, f in batch if i in position]
        if not batch:
            continue
        take = torch.tensor([position[i] for i, _ in batch], dtype=torch.long)
        flip = torch.tensor([f for _, f in batch])
        x = torch.where(flip[:, None, None, None], images[take].flip(-1), images[take])
        parts.append(
            (
                tokenizer.encode(x).numpy(),
                y[take].numpy(),
                np.array([i for i, _ in batch]),
                flip.numpy(),
            )
        )
    if source.skipped and data.on_bad_image != "skip":
        raise UnreadableImages(source.skipped)
    if not parts:
        raise ValueError(f"every image of {name} was unreadable and skipped")
    _write_shard(out, name, *(np.concatenate(col) for col in zip(*parts, strict=True)), row_group)
    return name, source.skipped


def _encode_reporting(job: dict) -> tuple[str, list[str], list[str], str | None]:
    """_encode_shard's outcome as values, so that it crosses process and Ray boundaries intact:
    (name, skipped files, unreadable files (the shard is not written), the GPU it ran on)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        name, skipped = _encode_shard(job)
        return name, skipped, [], gpu
    except UnreadableImages as err:
        return "", [], err.paths, gpu


def _encode_on_ray(jobs: list[dict], pre: PrecomputeConfig):
    """Yields _encode_reporting's outcome of each job as its Ray task finishes."""
    import ray

    from tasks.cluster import connect_ray, require_resources

    connect_ray(pre.ray_address, pre.cpus_per_worker)
    require_resources("precompute", pre.cpus_per_worker, pre.gpus_per_worker)
    encode = ray.remote(num_cpus=pre.cpus_per_worker, num_gpus=pre.gpus_per_worker)(
        _encode_reporting
    )
    pending = [encode.remote(job) for job in jobs]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:  # a failure (or a kill) leaves no task writing behind it
            ray.cancel(ref, force=True)


def _outcomes(jobs: list[dict], pre: PrecomputeConfig):
    """Each job's outcome (_encode_reporting) as it finishes: on Ray tasks (gpus_per_worker),
    in worker processes (workers), or one after another here."""
    if pre.gpus_per_worker > 0 and jobs:
        yield from _encode_on_ray(jobs, pre)
    elif pre.workers > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(pre.workers, mp_context=get_context("spawn"))
        try:
            futures = [pool.submit(_encode_reporting, job) for job in jobs]
            yield from (f.result() for f in as_completed(futures))
        finally:  # a stop: the queued shards are not started (finished ones are kept)
            pool.shutdown(wait=False, cancel_futures=True)
    else:
        yield from map(_encode_reporting, jobs)


def _read_rows(upstream: Output, rows: list[tuple[int, bool]]) -> tuple[np.ndarray, ...]:
    """Rows of an existing precompute output (the `parquet` dataset), by global row number."""
    table = pa.concat_tables(upstream.read_table(f.name) for f in require_manifest(upstream).files)
    take = pa.array([i for i, _ in rows], pa.int64())
    table = table.take(take)
    return (
        table["latent"].combine_chunks().to_numpy_ndarray(),
        table["label"].to_numpy(),
        table["source_index"].to_numpy(),
        table["flipped"].to_numpy(zero_copy_only=False),
    )


def _identify(data: DataConfig, tokenizer: TokenizerConfig, pre: PrecomputeConfig):
    """(key, tokenizer fingerprint, source, upstream manifest): what the output is keyed by."""
    if data.name == "parquet":
        upstream = require_manifest(Output.at(data.root))
        source_fp = {"name": "parquet", "key": upstream.key}
        key = stage_key(data, {"name": "from_upstream"}, source_fp, pre)
        return key, {"name": "from_upstream"}, None, upstream
    source = open_source(data.name, data.root, data.image_size, data.on_bad_image)
    tok_fp = _tokenizer_fingerprint(tokenizer)
    return stage_key(data, tok_fp, source.fingerprint, pre), tok_fp, source, None


@dataclass(frozen=True)
class PrecomputeJob:
    """What precompute reads, taken from the experiment once (PrecomputeJob.of): the data, the
    tokenizer, the shard settings and where outputs go. Its sections hold plain values, so
    equal jobs hash alike: a sweep's variants on the same data share one."""

    data: DataConfig
    tokenizer: TokenizerConfig
    precompute: PrecomputeConfig
    artifacts: str | Path

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> PrecomputeJob:
        return cls(cfg.data, cfg.tokenizer, cfg.precompute, cfg.paths.artifacts)

    def __hash__(self) -> int:
        return hash(astuple(self))

    def key(self) -> str:
        """Its content key (the data's fingerprint: for an image folder, its listing)."""
        return _identify(self.data, self.tokenizer, self.precompute)[0]

    def out(self) -> Output:
        return Store.of(self.artifacts).output("precompute", self.key())


def output_dir(job: PrecomputeJob) -> Output:
    """Where precompute's output for this job lives (its content key, computed)."""
    return job.out()


def precompute(job: PrecomputeJob) -> PrecomputeResult:
    """Encodes every missing or invalid shard; reuses the rest. A rerun of a finished output
    with the same config changes no file."""
    started = time.time()
    data, tokenizer, pre = job.data, job.tokenizer, job.precompute
    key, tok_fp, source, upstream = _identify(data, tokenizer, pre)
    if upstream is not None:
        num_rows, flips = upstream.extra["num_rows"], False
        rows = [(i, False) for i in range(num_rows)]
        num_classes = upstream.extra["num_classes"]
    else:
        rows, num_classes, flips = (
            _rows(source.num_images, stores_flips(data)),
            source.num_classes,
            stores_flips(data),
        )
    out = Store.of(job.artifacts).output("precompute", key)
    with failing_cleanly(out.store, f"precompute {key}"), out.lock("precompute"):
        if Manifest.read(out) is None:  # a new (or interrupted) output: will it fit?
            need = len(rows) * row_bytes(data, tokenizer, upstream)
            out.require_free(need, f"precompute's {len(rows)} rows")
        return _precompute(
            data, tokenizer, pre, out, key, tok_fp, rows, num_classes, flips, started
        )


def row_bytes(data: DataConfig, tokenizer: TokenizerConfig, upstream: Manifest | None) -> int:
    """One stored row: its float32 latent plus label, source index and flip flag (uncompressed
    Parquet), for the free-space check."""
    if upstream is not None:
        shape = upstream.extra["latent_shape"]
    elif data.name == "imagefolder":
        side = data.image_size // 8 if tokenizer.name == "sd_vae" else data.image_size
        shape = [8 if tokenizer.name == "sd_vae" else 3, side, side]  # sd_vae: mean and std
    else:
        shape = {"digits": [1, 8, 8], "mnist5k": [1, 28, 28]}[data.name]
    return 4 * int(np.prod(shape)) + 8 + 8 + 1


def _precompute(data, tokenizer, pre, out, key, tok_fp, rows, num_classes, flips, started):
    shards = [rows[i : i + pre.rows_per_shard] for i in range(0, len(rows), pre.rows_per_shard)]
    names = [f"shard-{k:05d}.parquet" for k in range(len(shards))]

    old = Manifest.read(out)
    valid = {f.name: f for f in (old.files if old else []) if f.valid_in(out, pre.verify)}
    if old is None:  # an interrupted run: shards were renamed into place only when complete
        valid = {n: FileRecord.of(out, n) for n in names if _readable(out, n)}
    todo = [k for k, n in enumerate(names) if n not in valid]
    derived = list(CLASSIFIER_FILES) if makes_classifier(data, tokenizer, pre) else []
    if not todo and old is not None and all(d in valid for d in derived):
        extra = old.extra
        return PrecomputeResult(out.location, key, False, [], extra["num_rows"], extra["skipped"])

    jobs = [
        {
            "data": asdict(data),
            "tokenizer": asdict(tokenizer),
            "rows_per_row_group": pre.rows_per_row_group,
            "out": out,
            "name": names[k],
            "rows": shards[k],
        }
        for k in todo
    ]
    skipped = [s for f in valid.values() for s in f.meta.get("skipped", [])]
    results, unreadable, gpus = {}, [], {}
    progress = tqdm(total=len(jobs), desc=f"precompute {key}", unit="shard", disable=not jobs)
    for name, skip, bad, gpu in _outcomes(jobs, pre):
        if bad:  # the other shards go on: one error names every file
            unreadable.extend(bad)
        else:
            results[name], gpus[name] = skip, gpu
        progress.update()
        preemption.check()  # a stop signal: the written shards stay, a rerun does the rest
    progress.close()
    if unreadable:  # the good shards are kept: a rerun after the fix encodes only the rest
        raise UnreadableImages(unreadable)
    for name, skip in results.items():
        shard_rows = out.parquet(name).metadata.num_rows
        gpu = {"gpu": gpus[name]} if gpus[name] is not None else {}  # where it was encoded
        valid[name] = FileRecord.of(out, name, rows=shard_rows, skipped=skip, **gpu)
        skipped += skip
    classifier_accuracy = old.extra.get("classifier_accuracy") if old else None
    if any(d not in valid for d in derived):
        classifier_accuracy = fit_classifier(out, names, num_classes, pre.classifier_steps)
        valid |= {d: FileRecord.of(out, d) for d in derived}
    files = [valid[n] for n in names + derived]
    first = out.parquet(names[0]).schema_arrow.field("latent").type
    extra = {
        "num_rows": sum(out.parquet(n).metadata.num_rows for n in names),
        "num_classes": num_classes,
        "latent_shape": list(first.shape),
        "flips": flips,
        "skipped": sorted(skipped),
        "compression": "none",
        "classifier_accuracy": classifier_accuracy,
    }
    config = {
        "data": asdict(data),
        "tokenizer": asdict(tokenizer) | {"fingerprint": tok_fp},
        "precompute": asdict(pre),
    }
    Manifest(key, "precompute", config, [], files, extra, {"seconds": time.time() - started}).write(
        out
    )
    written = sorted(results)
    return PrecomputeResult(out.location, key, True, written, extra["num_rows"], extra["skipped"])


def _readable(out: Output, name: str) -> bool:
    """Whether `name` is a whole Parquet file (an interrupted run's shard)."""
    if not out.exists(name):
        return False
    try:
        out.parquet(name)
        return True
    except Exception:
        return False


def _tokenizer_fingerprint(tok: TokenizerConfig) -> dict:
    """What identifies the encoder's output: for sd_vae, the weights' content (loads it once)."""
    if tok.name == "pixel":
        return {"name": "pixel"}
    return open_tokenizer(tok.name, tok.path, tok.variant, "cpu").fingerprint()


precompute_task = StageTask(precompute, "precompute", output_dir)  # what the flows call
