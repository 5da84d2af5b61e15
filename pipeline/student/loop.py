"""The per-worker train and eval passes: plain PyTorch over an iterable of batches, no Ray.

The Ray Train loop (pipeline/student/trainer.py) feeds these with `iter_torch_batches`;
tests feed them in-memory tensors.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

from pipeline.cache.schema import LABEL, LOGITS, X
from pipeline.student.losses import DistillationLoss


def train_epoch(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], loss_fn: DistillationLoss,
                optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One pass; returns the sample-weighted mean of every loss term and the sample count."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    samples = 0
    for batch in batches:
        logits = model(batch[X])
        parts = loss_fn(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        n = len(batch[X])
        samples += n
        # Summed on the device: a float() here would sync a GPU on every step.
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.detach() * n
    return {**{f"train_{k}": float(v) / max(samples, 1) for k, v in sums.items()}, "train_samples": samples}


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
def evaluate(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], temperature: float) -> dict[str, float]:
    """Accuracy, top-1 agreement with the teacher and mean KL(p_teacher(T) || p_student(T))."""
    model.eval()
    total: dict[str, float] = {}
    for batch in batches:
        for k, v in eval_sums(model(batch[X]), batch[LOGITS], batch[LABEL], temperature).items():
            total[k] = total.get(k, 0.0) + v
    if not total:
        return {"val_accuracy": math.nan, "val_agreement": math.nan, "val_kl": math.nan, "val_nll": math.nan,
                "teacher_val_accuracy": math.nan, "val_rows": 0.0}
    return finish_eval(total)


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
