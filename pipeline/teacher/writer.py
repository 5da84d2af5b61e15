"""Shard file names: `<split>-<write uuid>-<task>-<i>.parquet` under `<cache>/shards/`.

The split leads the name so the manifest can be built from a listing; Ray Data requires the
write uuid in APPEND mode so two writers never overwrite each other's files.
"""

from __future__ import annotations

from ray.data.datasource import FilenameProvider


class ShardNames(FilenameProvider):
    def __init__(self, split: str) -> None:
        self.split = split

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.split}-{write_uuid}-{task_index:06d}-{{i}}.parquet"
