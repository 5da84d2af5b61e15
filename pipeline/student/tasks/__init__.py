"""Student tasks by the name a cache's manifest gives (`task`). Adding a task kind is one module
implementing `pipeline.student.tasks.base.Task` and one line here; the trainer does not change."""

from __future__ import annotations

from pipeline.cache.manifest import Manifest
from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.student.tasks.base import Task
from pipeline.student.tasks.classification import ClassificationTask
from pipeline.student.tasks.tokens import TokenTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (ClassificationTask, TokenTask)}


def task_for(cfg: TrainConfig, manifest: Manifest) -> Task:
    """The task that reads this cache, built for this student config (a DistillError if the cache
    cannot serve the config's loss terms)."""
    if manifest.task not in TASKS:
        raise DistillError(f"cache {manifest.cache_id} is for a {manifest.task!r} student, which this distill does not know",
                           f"known tasks: {sorted(TASKS)}; upgrade distill-pipeline")
    return TASKS[manifest.task](cfg, manifest)


__all__ = ["TASKS", "Task", "task_for"]
