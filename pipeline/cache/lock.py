"""One writer per cache: an exclusive lock file with a heartbeat.

Two precomputes of the same cache_id never interleave their writes: the second waits for the
first and then finds the cache hit. A lock whose heartbeat stopped (its driver died) is stale
and may be taken over, so a resumed run is not blocked forever. Exclusive create is atomic on
local disk (O_EXCL) and on S3 (a conditional PUT, If-None-Match).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable

from pipeline import storage

LOCK_FILE = "_lock.json"
STALE_S = float(os.environ.get("DISTILL_LOCK_STALE_S", "60"))


class CacheLock:
    def __init__(self, cache_uri: str, options: storage.Options = None) -> None:
        self.uri = storage.join(cache_uri, LOCK_FILE)
        self.options = options
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat": time.time()}).encode()

    def try_acquire(self) -> bool:
        fs, path = storage.filesystem(self.uri, self.options)
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with fs.open(path, "xb") as f:
                f.write(self._payload())
        except FileExistsError:
            return False
        self._thread = threading.Thread(target=self._beat, name="cache-lock-heartbeat", daemon=True)
        self._thread.start()
        return True

    def acquire_unless(self, published: Callable[[], bool], log: Callable[[str], None], poll_s: float = 1.0) -> bool:
        """Take the lock, waiting while a live writer holds it and taking over a stale one.

        Returns False, without the lock, as soon as `published()` says another writer finished
        the cache while this one waited.
        """
        waiting = False
        while not self.try_acquire():
            if published():
                return False
            record = self.holder()
            if record and self.is_stale(record):
                log(f"taking over the stale lock of {record.get('owner')} (no heartbeat for {self.stale_hint()})")
                self.break_stale()
            elif record and not waiting:
                log(f"waiting: another precompute of this cache is running ({record.get('owner')})")
                waiting = True
            time.sleep(poll_s)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(max(STALE_S / 4, 0.5)):
            storage.write_bytes_atomic(self.uri, self._payload(), self.options)

    def holder(self) -> dict | None:
        """The current holder's record, or None if there is no lock (or it vanished while reading)."""
        try:
            return json.loads(storage.read_bytes(self.uri, self.options))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @staticmethod
    def stale_hint() -> str:
        return f"{STALE_S:.0f}s"

    @staticmethod
    def is_stale(record: dict) -> bool:
        return time.time() - float(record.get("heartbeat", 0)) > STALE_S

    def break_stale(self) -> None:
        storage.remove_file(self.uri, self.options)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
            self._thread = None
        record = self.holder()
        if record and record.get("owner") == self.owner:
            self.break_stale()
