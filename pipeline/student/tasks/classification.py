"""Classification students: images (or any fixed-shape rows) with class labels and full teacher logits,
plus feature, attention and relational terms against the cache's taps."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache.manifest import DatasetRecord, FullLogitsRecord, Manifest, SplitRecord, TeacherRecord
from pipeline.cache.schema import LABEL, LOGITS, PRIMARY_TEACHER, VIEWS, X
from pipeline.data.views import apply_views
from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.models.factory import distillation_head, output_width
from pipeline.student.losses.divergence import kl_divergence, softened_log_probs
from pipeline.student.augment import augment
from pipeline.student.losses.classification import MIX_LAM, MIX_PERM, DistillationLoss
from pipeline.student.tasks.tapped import build_student, loss_inputs
from pipeline.student.tasks.base import Batch, Reduce, Task, alone

CALIBRATION_BINS = 10


class ClassificationTask(Task):
    name = "classification"
    eval_batch_size = 1024
    result_metrics = ("val_accuracy", "val_agreement", "val_kl", "teacher_val_accuracy")

    def __init__(self, cfg: TrainConfig, manifest: Manifest) -> None:
        super().__init__(cfg, manifest)
        self.inputs = loss_inputs(cfg.loss, manifest)  # a term the cache cannot serve fails here, naming it
        self.loss = DistillationLoss(cfg.loss.terms, cfg.loss.temperature, self.inputs)
        # x as the cache stores it (uint8 pixels travel 4x smaller through Ray Data), decoded on the worker.
        self.stored_uint8 = manifest.dataset.input_dtype == "uint8"
        self.input_scale = manifest.dataset.input_scale
        # A view cache: per image, R views and the teachers' logits for each (one replayed per step).
        self.views = VIEWS in manifest.columns

    @classmethod
    def in_memory(cls, cfg: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> "ClassificationTask":
        """The task for a loop over tensors held in memory (benchmarks, notebooks, tests): as if
        reading a cache of inputs, labels and the primary teacher's full logits."""
        manifest = Manifest(
            cache_id="in-memory", task=cls.name, teachers={PRIMARY_TEACHER: TeacherRecord(factory="in-memory")},
            dataset=DatasetRecord(kind="in-memory", fingerprint="", split=SplitRecord(val_fraction=0.0, split_seed=0),
                                  transform="", input_shape=list(input_shape)),
            outputs=[FullLogitsRecord(teacher=PRIMARY_TEACHER, columns=[LOGITS], dtype="float32", shape=[num_classes])],
            num_classes=num_classes, input_shape=list(input_shape), rows=0, rows_by_split={},
            columns={X: "tensor", LABEL: "int64", LOGITS: "tensor"}, shards=[])
        return cls(cfg, manifest)

    def check(self) -> None:
        manifest, spec = self.manifest, self.cfg.student
        spatial = [t.kind for t in self.cfg.augment if t.kind != "mixup"]
        geometric = [k for k in spatial if k != "cutmix"]
        if self.views and geometric:
            raise DistillError(f"cache {manifest.cache_id} stores views with the teacher's outputs for each; `augment` "
                               f"{geometric} would change them after the teacher saw them", "keep only mixup or cutmix "
                               "in `augment` (a view cache replays its own crops and flips)")
        if spatial and len(manifest.input_shape) != 3:
            raise DistillError(f"`augment` {spatial} needs image inputs (channels, height, width); cache "
                               f"{manifest.cache_id}'s are {manifest.input_shape}", "keep only mixup, or set "
                               "`source.input_shape` to the images' shape when precomputing")
        missing = sorted(c for c in self.columns() if c not in manifest.columns)
        if missing:
            raise DistillError(f"the loss needs cache column(s) {missing}, which cache {manifest.cache_id} lacks",
                               "drop the term or precompute a cache with that output")
        net = self.build_model().net
        try:
            width = output_width(net, tuple(manifest.input_shape))
        except RuntimeError as e:
            raise DistillError(f"student {spec.factory} cannot take the cache's inputs of shape {manifest.input_shape}: "
                               f"{str(e).splitlines()[0]}", "fix the student's kwargs") from None
        if width != manifest.num_classes:
            raise DistillError(f"student {spec.factory} predicts {width} classes, the cache has {manifest.num_classes}",
                               f"build the student with num_classes={manifest.num_classes} (or train on a matching cache)")
        if distillation_head(net, tuple(manifest.input_shape)) and not {"kd", "deit_hard"} & set(self.loss.terms):
            raise DistillError(f"student {spec.factory} has a distillation token, but the loss has no teacher term "
                               f"to train its head ({sorted(self.loss.terms)}), and predictions average both heads",
                               "add `kd` or `deit_hard` to `loss.terms`, or build the student with `distillation_token: false`")

    def columns(self) -> list[str]:
        """Inputs, label, the primary teacher's logits (for evaluation) and what the terms use."""
        i = self.inputs
        cols = [X, LABEL, LOGITS, *i.logits, *(c for _, c in i.hint), *(a[1] for a in i.attention)]
        if i.rkd:
            cols.append(i.rkd[1])
        if self.views:
            cols.append(VIEWS)
        return list(dict.fromkeys(cols))

    def dtypes(self) -> dict[str, torch.dtype]:
        stored = {X: torch.uint8 if self.stored_uint8 else torch.float32, LABEL: torch.int64}
        return {c: stored.get(c, torch.float32) for c in self.columns()}

    def build_model(self) -> nn.Module:
        return build_student(self.cfg.student, self.manifest, self.cfg.loss, self.inputs)  # adapters are parameters too

    def model_inputs(self, batch: Batch) -> torch.Tensor:
        return decode(batch[X], self.input_scale)

    def prepare(self, batch: Batch) -> Batch:
        if self.views:
            batch = replay_view(batch, decode(batch[X], self.input_scale), self._view_columns())
        if not self.cfg.augment:
            return batch
        x, mix = augment(decode(batch[X], self.input_scale), self.cfg.augment)
        out = {**batch, X: x}
        if mix is not None:
            out[MIX_PERM], out[MIX_LAM] = mix
        return out

    def losses(self, output: Any, batch: Batch) -> dict[str, torch.Tensor]:
        return self.loss(output, batch)

    def student(self, model: nn.Module) -> nn.Module:
        return getattr(model, "net", model)  # the user's network without the hooks and adapters

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], reduce: Reduce = alone) -> dict[str, Any]:
        """Accuracy, top-1 agreement with the teacher, mean KL(p_teacher(T) || p_student(T)), and the
        calibration bins of student and teacher (see calibration_sums)."""
        if self.views:  # the whole image (view 0) and the teachers' logits for it
            columns = self._view_columns()
            batches = ({**b, **{c: b[c][:, 0] for c in columns if c in b}} for b in batches)
        return evaluate(model, batches, self.cfg.loss.temperature, reduce=reduce, input_scale=self.input_scale)

    def _view_columns(self) -> list[str]:
        """The columns with one entry per view: every teacher's logits."""
        return [c for c in self.columns() if c not in (X, LABEL, VIEWS)]


