"""Where the pipeline's outputs live: one small interface every stage reads and writes through.

`paths.artifacts` names a `Store`: a local directory (the same tree on every node that mounts
it), or `s3://bucket/prefix` on any S3-compatible object store (tasks.object_store). Each stage
output is an `Output` in it, `<stage>/<key>/`; a stage names the files of its output
(`out.write_json("results.json", ...)`, `out.read_table("shard-00000.parquet")`) and never joins
paths or opens files of the tree itself. What an output guarantees is the interface's, not the
caller's:

- every write is atomic: a reader sees a file whole or not at all (written beside, then
  renamed; on object storage one PUT); a finished output is published by writing its
  manifest last (`tasks.artifacts`);
- `lock` is "one launch computes", across hosts: a second launch of the same output waits,
  then reuses (a lease, tasks.lease);
- `parquet` memory-maps a local file (the fast path of training's data reads);
- `local_path` / `staged` hand a path to a library that only reads or writes files
  (safetensors, `np.load`, `torch.save`, matplotlib): the file itself on a local store, a
  node-local cached copy (or an upload on success) on object storage.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tasks import lease


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling path to write; renames it onto `path` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


class StoreAway(ConnectionError):
    """The artifact store stopped answering mid-stage, past its retries. What the stage wrote
    there is kept: relaunched once the store is back, it resumes (a training from its last
    checkpoint in the store)."""


@contextmanager
def failing_cleanly(store: Store, what: str) -> Iterator[None]:
    """A stage's body: when it fails and `store` no longer answers, the error raised is one
    line naming the store and its endpoint (StoreAway), the stage's own as its cause."""
    try:
        yield
    except Exception as err:
        reason = store.away()
        if reason:
            raise StoreAway(
                f"{what} stopped: {reason}; what it wrote there is kept: relaunch once the "
                "store is back"
            ) from err
        raise


@contextmanager
def noted_on(error: BaseException, what: str) -> Iterator[None]:
    """Cleanup on the way out of a failure (an MLflow run's end, a lock's release): a failure
    of its own -- the store that failed the stage is still away -- becomes a note on `error`,
    which stays the one raised."""
    try:
        yield
    except Exception as also:
        error.add_note(f"then {what} failed too: {type(also).__name__}: {also}")


@contextmanager
def first_error_wins(manager: AbstractContextManager, what: str) -> Iterator[Any]:
    """`with manager:`, except that when the block fails, a failure of the manager's exit is
    a note on the block's error (noted_on), not a second error that hides the first."""
    value = manager.__enter__()
    try:
        yield value
    except BaseException as err:
        with noted_on(err, what):
            manager.__exit__(type(err), err, err.__traceback__)
        raise
    manager.__exit__(None, None, None)


