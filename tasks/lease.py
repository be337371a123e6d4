"""A lock on object storage: a lease object, `locks/<name>.lock`, created only where absent (a
conditional PUT, `If-None-Match: *`), renewed by its holder, taken over once expired (a
conditional PUT on the expired lease's ETag), so of two hosts racing for it exactly one wins,
and a crashed holder blocks nobody for longer than LEASE_S. Expiry reads the holder's clock:
the hosts' clocks are assumed synchronised (NTP) to well under LEASE_S.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from tasks.storage import owner_record

LEASE_S = 60.0  # a lock's lease: renewed every LEASE_S / 3 by its holder


class Lease:
    """A lock object with an expiry, renewed by its holder's thread: created only where absent,
    replaced only on the ETag its taker read (conditional PUTs), so of two hosts racing for it
    exactly one wins; a holder that died stops renewing, and its lease expires."""

    def __init__(self, store: Any, key: str, seconds: float = LEASE_S):
        self.store, self.key, self.seconds = store, store.object(key), seconds
        self.etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(owner_record() | {"expires": time.time() + self.seconds}).encode()

    def _put(self, **condition: str) -> str | None:
        """The new ETag, or None when the condition failed (someone else holds it)."""
        from botocore.exceptions import ClientError

        try:
            answer = self.store.client.put_object(
                Bucket=self.store.bucket, Key=self.key, Body=self._body(), **condition
            )
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return None
            raise
        return answer["ETag"]

    def _current(self) -> tuple[dict, str] | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise
        return json.loads(answer["Body"].read()), answer["ETag"]

    def acquire(self, on_wait: Callable[[str], None], poll: float = 1.0) -> None:
        said = False
        while True:
            self.etag = self._put(IfNoneMatch="*")
            if self.etag is not None:
                break
            current = self._current()
            if current is None:
                continue  # released meanwhile: try again at once
            holder, etag = current
            if holder.get("expires", 0) < time.time():  # its holder stopped renewing
                self.etag = self._put(IfMatch=etag)
                if self.etag is not None:
                    break
            elif not said:
                on_wait(json.dumps({k: holder[k] for k in ("pid", "host", "since")}))
                said = True
            time.sleep(poll)
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                etag = self._put(IfMatch=self.etag)
            except Exception:  # noqa: BLE001 - the store is away: the next renewal retries
                continue
            if etag is None:  # taken over: this holder was presumed dead
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        current = self._current()
        if current is not None and current[1] == self.etag:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key)