def replay_view(batch: Batch, x: torch.Tensor, per_view: list[str]) -> dict[str, torch.Tensor]:
    """One of each image's stored views, drawn from torch's generator (seeded per step): the image seen
    through it, and the teachers' logits for exactly that view."""
    views = batch[VIEWS]
    pick = torch.randint(views.shape[1], (len(x),), device=views.device)
    rows = torch.arange(len(x), device=views.device)
    out = {**batch, X: apply_views(x, views[rows, pick])}
    out.update({c: batch[c][rows, pick] for c in per_view if c in batch})
    return out


def decode(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A stored input as the model reads it: float32(x) * scale (pipeline/cache/inputs.py). A float32
    batch column is already a model input (older caches, decoded or augmented batches)."""
    if x.dtype == torch.float32:
        return x
    return x.float() * scale if scale != 1.0 else x.float()


def logits_of(output: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A student returns logits, or a dict with "logits" when its layers are tapped."""
    return output["logits"] if isinstance(output, Mapping) else output


def calibration_sums(logits: torch.Tensor, labels: torch.Tensor, bins: int = CALIBRATION_BINS) -> dict[str, list[float]]:
    """Per confidence bin (max softmax at T=1): count, summed confidence, correct. Additive over batches."""
    conf, pred = F.softmax(logits.float(), dim=-1).max(dim=-1)
    idx = (conf * bins).long().clamp(max=bins - 1)
    return {
        "count": torch.bincount(idx, minlength=bins).tolist(),
        "confidence_sum": torch.zeros(bins).index_add_(0, idx, conf).tolist(),
        "correct": torch.zeros(bins).index_add_(0, idx, (pred == labels).float()).tolist(),
    }


def eval_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
              temperature: float) -> dict[str, float]:
    """Additive statistics of one batch, so shards and batches can be summed before dividing. Without
    the teacher's logits (a table of the user's own), only the student's own statistics."""
    sums = {"n": float(len(labels)), "correct": float((student_logits.argmax(-1) == labels).sum()),
            "nll_sum": float(F.cross_entropy(student_logits.float(), labels, reduction="sum"))}
    if teacher_logits is not None:
        t = float(temperature)
        kl = kl_divergence(softened_log_probs(teacher_logits, t), softened_log_probs(student_logits, t))
        t_pred = teacher_logits.float().argmax(-1)
        sums.update(teacher_correct=float((t_pred == labels).sum()), agree=float((student_logits.argmax(-1) == t_pred).sum()),
                    kl_sum=float(kl.sum()))
    return sums


