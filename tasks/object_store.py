"""`paths.artifacts=s3://bucket/prefix`: the artifact tree on any S3-compatible object store.

Where it is: the endpoint from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (AWS itself when
unset), the region from `AWS_REGION` or `AWS_DEFAULT_REGION`, the credentials from
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or the rest of boto3's chain), as the launching
process sees them; Ray workers use their own AWS_ credentials when they have them, else the
launcher's, handed over with the job. None of them is part of the config, so none reaches a
run's params, tags or a manifest; the URI does.

What the local layout guarantees holds here too: one object is one PUT, visible whole or not
at all, so every write is atomic and a manifest written last publishes an output. "One launch
computes" is a lease (`locks/<name>.lock`, tasks.lease) made of conditional requests. Reads that
need a file (safetensors, `np.load`, training's memory-mapped Parquet) use a node-local cache
(`IMF_CACHE_DIR`, default the system's temporary folder), filled once per node and checked
by size, and bounded (`IMF_CACHE_MAX_GB`): the least recently used files go first, never one
that a running process has read (it pins the folder, an output, for its life); every request
is retried with backoff (`IMF_S3_RETRIES` attempts, default RETRIES) before the stage fails,
in one line naming the store (StoreAway).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from pyarrow import fs

from tasks.storage import Store, matches, sha256_file

RETRIES = 8  # attempts of each request (IMF_S3_RETRIES), with exponential backoff
RETRIES_VARIABLE = "IMF_S3_RETRIES"
CHUNK = 1 << 22
CHECK_RETRIES = 3  # attempts of the check before any work (a store down at launch: seconds)
PARTS, FOLD_EVERY = ".parts", 64  # an appended object's lines, folded every 64 (append_line)
CACHE_MAX_GB = 100.0  # the node cache's bound (IMF_CACHE_MAX_GB): above one training's data


KEY_ID, SECRET = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def retries() -> int:
    """IMF_S3_RETRIES: the attempts of each request before it fails (default RETRIES). With
    the clients' exponential backoff, 8 wait about 45 s in all for pyarrow, and half a minute
    on average for boto3, whose waits are drawn at random (a few seconds, some draws)."""
    text = os.environ.get(RETRIES_VARIABLE) or str(RETRIES)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{RETRIES_VARIABLE}={text!r}: expected a whole number of attempts >= 1")
    return int(text)


@dataclass(frozen=True)
class S3Store(Store):
    """The artifact tree under `s3://<bucket>/<prefix>`; `root` is that URI. Picklable (Ray
    workers get the store in their job): the clients are made in each process."""

    bucket: str = ""
    prefix: str = ""
    endpoint: str = ""  # "" = AWS
    region: str = "us-east-1"
    retries: int = field(default=RETRIES, compare=False)  # the launcher's IMF_S3_RETRIES
    # the launcher's (key id, secret), for workers without their own; never printed
    credentials: tuple[str, str] | None = field(default=None, repr=False, compare=False)
    poll_s: ClassVar[float] = 2.0  # a HEAD request per step would cost a small step's time

    @classmethod
    def of(cls, uri: str) -> S3Store:
        rest = uri.removeprefix("s3://").strip("/")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"paths.artifacts={uri!r}: expected s3://<bucket>[/<prefix>]")
        key, secret = os.environ.get(KEY_ID), os.environ.get(SECRET)
        credentials = (key, secret) if key and secret else None
        root = f"s3://{bucket}/{prefix}".rstrip("/")
        return cls(root, bucket, prefix, endpoint(), region(), retries(), credentials)

    def _credentials(self) -> dict[str, str]:
        """This process's own AWS_ credentials win; else the launcher's; else boto3's chain.
        Explicit where known: pyarrow's filesystem, pickled to Ray Train's processes, must
        not look them up again where they are not set."""
        key, secret = os.environ.get(KEY_ID), os.environ.get(SECRET)
        if key and secret:
            return {"aws_access_key_id": key, "aws_secret_access_key": secret}
        if self.credentials is None:
            return {}
        return {
            "aws_access_key_id": self.credentials[0],
            "aws_secret_access_key": self.credentials[1],
        }

    # -- clients (one per process) ---------------------------------------------------------

    @functools.cached_property
    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"max_attempts": self.retries, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        # a session of its own: boto3's default one keeps the first credentials it found
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint or None,
            region_name=self.region,
            config=config,
            **self._credentials(),
        )

    @functools.cached_property
    def fs(self) -> Any:
        """pyarrow's S3FileSystem (ranged Parquet reads, Ray Train's storage_filesystem). It
        does not read AWS_ENDPOINT_URL itself: the endpoint is passed explicitly."""
        url = self.endpoint
        options: dict[str, Any] = {"region": self.region}
        if url:
            scheme, _, host = url.partition("://")
            options |= {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        credentials = self._credentials()
        if credentials:
            options |= {
                "access_key": credentials["aws_access_key_id"],
                "secret_key": credentials["aws_secret_access_key"],
            }
        return RetryingS3FileSystem(self.retries, options)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("client", "fs")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def object(self, key: str) -> str:
        return f"{self.prefix}/{key}".lstrip("/")

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    def path(self, key: str) -> Path:
        raise TypeError(f"{self.uri(key)} is on object storage: it has no local path")

    def scratch(self, name: str) -> Path:
        return cache_dir() / self.bucket / self.prefix / name

    def location(self, key: str) -> str:
        return self.uri(key)

    def ray_storage(self, key: str) -> dict[str, Any]:
        """Ray Train writes its checkpoints to the store itself (pyarrow's S3FileSystem)."""
        return {"storage_path": self.fs_path(key), "storage_filesystem": self.fs}

    def fs_path(self, key: str) -> str:
        """`bucket/prefix/key`: the name pyarrow's filesystem (and Ray Train) use."""
        return f"{self.bucket}/{self.object(key)}"

    def check(self) -> None:
        """Refuses, before any work and in one line, an endpoint that does not answer,
        credentials the store refuses, or a missing bucket."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = (
            f"AWS_ENDPOINT_URL={self.endpoint}" if self.endpoint else "AWS (no AWS_ENDPOINT_URL)"
        )
        # a few attempts, not the stage's retries: a mistyped endpoint is refused in seconds
        client = replace(self, retries=min(self.retries, CHECK_RETRIES)).client
        try:
            # a listing needs the credentials (some servers answer HEAD on a bucket to anyone)
            client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (EndpointConnectionError, ConnectionError) as err:
            raise ValueError(
                f"paths.artifacts={self.root}: no S3 server answers at {where} ({err})"
            ) from None
        except NoCredentialsError:
            raise ValueError(
                f"paths.artifacts={self.root}: no credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY)"
            ) from None
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                raise ValueError(
                    f"paths.artifacts={self.root}: bucket {self.bucket!r} does not exist at "
                    f"{where} (create it first)"
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ValueError(
                    f"paths.artifacts={self.root}: {where} refused the credentials of "
                    f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({code})"
                ) from None
            raise

    def away(self) -> str:
        """After a failed stage: why the store does not answer now (check's line), or "". One
        attempt: the stage's requests have waited out their retries already."""
        try:
            replace(self, retries=1).check()
        except Exception as err:  # noqa: BLE001 - whatever the probe meets is the answer
            return f"{err} (each request tried {self.retries} times, {RETRIES_VARIABLE})"
        return ""

    # -- objects ---------------------------------------------------------------------------

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.object(key))
        except ClientError as err:
            if _missing(err):
                return None
            raise

    def _get(self, key: str) -> dict | None:
        """The GET answer for `key` (its body still to read), or None where it is absent."""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.object(key))
        except ClientError as err:
            if _missing(err):
                return None
            raise

    def _keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(name under `prefix`, size) of every object there. Not the "directory" markers
        (empty keys ending in "/") that pyarrow's filesystem makes under Ray Train's
        checkpoints: they are no files, and a store may list one that it cannot copy."""
        start = self.object(prefix).rstrip("/") + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start
        )
        for page in pages:
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    yield item["Key"][len(start) :], item["Size"]

    def is_file(self, key: str) -> bool:
        return self._head(key) is not None

    def any_under(self, prefix: str) -> bool:
        return next(self._keys(prefix), None) is not None

    def glob(self, prefix: str, pattern: str) -> list[str]:
        return sorted(name for name, _ in self._keys(prefix) if matches(name, pattern))

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(self.uri(key))
        return int(head["ContentLength"])

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        body = self.client.get_object(Bucket=self.bucket, Key=self.object(key))["Body"]
        while block := body.read(CHUNK):
            digest.update(block)
        return digest.hexdigest()

    def read_bytes(self, key: str) -> bytes:
        answer = self._get(key)
        if answer is None:
            raise FileNotFoundError(self.uri(key))
        return answer["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.object(key), Body=data)

    def append_line(self, key: str, line: str) -> None:
        """Object storage has no append, and rewriting the whole object per line would cost
        a paper-scale journal (24k lines, 7 MB) 24k rewrites, on rank 0's step. Each line is
        an object of its own, `<key>.parts/<n>`, created only where absent (of two writers,
        one takes a number); every FOLD_EVERY of them are folded into `key`, whose metadata
        says how many parts it holds (`read_lines` reads the two together)."""
        data = (line.rstrip("\n") + "\n").encode()
        while True:
            n = self._parts_end(key)
            if self.create_if_absent(f"{key}{PARTS}/{n:010d}", data) is None:
                continue  # another writer took the number
            head = self._head(key)
            if head is None or n >= int(head.get("Metadata", {}).get("parts", 0)):
                break
            # another writer's fold took this number's slot meanwhile: the line would be
            # hidden behind the base; written again after it
            self.remove(f"{key}{PARTS}/{n:010d}")
        if (n + 1) % FOLD_EVERY == 0:
            self._fold(key)

    def read_lines(self, key: str) -> list[str]:
        for _ in range(RETRIES):
            parts = self._part_numbers(key)  # listed before the base: a fold between the two
            base = self._base(key)  # only moves parts into the base
            try:
                tail = [self.read_bytes(f"{key}{PARTS}/{n:010d}") for n in parts if n >= base[1]]
            except FileNotFoundError:
                continue  # folded and deleted meanwhile: read again
            return b"".join([base[0], *tail]).decode().splitlines()
        raise RuntimeError(f"{self.uri(key)}: its parts kept being folded while read")

    def _base(self, key: str) -> tuple[bytes, int, str | None]:
        """The folded object: its bytes, how many parts it holds, its ETag (None: absent)."""
        answer = self._get(key)
        if answer is None:
            return b"", 0, None
        held = int(answer.get("Metadata", {}).get("parts", 0))
        return answer["Body"].read(), held, answer["ETag"]

    def _part_numbers(self, key: str) -> list[int]:
        return sorted(int(name) for name, _ in self._keys(f"{key}{PARTS}"))

    def _parts_end(self, key: str) -> int:
        """The number of the next part: after the last one, or after those folded."""
        parts = self._part_numbers(key)
        return parts[-1] + 1 if parts else self._base(key)[1]

    def _fold(self, key: str) -> None:
        """Folds the parts written so far into `key` (a conditional PUT on the base read: of
        two folds, one lands), then deletes them."""
        parts = self._part_numbers(key)
        data, held, etag = self._base(key)
        parts = [n for n in parts if n >= held]
        if not parts:
            return
        lines = [self.read_bytes(f"{key}{PARTS}/{n:010d}") for n in parts]
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        metadata = {"parts": str(parts[-1] + 1)}
        if self._put_if(key, b"".join([data, *lines]), Metadata=metadata, **condition) is None:
            return  # another fold landed first
        for n in parts:
            self.remove(f"{key}{PARTS}/{n:010d}")

    def remove(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object(key))

    @contextmanager
    def staged(self, key: str) -> Iterator[Path]:
        """A local scratch file, uploaded as `key` (one PUT) when the block succeeds."""
        with tempfile.TemporaryDirectory(prefix="imf-stage-") as scratch:
            tmp = Path(scratch) / Path(key).name
            yield tmp
            self.client.upload_file(str(tmp), self.bucket, self.object(key))

    def local_path(self, key: str, sha256: str = "") -> Path:
        """A node-local copy of `key`, downloaded once per node and checked by size (and, when
        given, by the SHA-256 its manifest records: a corrupt object is never read)."""
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(self.uri(key))
        path = cache_dir() / self.bucket / self.object(key)
        _pin(path.parent)  # before the check: from here on, no process evicts it
        with _node_lock(path):
            if not (path.is_file() and path.stat().st_size == head["ContentLength"]):
                _make_room(head["ContentLength"])
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                self.client.download_file(self.bucket, self.object(key), str(tmp))
                if sha256 and sha256_file(tmp) != sha256:
                    tmp.unlink()
                    raise ValueError(
                        f"{self.uri(key)} does not hold the bytes its manifest records "
                        "(SHA-256 differs): it is not read; recompute its output"
                    )
                os.replace(tmp, path)
            os.utime(path)  # its last use: the cache evicts the least recently used first
        return path

    def open_input(self, key: str) -> Any:
        return self.fs.open_input_file(self.fs_path(key))

    def local_copy(self, prefix: str) -> Path:
        """A node-local copy of the finished output at `prefix`: its manifest and the files
        it lists (what the workers of one node memory-map: one copy per node, not per
        worker), each fetched once and checked against the manifest's SHA-256."""
        manifest = json.loads(self.read_bytes(f"{prefix}/_SUCCESS"))
        for f in manifest["files"]:
            self.local_path(f"{prefix}/{f['name']}", f["sha256"])
        return self.local_path(f"{prefix}/_SUCCESS").parent

    # -- whole outputs ---------------------------------------------------------------------

    def make(self, prefix: str) -> None:
        """Nothing to make: a prefix exists once an object is under it."""

    def move(self, prefix: str, dest: str) -> None:
        """Copies every object under `prefix` to `dest`, then deletes the originals."""
        names = [name for name, _ in self._keys(prefix)]
        for name in names:
            source = {"Bucket": self.bucket, "Key": self.object(f"{prefix}/{name}")}
            self.client.copy(source, self.bucket, self.object(f"{dest}/{name}"))
        for name in names:
            self.remove(f"{prefix}/{name}")

    def free_bytes(self) -> None:
        return None  # object storage reports no free space

    # -- conditional objects (the lease's: tasks.lease) ------------------------------------

    def _put_if(self, key: str, data: bytes, **options: Any) -> str | None:
        """The new ETag, or None where the condition in `options` failed."""
        from botocore.exceptions import ClientError

        try:
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self.object(key), Body=data, **options
            )
        except ClientError as err:
            if _refused(err):
                return None
            raise
        return answer["ETag"]

    def create_if_absent(self, key: str, data: bytes) -> str | None:
        return self._put_if(key, data, IfNoneMatch="*")

    def replace_if_unchanged(self, key: str, data: bytes, token: str) -> str | None:
        return self._put_if(key, data, IfMatch=token)

    def read_with_token(self, key: str) -> tuple[bytes, str] | None:
        answer = self._get(key)
        return None if answer is None else (answer["Body"].read(), answer["ETag"])

    def delete_if_unchanged(self, key: str, token: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object(key), IfMatch=token)
        except ClientError as err:
            if _refused(err) or _missing(err):
                return False
            raise
        return True


