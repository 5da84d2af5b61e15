"""The per-worker train and eval passes: plain PyTorch over an iterable of batches, no Ray.

The Ray Train loop (pipeline/student/trainer.py) feeds these with `iter_torch_batches`;
tests feed them in-memory tensors.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from pipeline.cache.schema import LABEL, LOGITS, X
from pipeline.student.losses import DistillationLoss


def train_epoch(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], loss_fn: DistillationLoss,
                optimizer: torch.optim.Optimizer,
                inputs_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                on_step: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """One pass; returns the sample-weighted mean of every loss term and the sample count.

    `inputs_of` picks the model's input from a batch (default: the `x` column; token caches
    feed ids[:, :-1]); `on_step(step, samples)` is called after every step (progress lines)."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    samples = steps = 0
    for batch in batches:
        inputs = inputs_of(batch) if inputs_of else batch[X]
        parts = loss_fn(model(inputs), batch)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        n = len(inputs)
        samples += n
        # Summed on the device: a float() here would sync a GPU on every step.
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.detach() * n
        steps += 1
        if on_step:
            on_step(steps, samples)
    return {**{f"train_{k}": float(v) / max(samples, 1) for k, v in sums.items()}, "train_samples": samples}


CALIBRATION_BINS = 10


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


def eval_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> dict[str, float]:
    """Additive statistics of one batch, so shards and batches can be summed before dividing."""
    t = float(temperature)
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    s_pred, t_pred = student_logits.argmax(-1), teacher_logits.float().argmax(-1)
    return {
        "n": float(len(labels)),
        "correct": float((s_pred == labels).sum()),
        "teacher_correct": float((t_pred == labels).sum()),
        "agree": float((s_pred == t_pred).sum()),
        "kl_sum": float(kl.sum()),
        "nll_sum": float(F.cross_entropy(student_logits.float(), labels, reduction="sum")),
    }


def finish_eval(sums: Mapping[str, float]) -> dict[str, float]:
    n = max(sums.get("n", 0.0), 1.0)
    return {
        "val_accuracy": sums["correct"] / n,
        "val_agreement": sums["agree"] / n,
        "val_kl": sums["kl_sum"] / n,
        "val_nll": sums["nll_sum"] / n,
        "teacher_val_accuracy": sums["teacher_correct"] / n,
        "val_rows": sums["n"],
    }


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], temperature: float,
             teacher_column: str = LOGITS) -> dict[str, Any]:
    """Accuracy, top-1 agreement with the teacher, mean KL(p_teacher(T) || p_student(T)), and the
    calibration bins of student and teacher (see calibration_sums)."""
    model.eval()
    total: dict[str, float] = {}
    calib: dict[str, dict[str, list[float]]] = {}
    for batch in batches:
        logits = logits_of(model(batch[X]))
        for k, v in eval_sums(logits, batch[teacher_column], batch[LABEL], temperature).items():
            total[k] = total.get(k, 0.0) + v
        for who, z in (("student", logits), ("teacher", batch[teacher_column])):
            sums = calibration_sums(z, batch[LABEL])
            prev = calib.setdefault(who, {k: [0.0] * CALIBRATION_BINS for k in sums})
            for k, v in sums.items():
                prev[k] = [a + b for a, b in zip(prev[k], v)]
    if not total:
        return {"val_accuracy": math.nan, "val_agreement": math.nan, "val_kl": math.nan, "val_nll": math.nan,
                "teacher_val_accuracy": math.nan, "val_rows": 0.0}
    return {**finish_eval(total),
            "calibration": {"edges": [i / CALIBRATION_BINS for i in range(CALIBRATION_BINS + 1)], **calib}}


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
