"""A node-local copy of the shards workers read from an object store, bounded in size.

A worker reads the same shards every epoch (its lanes: see order.py), so from the second epoch on
a shard it streams comes from this directory instead of another GET. Whole shard files are kept
(one GET each, the columns chosen when read); past `max_bytes` the least recently used go. Workers
on one node may share the directory: a file appears whole (written aside, then renamed) or not at all.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pyarrow.fs as pafs


class LocalShardCache:
    def __init__(self, directory: str, max_bytes: int, cache_uri: str) -> None:
        # One folder per cache, so caches sharing a node never mix.
        self.root = os.path.join(directory, hashlib.sha256(cache_uri.encode()).hexdigest()[:16])
        self.max_bytes = max_bytes
        self.hits = self.misses = 0

    def path(self, fs: pafs.FileSystem, remote: str, relative: str) -> str | None:
        """A local path holding `remote` (fetched now if missing), or None where it cannot be kept
        (larger than the budget, or the disk refused it): then read the object store directly."""
        local = os.path.join(self.root, relative)
        if os.path.exists(local):
            os.utime(local)  # recently used
            self.hits += 1
            return local
        self.misses += 1
        size = fs.get_file_info(remote).size or 0
        if size > self.max_bytes:
            return None
        try:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            self._make_room(size)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local), suffix=".part")
            with os.fdopen(fd, "wb") as out, fs.open_input_stream(remote) as src:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            os.replace(tmp, local)
        except OSError:
            if "tmp" in locals() and os.path.exists(tmp):
                os.remove(tmp)
            return None
        return local

    def _make_room(self, incoming: int) -> None:
        files = []
        for folder, _, names in os.walk(self.root):
            for name in names:
                p = os.path.join(folder, name)
                try:
                    st = os.stat(p)
                except FileNotFoundError:  # another worker evicted it
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total + incoming <= self.max_bytes:
                break
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
            total -= size
