""" "One launch computes", on any store: a lease object, `locks/<name>.lock`, that two hosts
cannot both hold.

The lease is one implementation over four conditional operations on one object, which each
store provides (`ConditionalObjects`): create it only where absent, read it with a token of its
version, replace or delete it only if it is still at the version read. A launch creates the
lease; a second launch, finding it, reads it and waits. Its holder renews it every LEASE_S / 3
(a replace on its own token); a holder that stopped renewing is taken over once the lease has
expired (a replace on the expired version's token: of two takers exactly one wins). A holder on
the same machine (same host name, boot and pid namespace) that has died is taken over at once:
the lease records its pid and that process's start time, so a reused pid is not mistaken for
it. Expiry reads the holder's clock: the hosts' clocks are assumed synchronised (NTP) to well
under LEASE_S.

On object storage the operations are conditional PUTs and DELETEs (`If-None-Match: *`,
`If-Match: <ETag>`; tasks.object_store). On a POSIX directory shared by several hosts (NFS),
where `flock` often holds per host only, they are made of what such file systems do
atomically, exclusive creation and rename:

- create: the record is written to a private temporary file, then hard-linked to the lease's
  name: `link(2)` fails if the name exists (the exclusive create that open(2)'s manual
  recommends on NFS, where O_EXCL was not always atomic), and the file appears whole, so a
  reader never sees it half-written. The link count of the temporary file says whether the
  link was made, even when NFS retransmits a request and answers EEXIST to a link it made.
- the token of a version is the SHA-256 of its bytes; every lease record holds a random nonce,
  so a version's token is never seen again once it is replaced.
- replace and delete on token T first claim T: a claim file `.<name>.<T>.<g>`, created as
  above, so that of all processes wanting to change version T exactly one holds a claim. The
  claimant then checks that the file is still at T and renames the new record (written
  beside it beforehand) over it, or unlinks it, then removes the claims of T. Creation cannot
  interfere: it succeeds only where the lease is absent, and it is absent only once deleted
  under a claim.
- a claimant that died would block T forever, so a claim is short: its claimant gives up
  without changing anything when more than GUARD_S / 2 has passed since it claimed, and a claim
  older than GUARD_S (by the time it records) is stale: the next claimant creates the next
  generation, `g + 1`, instead of removing it, so two processes breaking a stale claim race for
  one new name, never for the removal of a live one. This holds as long as a claimant does not
  stall for GUARD_S / 2 between its last clock check and its rename (a few system calls).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

LEASE_S = 60.0  # a lock's lease: renewed every LEASE_S / 3 by its holder
GUARD_S = 10.0  # a claim on a version of a lease file on a POSIX directory (see the module)


class ConditionalObjects(Protocol):
    """What a store offers the lease: conditional operations on one object, by key."""

    def create_if_absent(self, key: str, data: bytes) -> str | None:
        """The new version's token, or None where the object exists."""

    def replace_if_unchanged(self, key: str, data: bytes, token: str) -> str | None:
        """The new version's token, or None where the object is no longer at `token`."""

    def read_with_token(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and their version's token, or None where it is absent."""

    def delete_if_unchanged(self, key: str, token: str) -> bool:
        """Whether the object, still at `token`, was deleted."""


# -- who holds a lease ---------------------------------------------------------------------


def owner_record() -> dict[str, Any]:
    """Who holds a lock: shown to whoever waits for it, and enough for a process on the same
    machine to tell whether that holder still runs."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.ctime(),
        "machine": machine(),
        "started": started(os.getpid()),
    }


def machine() -> str:
    """This boot of this machine, in this pid namespace (where a pid names one process): ""
    where the system does not say (then only expiry frees a dead holder's lease)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def started(pid: int) -> str:
    """When the process `pid` started (clock ticks since boot), "" where none runs (a zombie
    runs nothing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if fields[0] == "Z" else fields[19]


def gone(holder: dict[str, Any]) -> bool:
    """Whether `holder` ran on this machine and has died: its pid runs no process, or one that
    started at another time (the pid was reused)."""
    here = holder.get("host") == socket.gethostname() and holder.get("machine") == machine()
    return (
        here and bool(holder["machine"]) and started(holder.get("pid", 0)) != holder.get("started")
    )


# -- the lease -----------------------------------------------------------------------------


class Lease:
    """A lock object with an expiry, renewed by its holder's thread (see the module)."""

    def __init__(self, store: ConditionalObjects, key: str, seconds: float = LEASE_S):
        self.store, self.key, self.seconds = store, key, seconds
        self.owner = owner_record()
        self.token: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        record = self.owner | {"expires": time.time() + self.seconds, "nonce": secrets.token_hex(8)}
        return json.dumps(record).encode()

    def acquire(self, on_wait: Callable[[str], None], poll: float = 1.0) -> None:
        """Holds the lease; calls `on_wait` once, with its holder, when it has to wait."""
        said, pause = False, 0.05  # short pauses first: a lock is often held briefly
        while True:
            self.token = self.store.create_if_absent(self.key, self._body())
            if self.token is not None:
                break
            current = self.store.read_with_token(self.key)
            if current is None:
                continue  # released meanwhile: try again at once
            holder, token = record(current[0]), current[1]
            if holder.get("expires", 0) < time.time() or gone(holder):
                self.token = self.store.replace_if_unchanged(self.key, self._body(), token)
                if self.token is not None:
                    break
            elif not said:
                on_wait(json.dumps({k: holder.get(k) for k in ("pid", "host", "since")}))
                said = True
            time.sleep(pause)
            pause = min(2 * pause, poll)
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                token = self.store.replace_if_unchanged(self.key, self._body(), self.token)
            except Exception:  # noqa: BLE001 - the store is away: the next renewal retries
                continue
            if token is None:  # taken over: this holder was presumed dead
                return
            self.token = token

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        self.store.delete_if_unchanged(self.key, self.token)


def record(data: bytes) -> dict[str, Any]:
    """A lease's record; {} (expired) for what no lease wrote (an older version's lock file)."""
    try:
        found = json.loads(data)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


# -- conditional files on a POSIX directory (see the module) -------------------------------


def token_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def create_file(path: Path, data: bytes) -> str | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    return token_of(data) if _link_new(path, data) else None


def read_file(path: Path) -> tuple[bytes, str] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data, token_of(data)


def replace_file(path: Path, data: bytes, token: str) -> str | None:
    tmp = _private(path)
    tmp.write_bytes(data)  # before the claim: under it, only a rename
    try:
        return token_of(data) if _under_claim(path, token, lambda: os.replace(tmp, path)) else None
    finally:
        tmp.unlink(missing_ok=True)


def delete_file(path: Path, token: str) -> bool:
    return _under_claim(path, token, path.unlink)


def _private(path: Path) -> Path:
    return path.with_name(f".{path.name}.new-{secrets.token_hex(6)}")


def _link_new(path: Path, data: bytes) -> bool:
    """Creates `path` holding `data`, whole, only where it is absent."""
    tmp = _private(path)
    tmp.write_bytes(data)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # made by another, or by us and answered twice (NFS): the count says which
        return tmp.stat().st_nlink == 2
    finally:
        tmp.unlink()


def _under_claim(path: Path, token: str, change: Callable[[], None]) -> bool:
    """Runs `change` if this process claims version `token` of `path` and finds the file still
    at it, in time; whether it ran."""
    claims = f".{path.name}.{token[:32]}"
    generation = 0
    while True:
        begun = time.monotonic()
        claim = path.with_name(f"{claims}.{generation}")
        if _link_new(claim, json.dumps({"at": time.time()}).encode()):
            break
        try:
            at = record(claim.read_bytes()).get("at", 0)
        except FileNotFoundError:
            continue  # its claimant is done: claim this generation again
        if time.time() - at < GUARD_S:
            return False  # another process is changing this version
        generation += 1  # a stale claim: its claimant died or gave up
    current = read_file(path)
    if current is None or current[1] != token:
        changed = False  # changed already: the version is gone
    elif time.monotonic() - begun > GUARD_S / 2:
        return False  # too late: another may have claimed it since; the claim goes stale
    else:
        change()
        changed = True
    for stale in path.parent.glob(f"{claims}.*"):  # the version is gone: so are its claims
        stale.unlink(missing_ok=True)
    return changed
