"""Teacher outputs -> cache columns. Pure functions, no Ray."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache.schema import SAMPLED_INDICES, SAMPLED_WEIGHTS, TOPK_INDICES, TOPK_LSE, TOPK_VALUES
from pipeline.models.taps import signal
from pipeline.teacher.estimators import estimate, merge

_DTYPES = {"float16": np.float16, "float32": np.float32}


def encode_full_logits(logits: torch.Tensor, dtype: str = "float16") -> np.ndarray:
    """Raw logits, unsoftened, so any temperature can be applied exactly at train time.

    float16 keeps about 3 significant digits, which bounds the KL error at T >= 1 far below
    the noise of SGD; the cast happens on the device before the copy to host.
    """
    if logits.ndim not in (2, 3):
        raise ValueError(f"expected (batch, classes) or (batch, tokens, vocab) logits, got shape {tuple(logits.shape)}")
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    return logits.detach().to(torch_dtype).cpu().numpy().astype(_DTYPES[dtype], copy=False)


def encode_tap(feature: torch.Tensor, kind: str, pool: list[int] | None = None, p: float = 2.0) -> np.ndarray:
    """A captured activation in its stored form (see pipeline.models.taps.signal), float16.

    Pooled features, attention maps and embeddings are small next to the activation, and
    float16's 3 significant digits are well inside the noise of an MSE or distance loss.
    """
    return signal(kind, feature.detach().float(), pool=pool, p=p).to(torch.float16).cpu().numpy()


# Token-level (language model) outputs: per token, top-k logits + log-normalisers, or sampled KD.
# Shapes are per batch (B, L, ...); the writer stores one (L, ...) array per row.

_TOPK_VALUE_MODES = ("float16", "uint8")
_UINT8_MAX = 255  # also the "beyond range" sentinel: such a stored token is decoded as part of the rest bucket


def index_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds token ids 0..vocab_size-1.

    Indices are most of a top-k row's bytes (k of them per token), so a 50k vocabulary stores
    2 bytes per id instead of 8. Arrow/Parquet store unsigned ints natively; the student casts
    them to int64 before any gather.

    Args:
        vocab_size: V >= 1.

    Returns:
        uint8 for V <= 256, uint16 for V <= 65536, uint32 for V <= 2**32.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")


def _token_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 3:
        raise ValueError(f"expected (batch, length, vocab) logits, got shape {tuple(logits.shape)}")
    return logits.detach()


def _indices_to_numpy(indices: torch.Tensor, vocab_size: int) -> np.ndarray:
    # Narrow on the device first so the host copy is 4 bytes per id, not 8.
    narrow = torch.int32 if vocab_size <= 2**31 else torch.int64
    return indices.to(narrow).cpu().numpy().astype(index_dtype(vocab_size), copy=False)


def encode_topk(
    logits: torch.Tensor,
    k: int,
    temperatures: list[float],
    values: str = "float16",
    step: float = 1 / 16,
) -> dict[str, np.ndarray]:
    """Per-token top-k teacher logits plus the full-vocabulary log-normaliser at each declared T.

    With lse_T = logsumexp(z / T) over the whole vocabulary, the softened probability of each
    stored token p_i = exp(z_i / T - lse_T) is exact, and so is the mass of everything not
    stored, 1 - sum_i p_i (the "rest" bucket): the student can be trained on an exact KL over
    k + 1 buckets without the (B, L, V) logits ever leaving the teacher.

    Value modes:
        "float16": raw logits as float16. The logits are rounded to float16 *before* the top-k
            and lse, so the cache describes exactly the float16-rounded teacher (as a float16
            full-logit cache does): stored probabilities and rest mass are mutually consistent
            (sum <= 1 up to float32 rounding). bf16 logits convert to float16 losslessly.
            TOPK_LSE holds the absolute lse_T.
        "uint8": offsets q_i = round((z_max - z_i) / step), clipped to 255, so q_0 = 0; TOPK_LSE
            holds the RELATIVE lse_T - z_max / T. Then log p_i = -q_i * step / T - lse_rel, with a
            logit error of at most step / 2 (k=32 costs 32*2 + 32 + 4*nT bytes a token with uint16
            ids). q = 255 means "at least 254.5 steps below the max": the decoder moves such a token
            to the rest bucket, whose mass stays exact, instead of trusting a clipped offset.

    The lse is computed in float32 and stored in float32: at V=8192 float64 changes it by at
    most ~1.4e-6 (float32 storage alone rounds by up to ~1e-6), far below float16/uint8 value
    rounding (~1e-3 relative in p).

    Args:
        logits: (B, L, V) raw teacher logits, any float dtype, on any device (computed there).
        k: tokens kept per position, 1 <= k <= V.
        temperatures: every T > 0 the cache must serve; TOPK_LSE has one column per T, in order.
        values: "float16" or "uint8".
        step: uint8 quantisation step in logits (ignored for float16); the student needs it.

    Returns:
        TOPK_INDICES: (B, L, k) index_dtype(V), token ids by descending logit.
        TOPK_VALUES: (B, L, k) float16 raw logits, or uint8 offsets below the token's max logit.
        TOPK_LSE: (B, L, len(temperatures)) float32, absolute (float16) or relative (uint8).

    Raises:
        ValueError: bad shape, k, temperature, mode or step, or non-finite logits (NaN or +inf).
    """
    z = _token_logits(logits)
    vocab = z.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    if not temperatures or any(not t > 0 for t in temperatures):
        raise ValueError(f"temperatures must be a non-empty list of values > 0, got {temperatures}")
    if values not in _TOPK_VALUE_MODES:
        raise ValueError(f"values must be one of {_TOPK_VALUE_MODES}, got {values!r}")
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step}")

    z = z.to(torch.float16).float() if values == "float16" else z.float()
    top, idx = torch.topk(z, k, dim=-1, largest=True, sorted=True)
    z_max = top[..., :1]
    if values == "float16":
        lse = torch.stack([torch.logsumexp(z / t, dim=-1) for t in temperatures], dim=-1)
        stored = top.to(torch.float16).cpu().numpy()
    else:
        # Relative to z_max: the shifted logsumexp is well conditioned and lands in [0, log V]; the
        # shift already makes every exponent <= 0, so log(sum(exp)) needs no second max pass.
        shifted = z - z_max
        lse = torch.stack([(shifted / t if t != 1 else shifted).exp().sum(-1).log() for t in temperatures], dim=-1)
        q = torch.round((z_max - top) / step).clamp_(0, _UINT8_MAX)  # -inf logits become 255 (rest)
        stored = q.to(torch.uint8).cpu().numpy()
    lse_host = lse.float().cpu().numpy()
    if not np.isfinite(lse_host).all():
        raise ValueError("teacher logits contain NaN or +inf (log-normaliser is not finite)")
    return {
        TOPK_INDICES: _indices_to_numpy(idx, vocab),
        TOPK_VALUES: stored,
        TOPK_LSE: lse_host,
    }


def encode_sampled(
    logits: torch.Tensor,
    k: int,
    temperature: float,
    generator: torch.Generator,
    proposal_temperature: float | None = None,
    estimator: str = "multinomial",
    head: int = 0,
) -> dict[str, np.ndarray]:
    """Sampled KD targets (Anshumann et al., 2025, "Sparse Logit Sampling: Accelerating
    Knowledge Distillation in LLMs"): per token, k draws with replacement from a proposal
    q = softmax(z / T_q), each weighted by p_T(i) / q(i) with p_T = softmax(z / T).

    Unlike top-k, the stored sparse distribution is an estimate of p_T itself, not of a
    truncated p_T, so the student's gradient is not biased towards the head. The weights of
    equal ids are summed and normalised to 1 per token. With T_q = T every weight is
    count / k and E[sum_i w_i f(i)] = sum_j p_T(j) f(j) exactly (unbiased). With T_q != T the
    weights are self-normalised importance weights: consistent (bias O(1/k)), not unbiased.

    All draws for the batch are one torch.multinomial call on the flattened (B*L, V) proposal,
    on the logits' device.

    Args:
        logits: (B, L, V) raw teacher logits, any float dtype (computed in float32).
        k: draws per token, >= 1 (at most k distinct ids are stored).
        temperature: T > 0 of the target p_T; the student must train at this T.
        generator: torch.Generator on the logits' device; seed it from the batch so a rerun
            draws the same ids.
        proposal_temperature: T_q > 0 of the proposal; defaults to T.
        estimator, head: another unbiased estimate of p_T in the same columns
            (pipeline/teacher/estimators.py); priority sampling's weights sum to 1 only in expectation.

    Returns:
        SAMPLED_INDICES: (B, L, k) index_dtype(V), the distinct drawn ids ascending, then id 0
            padding.
        SAMPLED_WEIGHTS: (B, L, k) float16, summing to 1 per token; 0 exactly on padding.
    """
    z = _token_logits(logits)
    batch, length, vocab = z.shape
    t_p = float(temperature)
    t_q = t_p if proposal_temperature is None else float(proposal_temperature)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not (t_p > 0 and t_q > 0):
        raise ValueError(f"temperatures must be > 0, got T={temperature}, proposal T={proposal_temperature}")

    flat = z.float().reshape(-1, vocab)
    if estimator != "multinomial":
        ids, w = estimate(torch.softmax(flat / t_p, dim=-1), estimator, k, head, generator)
        return {SAMPLED_INDICES: _indices_to_numpy(ids.reshape(batch, length, k), vocab),
                SAMPLED_WEIGHTS: w.reshape(batch, length, k).to(torch.float16).cpu().numpy()}
    if t_q == t_p:
        # multinomial normalises its weights itself: exp(z/T - max) made in one buffer, exponentiated
        # in place (a log-softmax and its exp would be two more (N, V) passes and allocations).
        q = (flat - flat.amax(dim=-1, keepdim=True)).div_(t_q).exp_()
        draws = torch.multinomial(q, k, replacement=True, generator=generator)  # (N, k)
        del q
        log_ratio = torch.zeros(draws.shape, dtype=torch.float32, device=draws.device)
    else:
        log_q = torch.log_softmax(flat / t_q, dim=-1)
        draws = torch.multinomial(log_q.exp(), k, replacement=True, generator=generator)  # (N, k)
        log_p = torch.log_softmax(flat / t_p, dim=-1)
        log_ratio = log_p.gather(-1, draws) - log_q.gather(-1, draws)
        log_ratio = log_ratio - log_ratio.amax(dim=-1, keepdim=True)  # self-normalised: any shift cancels
    ids, weights = merge(draws, log_ratio.exp())
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return {
        SAMPLED_INDICES: _indices_to_numpy(ids.reshape(batch, length, k), vocab),
        SAMPLED_WEIGHTS: weights.reshape(batch, length, k).to(torch.float16).cpu().numpy(),
    }
