"""Distillation loss terms. Pure PyTorch, tested against their formulas.

Each term maps (student logits, batch) to a scalar; `DistillationLoss` weighs and sums them
and returns every term by name, so the loop calls backward() on "loss" and logs the rest.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from pipeline.cache.schema import LABEL, LOGITS


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015) soft-target loss: T^2 * KL(p_teacher(T) || p_student(T)), mean over the batch.

    Args:
        student_logits: (B, C) raw student logits.
        teacher_logits: (B, C) raw teacher logits (any float dtype; computed in float32).
        temperature: T > 0. The T^2 factor keeps the gradient scale independent of T, so the
            gradient w.r.t. the student logits is T * (p_student(T) - p_teacher(T)) / B.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return (t * t) * kl.mean()


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the hard labels, mean over the batch."""
    return F.cross_entropy(student_logits.float(), labels)


TermFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], float], torch.Tensor]

TERMS: dict[str, TermFn] = {
    "kd": lambda logits, batch, t: kd_loss(logits, batch[LOGITS], t),
    "ce": lambda logits, batch, t: ce_loss(logits, batch[LABEL]),
}

# Cache columns each term needs; checked against the manifest before training starts.
TERM_INPUTS: dict[str, tuple[str, ...]] = {"kd": (LOGITS,), "ce": (LABEL,)}


class DistillationLoss:
    """sum_i w_i * term_i. With terms {kd: alpha, ce: 1 - alpha}: alpha*T^2*KL + (1-alpha)*CE."""

    def __init__(self, terms: Mapping[str, float], temperature: float) -> None:
        unknown = set(terms) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}")
        # Zero-weight terms are skipped, so a hard-label run never touches the teacher columns.
        self.terms = {name: float(w) for name, w in terms.items() if w > 0}
        self.temperature = float(temperature)

    def __call__(self, student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = {name: TERMS[name](student_logits, batch, self.temperature) for name in self.terms}
        total = sum(w * parts[name] for name, w in self.terms.items())
        return {"loss": total, **parts}  # type: ignore[dict-item]