@dataclass(frozen=True)
class Store:
    """The artifact root (`paths.artifacts`) as a local directory, resolved once so that every
    worker, whatever its working directory, names the same tree. Its operations take keys:
    "/"-joined names under the root (`train/<key>/ema.safetensors`)."""

    root: str
    # how often a training looks for its stop file: a stat here costs nothing at every step
    poll_s: ClassVar[float] = 0.0

    @classmethod
    def of(cls, artifacts: str | Path) -> Store:
        """The store `paths.artifacts` names: `s3://bucket/prefix`, else a local directory."""
        if str(artifacts).startswith("s3://"):
            from tasks.object_store import S3Store

            return S3Store.of(str(artifacts))
        return cls(str(Path(artifacts).expanduser().resolve()))

    def output(self, *parts: str) -> Output:
        """The output at `<root>/<parts...>`, e.g. `store.output("train", key)`."""
        return Output(self, "/".join(parts))

    def outputs(self, pattern: str) -> list[Output]:
        """The existing locations matching a glob under the root (`"train/*"`), sorted."""
        root = Path(self.root)
        return [Output(self, str(p.relative_to(root))) for p in sorted(root.glob(pattern))]

    def check(self) -> None:
        """Refuses, before any work, a store that cannot be used (nothing to check here)."""

    def away(self) -> str:
        """Why the store does not answer now, asked after a stage failed; "" when it does (a
        local directory always does)."""
        return ""

    def uri(self, key: str) -> str:
        return str(self.path(key))

    def path(self, key: str) -> Path:
        return Path(self.root) / key

    # -- objects ---------------------------------------------------------------------------

    def is_file(self, key: str) -> bool:
        return self.path(key).is_file()

    def any_under(self, prefix: str) -> bool:
        folder = self.path(prefix)
        return folder.is_dir() and any(folder.iterdir())

    def glob(self, prefix: str, pattern: str) -> list[str]:
        base = self.path(prefix)
        return sorted(str(p.relative_to(base)) for p in base.glob(pattern) if p.is_file())

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def sha256(self, key: str) -> str:
        return sha256_file(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.staged(key) as tmp:
            tmp.write_bytes(data)

    def append_line(self, key: str, line: str) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_lines(self, key: str) -> list[str]:
        """The lines `append_line` wrote to `key` ([] when none)."""
        return self.read_bytes(key).decode().splitlines() if self.is_file(key) else []

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    @contextmanager
    def staged(self, key: str) -> Iterator[Path]:
        with atomic_path(self.path(key)) as tmp:
            yield tmp

    def local_path(self, key: str) -> Path:
        return self.path(key)

    def open_input(self, key: str) -> Any:
        """A random-access pyarrow file: a memory map of the local file."""
        import pyarrow as pa

        return pa.memory_map(str(self.path(key)))

    def local_copy(self, prefix: str) -> Path:
        """A local directory holding the output at `prefix` (the directory itself)."""
        return self.path(prefix)

    def scratch(self, name: str) -> Path:
        """A local folder that goes with this store (Prefect's result records)."""
        return self.path(name)

    def location(self, key: str) -> str | Path:
        """Where `key` is, as results and messages carry it: a local path."""
        return self.path(key)

    def ray_storage(self, key: str) -> dict[str, Any]:
        """Ray Train's RunConfig storage arguments for checkpoints under `key`."""
        return {"storage_path": str(self.path(key))}

    # -- whole outputs ---------------------------------------------------------------------

    def make(self, prefix: str) -> None:
        self.path(prefix).mkdir(parents=True, exist_ok=True)

    def move(self, prefix: str, dest: str) -> None:
        self.path(dest).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path(prefix), self.path(dest))

    def free_bytes(self) -> int | None:
        existing = Path(self.root)
        while not existing.exists():
            existing = existing.parent
        return shutil.disk_usage(existing).free

    @contextmanager
    def lock(self, name: str, on_wait: Callable[[str], None]) -> Iterator[None]:
        """A lease on `locks/<name>.lock`, held while the block runs: it holds across hosts,
        on a shared POSIX directory as on object storage (tasks.lease)."""
        held = lease.Lease(self, f"locks/{name}.lock")
        held.acquire(on_wait)
        try:
            yield
        finally:
            held.release()

    # -- conditional objects (the lease's: tasks.lease) ------------------------------------

    def create_if_absent(self, key: str, data: bytes) -> str | None:
        return lease.create_file(self.path(key), data)

    def replace_if_unchanged(self, key: str, data: bytes, token: str) -> str | None:
        return lease.replace_file(self.path(key), data, token)

    def read_with_token(self, key: str) -> tuple[bytes, str] | None:
        return lease.read_file(self.path(key))

    def delete_if_unchanged(self, key: str, token: str) -> bool:
        return lease.delete_file(self.path(key), token)


def matches(name: str, pattern: str) -> bool:
    """Glob matching of "/"-joined names, each part on its own (as pathlib's glob)."""
    parts, wanted = name.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(
        fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted, strict=True)
    )


