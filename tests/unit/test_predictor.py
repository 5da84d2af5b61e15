"""The teacher actor's errors: a device out-of-memory names the batch size to lower, not a row."""

import numpy as np
import pytest
import torch

from pipeline.cache.schema import SAMPLE_ID, X
from pipeline.errors import DistillError
from pipeline.teacher.predictor import TeacherPredictor

TEACHER = {"factory": "pipeline.models.builtin:mnist_cnn", "kwargs": {"width": 8}, "weights": None}


def test_out_of_memory_names_the_batch_size_to_lower(monkeypatch):
    predictor = TeacherPredictor({"teacher": TEACHER}, (1, 28, 28), 10, "float32")
    batch = {SAMPLE_ID: np.array([f"r{i}" for i in range(6)]), X: np.zeros((6, 1, 28, 28), np.float32)}
    assert predictor(batch)  # runs as it is

    def no_memory(batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(predictor, "_rows", no_memory)
    with pytest.raises(DistillError) as e:
        predictor(batch)
    assert "out of cpu memory on a batch of 6 rows" in e.value.problem
    assert "lower batch_size (now 6; try 3)" in e.value.fix and "failed on row" not in e.value.problem
