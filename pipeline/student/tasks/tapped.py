"""The student as trained: the user's network plus forward hooks on the layers the loss matches
against teacher taps, and the FitNets adapters (trained and checkpointed with it)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache.manifest import Manifest, TapRecord
from pipeline.cache.schema import LOGITS, logits_column
from pipeline.config import PRIMARY_TEACHER, LossConfig, ModelSpec
from pipeline.errors import DistillError
from pipeline.models.factory import build_model
from pipeline.models.taps import attach, capture, find_modules
from pipeline.student.losses.classification import LossInputs

# The cache's tap kinds each term can use.
_TERM_TAP_KINDS = {"hint": ("feature", "embedding"), "attention": ("attention",), "rkd": ("embedding", "feature")}


class Adapter(nn.Module):
    """FitNets regressor: maps a student feature to the teacher's stored shape.

    conv1x1 (+ adaptive average pooling when the grids differ) for (C, H, W) to (C', H', W');
    a linear layer on the flattened feature otherwise.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], kind: str = "auto") -> None:
        super().__init__()
        conv = kind == "conv1x1" or (kind == "auto" and len(student_shape) == 3 and len(teacher_shape) == 3)
        if conv and not (len(student_shape) == 3 and len(teacher_shape) == 3):
            raise ValueError(f"a conv1x1 adapter needs (C, H, W) on both sides, got {student_shape} -> {teacher_shape}")
        self.teacher_shape = tuple(teacher_shape)
        self.conv = conv
        self.proj: nn.Module = (nn.Conv2d(student_shape[0], teacher_shape[0], 1) if conv
                                else nn.Linear(math.prod(student_shape), math.prod(teacher_shape)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.conv:
            out = self.proj(f)
            return out if out.shape[-2:] == self.teacher_shape[1:] else F.adaptive_avg_pool2d(out, self.teacher_shape[1:])
        return self.proj(f.flatten(1)).view(len(f), *self.teacher_shape)


class TappedStudent(nn.Module):
    """Returns plain logits when no feature term is used; otherwise a dict with the logits, the
    hooked student features and the adapters' outputs, which DistillationLoss reads."""

    def __init__(self, net: nn.Module, tapped: list[str], adapters: dict[str, tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.net = net
        self.tapped = list(tapped)
        self.adapters = nn.ModuleDict({col: ad for col, (_, ad) in adapters.items()})
        self.adapter_source = {col: module for col, (module, _) in adapters.items()}
        self._found: dict[str, torch.Tensor] = {}
        attach(net, self.tapped, self._found, owner="the student")

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        self._found.clear()
        logits = self.net(x)
        if not self.tapped:
            return logits
        features = dict(self._found)
        hints = {col: ad(features[self.adapter_source[col]]) for col, ad in self.adapters.items()}
        heads = dict(logits) if isinstance(logits, dict) else {"logits": logits}  # e.g. DeiT's two heads
        return {**heads, "features": features, "hints": hints}


def _tap(manifest: Manifest, tap: str, term: str) -> TapRecord:
    taps = manifest.taps()
    if tap not in taps:
        raise DistillError(f"loss term `{term}` needs the tap {tap!r}, which cache {manifest.cache_id} lacks "
                           f"(its taps: {sorted(taps) or 'none'})",
                           "drop the term or precompute a cache with that tap under `outputs.taps`")
    entry = taps[tap]
    if entry.kind not in _TERM_TAP_KINDS[term]:
        raise DistillError(f"loss term `{term}` cannot use tap {tap!r} of kind {entry.kind!r}",
                           f"match it with a tap of kind {' or '.join(_TERM_TAP_KINDS[term])}")
    return entry


def loss_inputs(loss: LossConfig, manifest: Manifest) -> LossInputs:
    """The columns each weighted term reads, checked against the manifest (a clear error for anything missing)."""
    used = {t for t, w in loss.terms.items() if w > 0}
    by_teacher = manifest.logits_columns()
    # Default: the primary teacher, so adding teachers to a cache never changes an existing run's targets.
    wanted = loss.teachers or {PRIMARY_TEACHER: 1.0}
    unknown = sorted(set(wanted) - set(by_teacher))
    if unknown and used & {"kd", "deit_hard"}:
        raise DistillError(f"`loss.teachers` names {unknown}, which cache {manifest.cache_id} lacks (its teachers: {sorted(by_teacher)})",
                           "name teachers the cache holds, or precompute one with them under `teachers:`")
    logits = {by_teacher.get(n, logits_column(n)): w for n, w in wanted.items() if w > 0}
    return LossInputs(
        logits=logits or {LOGITS: 1.0},
        multi_teacher=loss.multi_teacher,
        hint=tuple((m.student, _tap(manifest, m.tap, "hint").column) for m in loss.hint) if "hint" in used else (),
        attention=tuple((m.student, e.column, _map_size(e), e.p)
                        for m in loss.attention for e in [_tap(manifest, m.tap, "attention")]) if "attention" in used else (),
        rkd=(loss.rkd.student, _tap(manifest, loss.rkd.tap, "rkd").column, loss.rkd.distance_weight, loss.rkd.angle_weight)
        if "rkd" in used and loss.rkd else None,
    )


def _map_size(entry: TapRecord) -> tuple[int, int]:
    """An unpooled stored map is (h*w,): its grid is square."""
    if entry.pool:
        return entry.pool[0], entry.pool[1]
    n = int(entry.shape[0])
    side = math.isqrt(n)
    if side * side != n:
        raise DistillError(f"tap {entry.name!r} stores an unpooled non-square attention map ({n} values)",
                           "set `pool: [h, w]` on the tap and precompute again")
    return side, side


def build_student(spec: ModelSpec, manifest: Manifest, loss: LossConfig, inputs: LossInputs) -> TappedStudent:
    """The user's network with hooks on the matched layers and adapters sized from one dry forward."""
    input_shape = tuple(manifest.input_shape)
    net = build_model(spec, input_shape=input_shape, num_classes=manifest.num_classes)
    tapped = sorted({m for m, _ in inputs.hint} | {m for m, *_ in inputs.attention} | ({inputs.rkd[0]} if inputs.rkd else set()))
    find_modules(net, tapped, owner=f"student {spec.factory}")
    shapes: dict[str, tuple[int, ...]] = {}
    if tapped:
        was = net.training
        net.eval()
        with torch.no_grad(), capture(net, tapped) as found:
            net(torch.zeros(2, *input_shape))
        net.train(was)
        shapes = {m: tuple(f.shape[1:]) for m, f in found.items()}
        for m, _c, _s, _p in inputs.attention:
            if len(shapes[m]) != 3:
                raise DistillError(f"attention needs a (C, H, W) student feature; module {m!r} gives {shapes[m]}",
                                   "match a convolutional layer of the student")
    columns = {e.column: e for e in manifest.taps().values()}
    adapters = {}
    for m, col in inputs.hint:
        try:
            adapters[col] = (m, Adapter(shapes[m], tuple(columns[col].shape), loss.hint_adapter))
        except ValueError as e:
            raise DistillError(f"hint adapter for student module {m!r}: {e}", "use `hint_adapter: linear` or match other layers") from None
    return TappedStudent(net, tapped, adapters)
