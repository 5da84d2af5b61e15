"""The teachers as a Ray Data callable class: loaded once per actor, then called on batches."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import numpy as np
import torch

from pipeline.cache import storage
from pipeline.cache.schema import X, logits_column, tap_column
from pipeline.config import ModelSpec, TapOutput
from pipeline.models.factory import build_model
from pipeline.models.taps import capture, find_modules
from pipeline.teacher.encode import encode_full_logits, encode_tap


class TeacherPredictor:
    """Runs every teacher on numpy batches and appends their encoded outputs (logits per teacher,
    then each tap) to the passthrough columns: several teachers cost one pass over the data."""

    def __init__(self, teachers: dict[str, dict[str, Any]], input_shape: tuple[int, ...], num_classes: int,
                 logits_dtype: str = "float16", taps: list[dict[str, Any]] | None = None, use_gpu: bool = False,
                 threads: int | None = None, storage_options: dict[str, Any] | None = None) -> None:
        storage.configure(**(storage_options or {}))  # this actor may load the weights from S3
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if threads:
            torch.set_num_threads(threads)
        self.models = {
            name: build_model(ModelSpec.model_validate(spec), input_shape=input_shape, num_classes=num_classes).to(self.device).eval()
            for name, spec in teachers.items()
        }
        self.taps = [TapOutput.model_validate(t) for t in taps or []]
        for name, model in self.models.items():  # an unknown module fails here, listing the names
            find_modules(model, [t.module for t in self.taps if t.teacher == name], owner=f"teacher {name!r}")
        self.logits_dtype = logits_dtype
        self.on_gpu = self.device.type == "cuda"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.require(batch[X], dtype=np.float32, requirements=["C", "W"]))
        if self.on_gpu:
            x = x.pin_memory().to(self.device, non_blocking=True)
        out = dict(batch)
        for name, model in self.models.items():
            taps = [t for t in self.taps if t.teacher == name]
            with ExitStack() as stack, torch.inference_mode(), \
                    torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_gpu):
                captured = stack.enter_context(capture(model, sorted({t.module for t in taps}), owner=f"teacher {name!r}"))
                logits = model(x)
            out[logits_column(name)] = encode_full_logits(logits.float(), self.logits_dtype)
            for tap in taps:
                out[tap_column(tap.name)] = encode_tap(captured[tap.module], tap.kind, tap.pool, tap.p)
        return out
