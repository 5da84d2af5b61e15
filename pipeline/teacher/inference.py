"""The teacher as a Ray Data callable class: loaded once per actor, then called on batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.cache import storage
from pipeline.cache.schema import LOGITS, X
from pipeline.config import ModelSpec
from pipeline.models.factory import build_model
from pipeline.teacher.encode import encode_full_logits


class TeacherPredictor:
    """Runs the teacher on numpy batches and appends its encoded outputs to the passthrough columns."""

    def __init__(self, teacher: dict[str, Any], input_shape: tuple[int, ...], num_classes: int,
                 logits_dtype: str = "float16", use_gpu: bool = False, threads: int | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        storage.configure(**(storage_options or {}))  # this actor may load the weights from S3
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if threads:
            torch.set_num_threads(threads)
        spec = ModelSpec.model_validate(teacher)
        self.model = build_model(spec, input_shape=input_shape, num_classes=num_classes).to(self.device).eval()
        self.logits_dtype = logits_dtype
        self.on_gpu = self.device.type == "cuda"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.require(batch[X], dtype=np.float32, requirements=["C", "W"]))
        if self.on_gpu:
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_gpu):
            logits = self.model(x)
        out = dict(batch)
        out[LOGITS] = encode_full_logits(logits.float(), self.logits_dtype)
        return out
