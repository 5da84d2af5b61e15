"""The teachers as a Ray Data callable class: loaded once per actor, then called on batches."""

from __future__ import annotations

import zlib
from typing import Any, Callable

import numpy as np
import torch
from pydantic import TypeAdapter

from pipeline import storage
from pipeline.cache.inputs import decode_inputs
from pipeline.cache.packing import index_bits, pack_ids
from pipeline.cache.schema import (INPUT_IDS, LENGTH, SAMPLE_ID, SAMPLED_INDICES, TEACHER_SEQUENCE, TOPK_INDICES, VIEWS, X, logits_column,
                                   tap_column)
from pipeline.config import (FullLogits, LogitsOutput, ModelSpec, SampledLogits, TapOutput, TeacherSequences, TopkLogits,
                             ViewsOutput)
from pipeline.errors import DistillError
from pipeline.models.factory import build_model
from pipeline.models.taps import capture, find_modules
from pipeline.teacher.encode import encode_full_logits, encode_sampled, encode_tap, encode_topk
from pipeline.data.views import apply_views, image_views
from pipeline.teacher.generate import generate
from pipeline.teacher.chunked import encode_in_chunks, logit_chunks


class TeacherPredictor:
    """Runs every teacher on numpy batches and appends their encoded outputs (logits per teacher,
    then each tap) to the passthrough columns: several teachers cost one pass over the data."""

    def __init__(self, teachers: dict[str, dict[str, Any]], input_shape: tuple[int, ...], num_classes: int,
                 logits_dtype: str = "float16", taps: list[dict[str, Any]] | None = None, use_gpu: bool = False,
                 threads: int | None = None, storage_options: storage.StorageOptions | None = None,
                 logits_spec: dict[str, Any] | None = None, input_scale: float = 1.0,
                 views: dict[str, Any] | None = None) -> None:
        self.options = storage_options  # this actor may load the weights from S3
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if threads:
            torch.set_num_threads(threads)
        self.models = {name: self._build(ModelSpec.model_validate(spec), input_shape, num_classes)
                       for name, spec in teachers.items()}
        parsed = [TapOutput.model_validate(t) for t in taps or []]
        # Grouped once per actor, not per batch; an unknown module fails here, listing the names.
        self.taps = {name: [t for t in parsed if t.teacher == name] for name in self.models}
        for name, model in self.models.items():
            find_modules(model, [t.module for t in self.taps[name]], owner=f"teacher {name!r}")
        self.spec = TypeAdapter(LogitsOutput).validate_python(logits_spec) if logits_spec else FullLogits(dtype=logits_dtype)
        self.on_gpu = self.device.type == "cuda"
        self.input_scale = input_scale  # x is stored as the source holds it (pipeline/cache/inputs.py)
        self.views = ViewsOutput.model_validate(views) if views else None
        self.index_bits = index_bits(num_classes)  # ids packed above 4,096 tokens (pipeline/cache/packing.py)

    def _build(self, spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
        """The teacher on this actor's device; an HF teacher on an actor with several GPUs is spread
        over them layer by layer (device_map="auto") instead of copied to one."""
        if self.device.type == "cuda" and torch.cuda.device_count() > 1 and spec.factory.endswith(":hf_causal_lm"):
            spec = spec.model_copy(update={"kwargs": {**spec.kwargs, "device_map": "auto"}})
            return build_model(spec, input_shape=input_shape, num_classes=num_classes, options=self.options).eval()
        return build_model(spec, input_shape=input_shape, num_classes=num_classes, options=self.options).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encoded outputs for the batch; a failure names the first row that fails on its own, so the
        driver shows one line a user can act on instead of a Ray traceback."""
        try:
            return self._encode(batch)
        except DistillError:
            raise
        except torch.OutOfMemoryError as e:  # the batch, not a row: retrying rows one by one would only hide it
            rows = len(batch[SAMPLE_ID])
            raise DistillError(f"the teacher ran out of {self.device.type} memory on a batch of {rows} rows: {_first_line(e)}",
                               f"lower batch_size (now {rows}; try {max(rows // 2, 1)}), or give each actor more "
                               "memory (gpus_per_actor)") from None
        except Exception as e:  # noqa: BLE001 (whatever the user's model raises on the user's data)
            row, error = self._failing_row(batch, e)
            raise DistillError(f"the teacher failed on row {row!r}: {type(error).__name__}: {_first_line(error)}",
                               "check that row of the source against the teacher (input shape, dtype, values)") from None

    def _encode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._tokens(batch) if INPUT_IDS in batch else self._rows(batch)
        check_finite(out, [c for c in out if c not in batch], batch.get(SAMPLE_ID))
        return out

    def _failing_row(self, batch: dict[str, np.ndarray], error: Exception) -> tuple[str, Exception]:
        """The first row that fails alone (a batch fails for one bad row), or the batch's first row."""
        ids = batch[SAMPLE_ID]
        for i in range(len(ids)):
            try:
                self._encode({k: v[i:i + 1] for k, v in batch.items()})
            except Exception as e:  # noqa: BLE001
                return str(ids[i]), e
        return (str(ids[0]) if len(ids) else "?"), error

    def _rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.require(decode_inputs(batch[X], self.input_scale), requirements=["C", "W"]))
        out = dict(batch)
        if self.views:  # each image seen through its R views, the teacher run on all B x R of them
            v = self.views
            views = image_views(list(batch[SAMPLE_ID]), v.count, x.shape[-2], x.shape[-1], v.transforms, v.seed)
            out[VIEWS] = views.numpy()
            x = apply_views(x.repeat_interleave(v.count, dim=0), views.reshape(-1, 5))
        if self.on_gpu:
            x = x.pin_memory().to(self.device, non_blocking=True)
        for name, model in self.models.items():
            taps = self.taps[name]
            with capture(model, sorted({t.module for t in taps}), owner=f"teacher {name!r}") as captured, \
                    torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_gpu):
                logits = model(x)
            encoded = encode_full_logits(logits.float(), self.spec.dtype)
            out[logits_column(name)] = encoded.reshape(len(out[X]), self.views.count, -1) if self.views else encoded
            for tap in taps:
                out[tap_column(tap.name)] = encode_tap(captured[tap.module], tap.kind, tap.pool, tap.p)
        return out

    def _tokens(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A language-model teacher on (B, L + 1) windows: it reads ids[:, :-1], so position t holds
        its prediction of token t + 1. Each mode stores what its loss needs (see LogitsOutput)."""
        (name, model), = self.models.items()  # token caches hold one teacher (checked in the config)
        ids = torch.from_numpy(np.asarray(batch[INPUT_IDS], dtype=np.int64)).to(self.device)
        spec, out = self.spec, dict(batch)
        if isinstance(spec, TeacherSequences):
            gen = self._generator(batch, spec.seed)
            seq = generate(model, ids[:, :spec.prompt_tokens], spec.new_tokens, spec.strategy, spec.temperatures[0], gen)
            out[TEACHER_SEQUENCE] = seq.to(torch.int32).cpu().numpy()
            return out
        lengths = np.asarray(batch[LENGTH]) if LENGTH in batch else np.full(len(ids), ids.shape[1])
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_gpu):
            encoded = encode_in_chunks(logit_chunks(model, ids[:, :-1], lengths), self._encoder(spec, name, batch),
                                       ids.shape[0], ids.shape[1] - 1)
        for column in (TOPK_INDICES, SAMPLED_INDICES):
            if self.index_bits and column in encoded:  # ceil(log2 V) bits an id, not uint32
                encoded[column] = pack_ids(encoded[column], self.index_bits)
        out.update(encoded)
        return out

    def _encoder(self, spec: LogitsOutput, name: str,
                 batch: dict[str, np.ndarray]) -> Callable[[torch.Tensor], dict[str, np.ndarray]]:
        """(1, n, V) logits of a chunk of positions -> that chunk's columns in the mode's form."""
        if isinstance(spec, FullLogits):
            return lambda z: {logits_column(name): encode_full_logits(z.float(), spec.dtype)}
        if isinstance(spec, TopkLogits):
            return lambda z: encode_topk(z.float(), spec.k, spec.temperatures, spec.values, spec.step)
        if isinstance(spec, SampledLogits):
            gen = self._generator(batch, spec.seed)  # one generator for the batch's chunks, drawn in order
            return lambda z: encode_sampled(z.float(), spec.k, spec.temperatures[0], gen, spec.proposal_temperature,
                                            spec.estimator, spec.head)
        raise TypeError(f"unknown logits output {type(spec).__name__}")

    def _generator(self, batch: dict[str, np.ndarray], seed: int) -> torch.Generator:
        """Reproducible draws: seeded by the config and the batch's first row (a resumed run batches the same files alike)."""
        first = zlib.crc32(str(batch[SAMPLE_ID][0]).encode()) if len(batch[SAMPLE_ID]) else 0
        return torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + first)


def check_finite(out: dict[str, np.ndarray], columns: list[str], ids: np.ndarray | None) -> None:
    """A NaN or inf teacher output (NaN weights, or float16 overflow past 65,504) would train every
    student of the cache into NaN: refused, naming the column, the count and a row."""
    for column in columns:
        values = out[column]
        if values.dtype.kind != "f":
            continue
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            hint = " or store float32 (`dtype: float32`)" if values.dtype == np.float16 else ""
            raise DistillError(f"the teacher's {column} are not finite (NaN or inf) for {int(bad.sum())} of {len(values)} "
                               f"rows in a batch, e.g. row {str(ids[int(np.argmax(bad))]) if ids is not None else int(np.argmax(bad))!r}",
                               f"check the teacher's weights and those rows' inputs{hint}; nothing was published")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
