"""Shard file names: `part-<write uuid>-<task>-<i>.parquet` under `<cache>/shards/split=<split>/`.

Ray Data requires the write uuid in APPEND mode, so two writers never overwrite each other's files.
"""

from __future__ import annotations

from ray.data.datasource import FilenameProvider


class ShardNames(FilenameProvider):
    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06d}-{{i}}.parquet"
