"""Token-level distillation losses for language models. Pure PyTorch, no teacher import.

Every tensor is per token: student logits (B, L, V), cache columns (B, L, k) or (B, L), and a
`mask` (B, L) (bool or 0/1 float) of the target positions that count. Each loss is a mean over
masked tokens, sum / mask.sum().clamp_min(1), so padding never counts and an all-padding batch
gives 0. Cache values at masked-out positions are replaced before any arithmetic, so garbage
there (NaN, out-of-range ids) changes neither the loss nor any gradient.

Computation is in float32, or float64 when the student logits are float64 (gradcheck).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.student.losses.divergence import kl_divergence, softened_log_probs

_UINT8_SENTINEL = 255  # a quantised offset that was clipped: that token's mass belongs to the rest bucket


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(per_token.dtype)
    # where, not a product: a non-finite value at a padded position must not leak into the sum.
    return torch.where(m > 0, per_token * m, torch.zeros_like(per_token)).sum() / m.sum().clamp_min(1)


def keep_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with every masked-out position replaced by 0 (x is (B, L) or (B, L, ...))."""
    keep = mask.bool().reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return torch.where(keep, x, torch.zeros_like(x))


def teacher_buckets(
    values: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    quantised_step: float | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Teacher log-probabilities of the k stored tokens and of the rest bucket, at temperature T.

    log p_i = z_i / T - lse_T for float16 values (lse absolute), and log p_i = -q_i * step / T
    - lse_rel for uint8 offsets (lse relative to the token's max logit). The rest is
    log(1 - sum_i p_i), via log1p, clamped at 0 mass. A stored offset of 255 (clipped) is not
    trusted: that token gets p = 0 here and its true mass stays in the rest, which is exact.
    If rounding makes sum_i p_i exceed 1 (possible when the true rest is below the value
    rounding), the stored probabilities are renormalised so the k + 1 buckets are a distribution.

    Args:
        values: (B, L, k) float16/float raw logits, or uint8 offsets when quantised_step is set.
        lse: (B, L) the TOPK_LSE column of this temperature.
        temperature: T > 0, one of the temperatures the cache was made with.
        quantised_step: the cache's uint8 step; None for float16 values.
        vocab_size: when given, a token whose valid stored tokens cover all V ids has an empty
            rest (-inf) whatever the rounding says.

    Returns:
        (B, L, k + 1) log-probabilities; -inf marks an empty bucket (0 mass).
    """
    t = float(temperature)
    dtype = torch.float64 if lse.dtype == torch.float64 else torch.float32
    lse = lse.to(dtype)
    if quantised_step is None:
        log_p = values.to(dtype) / t - lse.unsqueeze(-1)
        valid = torch.ones_like(log_p, dtype=torch.bool)
    else:
        valid = values < _UINT8_SENTINEL
        log_p = -values.to(dtype) * (float(quantised_step) / t) - lse.unsqueeze(-1)
        log_p = log_p.masked_fill(~valid, float("-inf"))
    total = log_p.exp().sum(dim=-1, keepdim=True)
    log_p = log_p - torch.log(total.clamp_min(1.0))
    rest = torch.log1p(-total.clamp(max=1.0))  # log(0) = -inf when the stored tokens hold everything
    if vocab_size is not None:
        rest = rest.masked_fill(valid.sum(dim=-1, keepdim=True) >= vocab_size, float("-inf"))
    return torch.cat([log_p, rest], dim=-1)


def student_buckets(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Student log-probabilities at temperature T of the stored tokens and of its own rest bucket.

    The rest is log sum_{j not stored} softmax(s / T)_j, computed as a logsumexp over the
    logits with the stored positions filled with the most negative finite value, minus the full
    logsumexp: exact even when the rest is tiny, where 1 - sum would cancel to 0.

    Args:
        student_logits: (B, L, V) raw student logits.
        indices: (B, L, k) stored token ids (any integer dtype), distinct per token.
        temperature: T > 0.
        valid: optional (B, L, k) bool; a False token is counted in the rest and its own entry
            is empty (see teacher_buckets' 255 sentinel).

    Returns:
        (B, L, k + 1) log-probabilities. An empty bucket (invalid entry, or the rest when the
        valid tokens cover the vocabulary) is the dtype's most negative finite value rather than
        -inf, so gradients stay finite.
    """
    s = student_logits.to(_compute_dtype(student_logits)) / float(temperature)
    idx = indices.long()
    empty = torch.finfo(s.dtype).min
    full = torch.logsumexp(s, dim=-1, keepdim=True)
    log_q = s.gather(-1, idx) - full
    if valid is None:
        stored = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    else:
        stored = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, valid.bool())
        log_q = log_q.masked_fill(~valid.bool(), empty)
    rest = torch.logsumexp(s.masked_fill(stored, empty), dim=-1, keepdim=True) - full
    return torch.cat([log_q, rest.clamp_min(empty)], dim=-1)


def _bucket_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_b P_b (log P_b - log Q_b) over the last axis, with 0 * log 0 = 0."""
    p = log_p.exp()
    present = p > 0
    safe_log_p = torch.where(present, log_p, torch.zeros_like(log_p))
    return torch.where(present, p * (safe_log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def _cached_buckets(student_logits: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, lse: torch.Tensor,
                    mask: torch.Tensor, temperature: float, quantised_step: float | None):
    """Top-k cache columns with padded positions cleaned, and the teacher's (B, L, k + 1) bucket log-probs."""
    vocab = student_logits.shape[-1]
    indices = keep_masked(indices.long(), mask).clamp(0, vocab - 1)
    values = keep_masked(values, mask)
    lse = keep_masked(lse.to(_compute_dtype(student_logits)), mask)
    return indices, values, teacher_buckets(values, lse, temperature, quantised_step, vocab_size=vocab)


def topk_kd_loss(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    quantised_step: float | None = None,
) -> torch.Tensor:
    """Top-k + rest-bucket KD: T^2 * KL(P_T || Q_T) over the k + 1 buckets, masked mean.

    P_T is the teacher's softened distribution collapsed to {stored tokens, everything else},
    exact from the cache (see teacher_buckets); Q_T the student's, collapsed the same way. By the
    data processing inequality it is <= the full-vocabulary KL, with equality at k = V. The
    T^2 factor keeps the gradient scale independent of T (Hinton et al., 2015).

    Args:
        student_logits: (B, L, V) raw student logits.
        indices: (B, L, k) TOPK_INDICES (any integer dtype).
        values: (B, L, k) TOPK_VALUES, float16 logits or uint8 offsets.
        lse: (B, L) the TOPK_LSE column of `temperature`.
        mask: (B, L) target positions that count.
        temperature: T > 0, one the cache declares.
        quantised_step: the cache's uint8 step; None for float16 values.

    Returns:
        Scalar loss.
    """
    indices, values, log_p = _cached_buckets(student_logits, indices, values, lse, mask, temperature, quantised_step)
    valid = None if quantised_step is None else values < _UINT8_SENTINEL
    log_q = student_buckets(student_logits, indices, temperature, valid)
    t = float(temperature)
    return (t * t) * _masked_mean(_bucket_kl(log_p, log_q), mask)


def sampled_kd_loss(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    renormalise: bool = True,
) -> torch.Tensor:
    """Sampled KD (Anshumann et al., 2025): T^2 * (-sum_i w_i log softmax(s / T)_{idx_i}), masked mean.

    The cross-entropy to the sparse importance-weighted estimate of p_T. It differs from
    KL(p_T || q_T) by the teacher's entropy, a constant in the student, so the gradients are the
    same in expectation but the value does not go to 0. The weights are renormalised per token
    (float16 storage rounds their sum); zero-weight padding contributes nothing.

    Args:
        student_logits: (B, L, V) raw student logits.
        indices: (B, L, k) SAMPLED_INDICES (any integer dtype).
        weights: (B, L, k) SAMPLED_WEIGHTS.
        mask: (B, L) target positions that count.
        temperature: T > 0, the one the cache was sampled at.
        renormalise: scale the weights to sum to 1 per token (they do by construction, up to
            float16 rounding); off for priority sampling, whose weights sum to 1 only in
            expectation: scaling them would bias the gradient, which is (sum w) q - w.

    Returns:
        Scalar loss.
    """
    vocab = student_logits.shape[-1]
    dtype = _compute_dtype(student_logits)
    indices = keep_masked(indices.long(), mask).clamp(0, vocab - 1)
    w = keep_masked(weights.to(dtype), mask)
    if renormalise:
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    t = float(temperature)
    log_q = softened_log_probs(student_logits, t, dtype).gather(-1, indices)
    return (t * t) * _masked_mean(-(w * log_q).sum(dim=-1), mask)


def full_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference Hinton KD per token: T^2 * KL(softmax(z / T) || softmax(s / T)), masked mean.

    Args:
        student_logits: (B, L, V) raw student logits.
        teacher_logits: (B, L, V) raw teacher logits, any float dtype.
        mask: (B, L) target positions that count.
        temperature: T > 0.
    """
    dtype = _compute_dtype(student_logits)
    t = float(temperature)
    kl = kl_divergence(softened_log_probs(keep_masked(teacher_logits, mask), t, dtype), softened_log_probs(student_logits, t, dtype))
    return (t * t) * _masked_mean(kl, mask)


def token_ce_loss(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy -log softmax(s)_{target}, masked mean.

    Args:
        student_logits: (B, L, V) raw student logits at the input positions.
        targets: (B, L) long, the next token of each position (anything at padding).
        mask: (B, L) target positions that count.
    """
    dtype = _compute_dtype(student_logits)
    targets = keep_masked(targets.long(), mask).clamp(0, student_logits.shape[-1] - 1)
    nll = -F.log_softmax(student_logits.to(dtype), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return _masked_mean(nll, mask)


def topk_uniform_tail_kd_loss(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    quantised_step: float | None = None,
) -> torch.Tensor:
    """Top-k KD over the full vocabulary: the stored tokens keep their exact p_i, and the exact rest
    mass is spread evenly over the V - k tokens not stored; T^2 KL(target || q_T), masked mean.

    Equals the bucket KL plus P_rest * KL(uniform || q restricted to the tail), so it also shapes
    the student's tail instead of leaving it free: on small data that keeps the perplexity of the
    tokens the teacher ranked low from blowing up (measured in `make bench-topk`). The uniform tail
    is an assumption about what the cache does not store; the bucket loss assumes nothing.

    Args: as for topk_kd_loss.
    """
    vocab = student_logits.shape[-1]
    idx, _, log_p = _cached_buckets(student_logits, indices, values, lse, mask, temperature, quantised_step)
    k = idx.shape[-1]
    tail = (log_p[..., -1:] - math.log(max(vocab - k, 1))).clamp_min(-1e4)
    target = tail.expand(*idx.shape[:-1], vocab).clone()
    target.scatter_(-1, idx, log_p[..., :-1].clamp_min(-1e4))
    kl = kl_divergence(target, softened_log_probs(student_logits, temperature, _compute_dtype(student_logits)))
    t = float(temperature)
    return (t * t) * _masked_mean(kl, mask)