def _missing(err: Any) -> bool:
    """Whether a request failed because the object is not there."""
    return err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _refused(err: Any) -> bool:
    """Whether a conditional request failed on its condition (another version is there)."""
    code = err.response.get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class RetryingS3FileSystem(fs.S3FileSystem):
    """pyarrow's S3FileSystem, retrying each request `retries` times, also once pickled: Ray
    Train hands its storage_filesystem to its controller and workers pickled, and pyarrow's
    own pickle drops the retry strategy (they would retry 3 times, about 2 s)."""

    def __init__(self, retries: int, options: dict[str, Any]):
        strategy = fs.AwsStandardS3RetryStrategy(max_attempts=retries)
        super().__init__(retry_strategy=strategy, **options)
        self.arguments = (retries, options)

    def __reduce__(self) -> tuple[type, tuple[int, dict[str, Any]]]:
        return RetryingS3FileSystem, self.arguments


def cache_dir() -> Path:
    """The node-local cache of objects read as files (IMF_CACHE_DIR)."""
    default = Path(tempfile.gettempdir()) / "imf-cache"
    return Path(os.environ.get("IMF_CACHE_DIR") or default)


def cache_bound() -> int:
    """The node cache's bound in bytes (IMF_CACHE_MAX_GB)."""
    text = os.environ.get("IMF_CACHE_MAX_GB") or str(CACHE_MAX_GB)
    try:
        return int(float(text) * 1e9)
    except ValueError:
        raise ValueError(f"IMF_CACHE_MAX_GB={text!r}: expected a number of GB") from None


@contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """One download per node: the processes of a node wait for the one fetching `path`."""
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


_pins: dict[Path, int] = {}  # the cache folders this process reads from: their `.pin`s


def _pin(folder: Path) -> None:
    """Keeps the cached files in `folder` from eviction while this process runs: a shared
    lock on `folder/.pin`, which the kernel releases when the process ends (a worker that
    memory-maps a shard holds it for its life). One per folder (one output), not per file."""
    if folder not in _pins:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".pin", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _pins[folder] = fd


def _make_room(need: int) -> None:
    """Evicts the least recently used cached files of folders no process has pinned until
    `need` more bytes fit under the bound (or nothing more can go: pinned files stay)."""
    cached = []  # (last use, size, path) of the files local_path placed (each has its lock)
    for folder, _, names in os.walk(cache_dir()):
        for name in names:
            path = Path(folder, name)
            if name.startswith(".") or not path.with_name(f".{name}.lock").exists():
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # evicted meanwhile by another process
            cached.append((st.st_mtime, st.st_size, path))
    total, bound = sum(size for _, size, _ in cached), cache_bound()
    for _, size, path in sorted(cached):
        if total + need <= bound:
            return
        with open(path.parent / ".pin", "a") as pin:
            try:  # refused while any process, this one too, has the folder pinned
                fcntl.flock(pin, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            path.unlink(missing_ok=True)
            total -= size
