"""Stage 2 for token caches (language models): which columns a student reads, its loss from the
cache's mode (full logits, top-k buckets, sampled draws or teacher sequences), and evaluation
in perplexity and top-1 agreement. Pure PyTorch; the trainer wires it into Ray Train."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from pipeline.cache.manifest import Manifest
from pipeline.cache.schema import (
    INPUT_IDS,
    LENGTH,
    LOGITS,
    SAMPLED_INDICES,
    SAMPLED_WEIGHTS,
    TEACHER_SEQUENCE,
    TOKEN_MODE_COLUMNS,
    TOPK_INDICES,
    TOPK_LSE,
    TOPK_VALUES,
)
from pipeline.config import LossConfig
from pipeline.errors import DistillError
from pipeline.student.token_losses import (
    full_kd_loss,
    lm_eval_sums,
    sampled_kd_loss,
    token_ce_loss,
    topk_kd_loss,
    topk_uniform_tail_kd_loss,
)

_INT_COLUMNS = {INPUT_IDS, LENGTH, TOPK_INDICES, SAMPLED_INDICES, TEACHER_SEQUENCE}


def is_token_cache(manifest: Manifest) -> bool:
    return INPUT_IDS in manifest.columns


def token_columns(manifest: Manifest) -> list[str]:
    return [INPUT_IDS, LENGTH, *TOKEN_MODE_COLUMNS[manifest.outputs["logits"]["mode"]]]


def token_dtypes(columns: list[str]) -> dict[str, torch.dtype]:
    return {c: torch.int64 if c in _INT_COLUMNS else torch.float32 for c in columns}


def check_token_loss(loss: LossConfig, manifest: Manifest) -> None:
    """What a token cache can serve, checked before any worker starts."""
    spec = manifest.outputs["logits"]
    mode, temps = spec["mode"], spec.get("temperatures") or []
    extra = sorted(t for t, w in loss.terms.items() if w > 0 and t not in ("kd", "ce"))
    if extra:
        raise DistillError(f"loss term(s) {extra} need image taps; a token cache serves `kd` and `ce`",
                           "use terms {kd: ..., ce: ...}")
    if loss.terms.get("kd", 0) <= 0:
        return
    if mode == "sequences":
        raise DistillError(f"cache {manifest.cache_id} holds teacher sequences (sequence-level KD), not logits",
                           "train on it with terms {ce: 1.0}; the targets are the teacher's continuations")
    if mode in ("topk", "sampled") and not any(math.isclose(loss.temperature, t) for t in temps):
        raise DistillError(f"the {mode} cache {manifest.cache_id} serves temperatures {temps}, not {loss.temperature}",
                           f"set loss.temperature to one of {temps}, or precompute with it in outputs.logits.temperatures")


class TokenDistillationLoss:
    """sum_i w_i term_i per token, masked: `kd` is the cache mode's estimator of T^2 KL(p_T || q_T)
    (exact over k+1 buckets for top-k), `ce` next-token cross-entropy (on the teacher's
    continuations for a sequences cache)."""

    def __init__(self, terms: Mapping[str, float], temperature: float, spec: Mapping[str, Any], topk_tail: str = "bucket") -> None:
        self.terms = {n: float(w) for n, w in terms.items() if w > 0}
        self.temperature = float(temperature)
        self.mode = spec["mode"]
        temps = spec.get("temperatures") or [temperature]
        self.lse_index = min(range(len(temps)), key=lambda i: abs(temps[i] - self.temperature))
        self.step = spec.get("step") if spec.get("values") == "uint8" else None
        self.prompt = spec.get("prompt_tokens", 0)
        self.topk_loss = topk_uniform_tail_kd_loss if topk_tail == "uniform" else topk_kd_loss

    def sequence(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L + 1), mask (B, L) of the targets that count) of the training sequences."""
        if self.mode == "sequences":
            seq = batch[TEACHER_SEQUENCE]
            pos = torch.arange(seq.shape[1] - 1, device=seq.device)[None, :]
            # Targets are the generated tokens; rows whose prompt was padding are skipped.
            mask = (pos >= self.prompt - 1) & (batch[LENGTH][:, None] >= self.prompt + 1)
            return seq, mask
        return lm_targets(batch)

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.sequence(batch)[0][:, :-1]

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = self.sequence(batch)
        parts: dict[str, torch.Tensor] = {}
        if "ce" in self.terms:
            parts["ce"] = token_ce_loss(logits, ids[:, 1:], mask)
        if "kd" in self.terms:
            t = self.temperature
            if self.mode == "topk":
                parts["kd"] = self.topk_loss(logits, batch[TOPK_INDICES], batch[TOPK_VALUES], batch[TOPK_LSE][..., self.lse_index],
                                           mask, t, quantised_step=self.step)
            elif self.mode == "sampled":
                parts["kd"] = sampled_kd_loss(logits, batch[SAMPLED_INDICES], batch[SAMPLED_WEIGHTS], mask, t)
            else:
                parts["kd"] = full_kd_loss(logits, batch[LOGITS], mask, t)
        total = sum(self.terms[n] * parts[n] for n in self.terms)
        return {"loss": total, **parts}  # type: ignore[dict-item]


def lm_targets(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The real text: ids (B, L + 1) and the mask of real targets, t < length - 1."""
    ids = batch[INPUT_IDS]
    pos = torch.arange(ids.shape[1] - 1, device=ids.device)[None, :]
    return ids, pos < batch[LENGTH][:, None] - 1


@torch.inference_mode()
def evaluate_tokens(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], mode: str) -> dict[str, float]:
    """Perplexity and next-token accuracy on the real text; top-1 agreement with the teacher where
    the cache knows the teacher's argmax (full and top-k caches)."""
    model.eval()
    total: dict[str, float] = {}
    for batch in batches:
        ids, mask = lm_targets(batch)
        logits = model(ids[:, :-1])
        if mode == "topk":
            top1 = batch[TOPK_INDICES][..., 0]
        elif mode == "full":
            top1 = batch[LOGITS].argmax(-1)
        else:
            top1 = torch.full_like(ids[:, 1:], -1)
        for k, v in lm_eval_sums(logits, ids[:, 1:], mask, top1).items():
            total[k] = total.get(k, 0.0) + v
    tokens = max(total.get("tokens", 0.0), 1.0)
    nll = total.get("nll_sum", math.nan) / tokens
    return {
        "val_perplexity": math.exp(nll) if nll == nll else math.nan,
        "val_nll": nll,
        "val_accuracy": total.get("correct", math.nan) / tokens,  # next-token accuracy
        "val_agreement": total["agree"] / tokens if mode in ("topk", "full") else math.nan,
        "val_tokens": total.get("tokens", 0.0),
        "val_kl": math.nan,
        "teacher_val_accuracy": math.nan,
    }
