"""Where the pipeline's outputs live: one small interface every stage reads and writes through.

`paths.artifacts` names a `Store` (today a local directory, the same tree on every node that
mounts it); each stage output is an `Output` in it, `<stage>/<key>/`, and a stage names the
files of its output (`out.write_json("results.json", ...)`, `out.read_table("shard-00000.parquet")`)
and never joins paths or opens files of the tree itself. What an output guarantees is the
interface's, not the caller's:

- every write is atomic: a reader sees a file whole or not at all (written beside, then
  renamed); a finished output is published by writing its manifest last (`tasks.artifacts`);
- `lock` is "one launch computes": a second launch of the same output waits, then reuses;
- `parquet` memory-maps a local file (the fast path of training's data reads);
- `local_path` / `staged` hand a path to a library that only reads or writes files
  (safetensors, `np.load`, `torch.save`, matplotlib), the file itself on a local store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


@dataclass(frozen=True)
class Store:
    """The artifact root (`paths.artifacts`): a local directory, resolved once so that every
    worker, whatever its working directory, names the same tree."""

    root: str

    @classmethod
    def of(cls, artifacts: str | Path) -> Store:
        return cls(str(Path(artifacts).expanduser().resolve()))

    def output(self, *parts: str) -> Output:
        """The output at `<root>/<parts...>`, e.g. `store.output("train", key)`."""
        return Output(self, "/".join(parts))

    def outputs(self, pattern: str) -> list[Output]:
        """The existing locations matching a glob under the root (`"train/*"`), sorted."""
        root = Path(self.root)
        return [Output(self, str(p.relative_to(root))) for p in sorted(root.glob(pattern))]

    def free_bytes(self) -> int:
        existing = Path(self.root)
        while not existing.exists():
            existing = existing.parent
        return shutil.disk_usage(existing).free


@dataclass(frozen=True)
class Output:
    """One location in a store: a stage output (`train/<key>`) or a part of one (`units`)."""

    store: Store
    rel: str

    @classmethod
    def at(cls, directory: str | Path) -> Output:
        """The output in a local directory `<root>/<stage>/<key>` (a result's path, a test's)."""
        directory = Path(directory).expanduser().resolve()
        return cls(Store(str(directory.parents[1])), f"{directory.parent.name}/{directory.name}")

    @property
    def path(self) -> Path:
        """The local directory: for what must be handed a directory (Ray's storage_path)."""
        return Path(self.store.root) / self.rel

    @property
    def uri(self) -> str:
        return str(self.path)

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

    # -- files -----------------------------------------------------------------------------

    def exists(self, name: str | None = None) -> bool:
        """Whether the file `name` exists; without a name, whether anything is here."""
        if name is None:
            return self.path.is_dir() and any(self.path.iterdir())
        return (self.path / name).is_file()

    def list(self, pattern: str = "*") -> list[str]:
        """The names of the files here matching a glob (`"*.npz"`, `"step*/results.json"`)."""
        base = self.path
        return sorted(str(p.relative_to(base)) for p in base.glob(pattern) if p.is_file())

    def size(self, name: str) -> int:
        return (self.path / name).stat().st_size

    def sha256(self, name: str) -> str:
        return sha256_file(self.path / name)

    def read_bytes(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def read_text(self, name: str) -> str:
        return (self.path / name).read_text()

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.staged(name) as tmp:
            tmp.write_bytes(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json_text(obj))

    def append_line(self, name: str, line: str) -> None:
        """Appends one line (a journal entry): whole lines survive a crash, a torn one is
        the reader's to skip."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / name).open("a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    @contextmanager
    def staged(self, name: str) -> Iterator[Path]:
        """A local file to write with any library; it becomes `name` whole on success."""
        with atomic_path(self.path / name) as tmp:
            yield tmp

    def local_path(self, name: str) -> Path:
        """A local file holding `name`, for a library that reads files (the file itself)."""
        return self.path / name

    def write_arrays(self, name: str, **arrays: Any) -> None:
        """NumPy arrays as one `.npz` (an evaluation unit's sums)."""
        import numpy as np

        with self.staged(name) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def read_arrays(self, name: str) -> dict[str, Any]:
        """The arrays of an `.npz` written by write_arrays, loaded."""
        import numpy as np

        with np.load(self.path / name) as arrays:
            return dict(arrays)

    # -- Parquet ---------------------------------------------------------------------------

    def parquet(self, name: str) -> Any:
        """`name` as a `pyarrow.parquet.ParquetFile`, memory-mapped: reading a row group costs
        its pages, not the file."""
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path / name, memory_map=True)

    def read_table(self, name: str, columns: list[str] | None = None) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(self.path / name, columns=columns, memory_map=True)

    def write_table(self, name: str, table: Any, **options: Any) -> None:
        import pyarrow.parquet as pq

        with self.staged(name) as tmp:
            pq.write_table(table, tmp, **options)

    # -- the output as a whole -------------------------------------------------------------

    def make(self) -> None:
        """Makes the location (a directory here; nothing to do on object storage)."""
        self.path.mkdir(parents=True, exist_ok=True)

    def move_to(self, dest: Output) -> None:
        """Moves the whole output to `dest` (kept, not deleted: `--recompute-stale`)."""
        dest.path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, dest.path)

    def require_free(self, need_bytes: int, what: str) -> None:
        """Refuses, before a stage starts, when the store cannot take the stage's estimated
        output (with a 10 % margin): a clear error now, not ENOSPC hours in."""
        free = self.store.free_bytes()
        if free < 1.1 * need_bytes:
            raise OSError(
                f"not enough disk for {what} under {self.path}: it needs about "
                f"{need_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
            )

    @contextmanager
    def lock(
        self, what: str = "", say: Callable[[str], None] = print, part: str = ""
    ) -> Iterator[None]:
        """Holds this output's lock while it is computed, so that two launches of the same work
        compute it once: the second waits (saying who holds it, when `what` names the work),
        then finds the first one's manifest and reuses it. `part` names a lock of its own for
        a part of the output (its journal). An OS file lock (flock) on
        `<root>/locks/<stage>-<key>[-<part>].lock`: the kernel releases it when its holder
        dies, so a killed holder's lock is simply taken over. (flock is per host on most
        network file systems: one launch per output across nodes.)"""
        name = "-".join(filter(None, (self.rel.replace("/", "-"), part)))
        path = Path(self.store.root) / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                if what:
                    say(
                        f"{what} {self.name} is being computed by "
                        f"{holder or 'another process'}: waiting for it"
                    )
                fcntl.flock(fd, fcntl.LOCK_EX)
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
