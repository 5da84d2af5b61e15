"""The one KL divergence every distillation term and metric uses. Pure PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# An underflowed teacher log-probability (-inf) is clamped here, so its term is 0 * finite
# rather than 0 * -inf = NaN; exp(-1e4) is 0 in every float dtype, so the value is unchanged.
_LOG_FLOOR = -1e4


def softened_log_probs(logits: torch.Tensor, temperature: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log softmax(z / T) over the last axis, computed in `dtype` (float32, or float64 for gradcheck)."""
    return F.log_softmax(logits.to(dtype) / float(temperature), dim=-1)


def kl_divergence(target_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_i P_i (log P_i - log Q_i) over the last axis, one value per row.

    Args:
        target_log_probs: (..., C) log P, the teacher's (or a mixture's) distribution; -inf allowed.
        student_log_probs: (..., C) log Q.

    Returns:
        (...) per-row divergence, differentiable in Q.
    """
    return F.kl_div(student_log_probs, target_log_probs.clamp_min(_LOG_FLOOR), log_target=True, reduction="none").sum(dim=-1)
