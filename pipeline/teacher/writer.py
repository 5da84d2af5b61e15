"""Shard file names: `part-<write uuid>-<task>-<i>.parquet` under `<cache>/shards/split=<split>/`.

Ray Data requires the write uuid in APPEND mode, so two writers never overwrite each other's files.
The name must not carry the `{i}` template itself: Ray Data's checkpoint recovery finds a
task's uncommitted files by the prefix of this name, and a literal `{i}` in it matches nothing
(an interrupted run then left a duplicate block behind). Ray appends `-{i}` on its own.
"""

from __future__ import annotations

from ray.data.datasource import FilenameProvider


# zstd with Parquet's dictionary pages: MNIST's uint8 pixels take 173 bytes a row against snappy's 229,
# below the 221 of the gzipped CSV the package ships them in. Every Arrow reader decodes it.
SHARD_COMPRESSION = "zstd"


class ShardNames(FilenameProvider):
    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06d}.parquet"