@dataclass(frozen=True)
class Output:
    """One location in a store: a stage output (`train/<key>`) or a part of one (`units`)."""

    store: Store
    rel: str

    @classmethod
    def at(cls, location: str | Path) -> Output:
        """The output at `<root>/<stage>/<key>` (a result's location, a test's directory)."""
        text = str(location).rstrip("/")
        if text.startswith("s3://"):
            root, stage, key = text.rsplit("/", 2)
            return cls(Store.of(root), f"{stage}/{key}")
        directory = Path(location).expanduser().resolve()
        return cls(Store(str(directory.parents[1])), f"{directory.parent.name}/{directory.name}")

    @property
    def path(self) -> Path:
        """The local directory (a local store's): for what must be handed a directory."""
        return self.store.path(self.rel)

    @property
    def uri(self) -> str:
        return self.store.uri(self.rel)

    @property
    def location(self) -> str | Path:
        """What a stage's result holds: the local directory, or the s3:// URI."""
        return self.store.location(self.rel)

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    @property
    def stage(self) -> str:
        """The stage folder the output sits in (`train` for `train/<key>`)."""
        parts = self.rel.split("/")
        return parts[-2] if len(parts) > 1 else ""

    def child(self, *parts: str) -> Output:
        return Output(self.store, "/".join((self.rel, *parts)))

    def _key(self, name: str) -> str:
        return f"{self.rel}/{name}"

    # -- files -----------------------------------------------------------------------------

    def exists(self, name: str | None = None) -> bool:
        """Whether the file `name` exists; without a name, whether anything is here."""
        if name is None:
            return self.store.any_under(self.rel)
        return self.store.is_file(self._key(name))

    def list(self, pattern: str = "*") -> list[str]:
        """The names of the files here matching a glob (`"*.npz"`, `"step*/results.json"`)."""
        return self.store.glob(self.rel, pattern)

    def size(self, name: str) -> int:
        return self.store.size(self._key(name))

    def sha256(self, name: str) -> str:
        return self.store.sha256(self._key(name))

    def read_bytes(self, name: str) -> bytes:
        return self.store.read_bytes(self._key(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.store.write_bytes(self._key(name), data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json_text(obj))

    def append_line(self, name: str, line: str) -> None:
        """Appends one line (a journal entry): whole lines survive a crash, a torn one is
        the reader's to skip."""
        self.store.append_line(self._key(name), line)

    def read_lines(self, name: str) -> list[str]:
        """What `append_line` wrote to `name`, line by line ([] when nothing)."""
        return self.store.read_lines(self._key(name))

    def remove(self, name: str) -> None:
        self.store.remove(self._key(name))

    @contextmanager
    def staged(self, name: str) -> Iterator[Path]:
        """A local file to write with any library; it becomes `name` whole on success."""
        with self.store.staged(self._key(name)) as tmp:
            yield tmp

    def local_path(self, name: str) -> Path:
        """A local file holding `name`, for a library that reads files."""
        return self.store.local_path(self._key(name))

    def local_copy(self) -> Path:
        """A local directory holding this finished output (training's memory-mapped data)."""
        return self.store.local_copy(self.rel)

    def file(self, name: str) -> StoredFile:
        """The file `name` by name, not by path: what a Ray worker or actor is handed."""
        return StoredFile(self, name)

    def write_arrays(self, name: str, **arrays: Any) -> None:
        """NumPy arrays as one `.npz` (an evaluation unit's sums)."""
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self.write_bytes(name, buffer.getvalue())

    def read_arrays(self, name: str) -> dict[str, Any]:
        """The arrays of an `.npz` written by write_arrays, loaded."""
        import io

        import numpy as np

        with np.load(io.BytesIO(self.read_bytes(name))) as arrays:
            return dict(arrays)

    # -- Parquet ---------------------------------------------------------------------------

    def parquet(self, name: str) -> Any:
        """`name` as a `pyarrow.parquet.ParquetFile`: memory-mapped on a local store (reading
        a row group costs its pages, not the file), ranged reads on object storage."""
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.store.open_input(self._key(name)))

    def read_table(self, name: str, columns: list[str] | None = None) -> Any:
        return self.parquet(name).read(columns=columns)

    def write_table(self, name: str, table: Any, **options: Any) -> None:
        import pyarrow.parquet as pq

        with self.staged(name) as tmp:
            pq.write_table(table, tmp, **options)

    # -- the output as a whole -------------------------------------------------------------

    def make(self) -> None:
        """Makes the location (a directory here; nothing to do on object storage)."""
        self.store.make(self.rel)

    def move_to(self, dest: Output) -> None:
        """Moves the whole output to `dest` (kept, not deleted: `--recompute-stale`)."""
        self.store.move(self.rel, dest.rel)

    def require_free(self, need_bytes: int, what: str) -> None:
        """Refuses, before a stage starts, when the store cannot take the stage's estimated
        output (with a 10 % margin): a clear error now, not ENOSPC hours in. (Object storage
        reports no free space: nothing to check.)"""
        free = self.store.free_bytes()
        if free is not None and free < 1.1 * need_bytes:
            raise OSError(
                f"not enough disk for {what} under {self.uri}: it needs about "
                f"{need_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
            )

    @contextmanager
    def lock(
        self, what: str = "", say: Callable[[str], None] = print, part: str = ""
    ) -> Iterator[None]:
        """Holds this output's lock while it is computed, so that two launches of the same work
        compute it once: the second waits (saying who holds it, when `what` names the work),
        then finds the first one's manifest and reuses it. `part` names a lock of its own for
        a part of the output (its journal). The lock is `locks/<stage>-<key>[-<part>]` in the
        store: what a lock is there is the store's (Store.lock)."""

        def waiting(holder: str) -> None:
            if what:
                say(
                    f"{what} {self.name} is being computed by {holder or 'another process'}: "
                    "waiting for it"
                )

        name = "-".join(filter(None, (self.rel.replace("/", "-"), part)))
        with first_error_wins(self.store.lock(name, waiting), f"releasing the lock {name}"):
            yield


@dataclass(frozen=True)
class StoredFile:
    """One file of an output, named by (output, name) rather than by a path. A path that one
    process resolved names its own node's file (a node-local cached copy on object storage):
    handed to a Ray worker or actor on another node, it names nothing there. Each process
    resolves a StoredFile itself (`local_file`), reading through the store on its own node."""

    out: Output
    name: str

    def local_path(self) -> Path:
        return self.out.local_path(self.name)

    def __str__(self) -> str:  # what results, tags and messages record: the URI
        return self.out.store.uri(self.out._key(self.name))


def local_file(file: str | Path | StoredFile) -> Path:
    """A local path to read: a StoredFile's copy on this node, or a path as given (a user's
    input file, which every node that reads it must have at that path)."""
    return file.local_path() if isinstance(file, StoredFile) else Path(file)