def finish_eval(sums: Mapping[str, float]) -> dict[str, float]:
    n = max(sums.get("n", 0.0), 1.0)
    out = {"val_accuracy": sums["correct"] / n, "val_nll": sums["nll_sum"] / n, "val_rows": sums["n"]}
    if "agree" in sums:
        out.update(val_agreement=sums["agree"] / n, val_kl=sums["kl_sum"] / n, teacher_val_accuracy=sums["teacher_correct"] / n)
    return out


@torch.inference_mode()
def _flatten(calib: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    return {f"calibration/{who}/{k}/{i}": v for who, sums in calib.items() for k, vs in sums.items() for i, v in enumerate(vs)}


def _unflatten(sums: dict[str, float]) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
    """(the plain sums, the calibration bins) back from one flat dict of floats."""
    total, calib = {}, {}
    for key, v in sums.items():
        if key.startswith("calibration/"):
            _, who, k, i = key.split("/")
            calib.setdefault(who, {}).setdefault(k, [0.0] * CALIBRATION_BINS)[int(i)] = v
        else:
            total[key] = v
    return total, calib


def evaluate(model: nn.Module, batches: Iterable[Batch], temperature: float, teacher_column: str = LOGITS,
             reduce: Reduce = alone, input_scale: float = 1.0) -> dict[str, Any]:
    model.eval()
    total: dict[str, float] = {}
    calib: dict[str, dict[str, list[float]]] = {}
    for batch in batches:
        logits = logits_of(model(decode(batch[X], input_scale)))
        teacher = batch.get(teacher_column)
        for k, v in eval_sums(logits, teacher, batch[LABEL], temperature).items():
            total[k] = total.get(k, 0.0) + v
        for who, z in (("student", logits), ("teacher", teacher)):
            if z is None:
                continue
            sums = calibration_sums(z, batch[LABEL])
            prev = calib.setdefault(who, {k: [0.0] * CALIBRATION_BINS for k in sums})
            for k, v in sums.items():
                prev[k] = [a + b for a, b in zip(prev[k], v)]
    total, calib = _unflatten(reduce({**total, **_flatten(calib)}))
    if not total:
        return {"val_accuracy": math.nan, "val_agreement": math.nan, "val_kl": math.nan, "val_nll": math.nan,
                "teacher_val_accuracy": math.nan, "val_rows": 0.0}
    return {**finish_eval(total),
            "calibration": {"edges": [i / CALIBRATION_BINS for i in range(CALIBRATION_BINS + 1)], **calib}}
