"""Token students (language models) over a text cache: the loss from the cache's mode (full logits,
top-k buckets, sampled draws or teacher sequences), evaluated in perplexity and top-1 agreement."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache.manifest import FullLogitsRecord, Manifest, SampledRecord, SequencesRecord, TopkRecord
from pipeline.cache.schema import (
    INPUT_IDS,
    LENGTH,
    LOGITS,
    SAMPLED_INDICES,
    SAMPLED_WEIGHTS,
    TEACHER_SEQUENCE,
    TOPK_INDICES,
    TOPK_LSE,
    TOPK_VALUES,
)
from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.models.factory import build_model, output_width
from pipeline.models.hf import saved_tokenizer
from pipeline.models.hidden import Hidden, returns_hidden
from pipeline.student.losses.fused import head_losses, head_sums
from pipeline.student.tasks.base import Batch, Reduce, Task, alone
from pipeline.student.tasks.ids import unpack_ids
from pipeline.student.losses.tokens import (
    full_kd_loss,
    keep_masked,
    sampled_kd_loss,
    token_ce_loss,
    topk_kd_loss,
    topk_uniform_tail_kd_loss,
)

_INT_COLUMNS = {INPUT_IDS, LENGTH, TOPK_INDICES, SAMPLED_INDICES, TEACHER_SEQUENCE}
EVAL_TOKENS = 1 << 15  # positions an evaluation batch holds
EVAL_LOGITS = 1 << 27  # logits an evaluation batch of a student without a separable head holds (0.5 GiB)


class TokenTask(Task):
    """sum_i w_i term_i per token, masked: `kd` is the cache mode's estimator of T^2 KL(p_T || q_T)
    (exact over k+1 buckets for top-k), `ce` next-token cross-entropy (on the teacher's
    continuations for a sequences cache)."""

    name = "tokens"
    unit = "tokens"

    def __init__(self, cfg: TrainConfig, manifest: Manifest) -> None:
        super().__init__(cfg, manifest)
        self.signal = manifest.logits()
        loss = cfg.loss
        self.terms = {n: float(w) for n, w in loss.terms.items() if w > 0}
        self.temperature = float(loss.temperature)
        temps = getattr(self.signal, "temperatures", None) or [self.temperature]
        self.lse_index = min(range(len(temps)), key=lambda i: abs(temps[i] - self.temperature))
        self.topk_loss = topk_uniform_tail_kd_loss if loss.topk_tail == "uniform" else topk_kd_loss
        # What the cache knows of the teacher's argmax: agreement is reported only where it can be.
        self.result_metrics = ("val_perplexity", "val_accuracy", "val_nll",
                               *(("val_agreement",) if isinstance(self.signal, (TopkRecord, FullLogitsRecord)) else ()))
        self.fused = False  # set by build_model: whether the student hands its head to the loss
        self.eval_batch_size = self._eval_rows()
        bits = getattr(self.signal, "index_bits", None)  # ids packed above 4,096 tokens: read as bytes, unpacked here
        self.packed = {c: (bits, (int(self.signal.shape[0]), self.signal.k))
                       for c in (TOPK_INDICES, SAMPLED_INDICES) if bits and c in self.signal.columns}

    def _eval_rows(self) -> int:
        """Rows an evaluation batch holds: a budget of tokens (hidden states, the head applied in
        chunks) or, for a student that returns logits, of logits."""
        length, vocab = max(int(self.manifest.input_shape[0]), 1), max(self.manifest.num_classes, 1)
        if self.fused:
            return max(1, EVAL_TOKENS // length)
        return max(1, min(EVAL_TOKENS // length, EVAL_LOGITS // (length * vocab)))

    def check(self) -> None:
        """What a token cache can serve, and a student that reads its windows and vocabulary."""
        manifest, loss, signal = self.manifest, self.cfg.loss, self.signal
        if self.cfg.augment:
            raise DistillError(f"`augment` transforms images; cache {manifest.cache_id} holds token windows", "drop `augment`")
        extra = sorted(t for t in self.terms if t not in ("kd", "ce"))
        if extra:
            raise DistillError(f"loss term(s) {extra} need image taps; a token cache serves `kd` and `ce`",
                               "use terms {kd: ..., ce: ...}")
        if "kd" in self.terms:
            if isinstance(signal, SequencesRecord):
                raise DistillError(f"cache {manifest.cache_id} holds teacher sequences (sequence-level KD), not logits",
                                   "train on it with terms {ce: 1.0}; the targets are the teacher's continuations")
            temps = getattr(signal, "temperatures", None)
            if isinstance(signal, (TopkRecord, SampledRecord)) and not any(math.isclose(loss.temperature, t) for t in temps):
                raise DistillError(f"the {signal.mode} cache {manifest.cache_id} serves temperatures {temps}, not {loss.temperature}",
                                   f"set loss.temperature to one of {temps}, or precompute with it in outputs.logits.temperatures")
        spec = self.cfg.student
        self._check_tokenizer()
        try:
            width = output_width(self.build_model(), tuple(manifest.input_shape))
        except (RuntimeError, ValueError, IndexError) as e:
            raise DistillError(f"student {spec.factory} cannot read the cache's windows of {manifest.input_shape[0]} tokens: "
                               f"{str(e).splitlines()[0]}", "fix the student's kwargs (max_len, vocabulary)") from None
        if width != manifest.num_classes:
            tokenizer = manifest.dataset.tokenizer.digest if manifest.dataset.tokenizer else None
            raise DistillError(f"student {spec.factory} has a vocabulary of {width}, cache {manifest.cache_id} of "
                               f"{manifest.num_classes} (tokenizer {tokenizer})",
                               f"build the student with num_classes={manifest.num_classes}, the cache's tokenizer.json")

    def _check_tokenizer(self) -> None:
        """An HF student saved with its own tokenizer must share the cache's, token for token."""
        path, record = self.cfg.student.kwargs.get("path"), self.manifest.dataset.tokenizer
        uri = saved_tokenizer(str(path)) if path and record else None
        if uri is None:
            return
        from pipeline.data.tokenizer import load_tokenizer, tokenizer_digest

        digest = tokenizer_digest(load_tokenizer(uri))
        if digest != record.digest:  # type: ignore[union-attr]
            raise DistillError(f"the student's tokenizer {uri} (digest {digest}) differs from the one cache "
                               f"{self.manifest.cache_id} was made with (digest {record.digest}, {record.vocab_size} tokens)",  # type: ignore[union-attr]
                               "train the student with the teacher's tokenizer, or precompute a cache with the student's")

    def columns(self) -> list[str]:
        return [INPUT_IDS, LENGTH, *self.signal.columns]

    def dtypes(self) -> dict[str, torch.dtype]:
        return {c: torch.uint8 if c in self.packed else torch.int64 if c in _INT_COLUMNS else torch.float32
                for c in self.columns()}

    def unpacked(self, batch: Batch) -> Batch:
        """The batch with packed id columns as (B, L, k) int64 ids."""
        if not self.packed:
            return batch
        return {**batch, **{c: unpack_ids(batch[c], *spec) for c, spec in self.packed.items() if c in batch}}

    def build_model(self) -> nn.Module:
        m = self.manifest
        model = build_model(self.cfg.student, input_shape=tuple(m.input_shape), num_classes=m.num_classes)
        self.fused = self.cfg.loss.fused_head and returns_hidden(model)
        self.eval_batch_size = self._eval_rows()
        return model

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> Any:
        return model(inputs, hidden=True) if self.fused else model(inputs)

    def sequence(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L + 1), mask (B, L) of the targets that count) of the training sequences."""
        if isinstance(self.signal, SequencesRecord):
            seq = batch[TEACHER_SEQUENCE]
            prompt = self.signal.prompt_tokens
            pos = torch.arange(seq.shape[1] - 1, device=seq.device)[None, :]
            # Targets are the generated tokens; rows whose prompt was padding are skipped.
            mask = (pos >= prompt - 1) & (batch[LENGTH][:, None] >= prompt + 1)
            return seq, mask
        return lm_targets(batch)

    def model_inputs(self, batch: Batch) -> torch.Tensor:
        return self.sequence(batch)[0][:, :-1]

    def units(self, batch: Batch) -> torch.Tensor:
        return self.sequence(batch)[1].sum()

    def losses(self, output: Any, batch: Batch) -> dict[str, torch.Tensor]:
        batch = self.unpacked(batch)
        ids, mask = self.sequence(batch)
        if isinstance(output, Hidden):
            return self._fused_losses(output, ids, mask, batch)
        parts = {name: self._term(name, output, ids[:, 1:], batch, mask) for name in self.terms}
        total = sum(self.terms[n] * parts[n] for n in self.terms)
        return {"loss": total, **parts}  # type: ignore[dict-item]

    def _term(self, name: str, logits: torch.Tensor, targets: torch.Tensor, cols: Mapping[str, torch.Tensor],
              mask: torch.Tensor) -> torch.Tensor:
        """One loss term's masked mean: `ce` on the targets, or `kd` from the cache mode's columns."""
        if name == "ce":
            return token_ce_loss(logits, targets, mask)
        signal, t = self.signal, self.temperature
        if isinstance(signal, TopkRecord):
            step = signal.step if signal.values == "uint8" else None
            return self.topk_loss(logits, cols[TOPK_INDICES], cols[TOPK_VALUES], cols[TOPK_LSE][..., self.lse_index],
                                  mask, t, quantised_step=step)
        if isinstance(signal, SampledRecord):
            return sampled_kd_loss(logits, cols[SAMPLED_INDICES], cols[SAMPLED_WEIGHTS], mask, t,
                                   renormalise=signal.estimator != "priority")
        return full_kd_loss(logits, cols[LOGITS], mask, t)

    def _fused_losses(self, output: Hidden, ids: torch.Tensor, mask: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The same terms, the head applied inside the loss a chunk of the positions that count at a
        time (losses/fused.py): each chunk's term is the unfused formula on that chunk alone."""
        at, hidden = _counted(output, mask)
        # The cache's per-token columns ((B, L, ...): ids, weights, values, log-normalisers) at those positions.
        rows = {name: batch[name].flatten(0, 1)[at] for name in self.signal.columns if name in batch and batch[name].ndim >= 2}
        targets = ids[:, 1:].reshape(-1)[at]

        def chunk_sum(name: str) -> Callable[[torch.Tensor, slice], torch.Tensor]:
            def term(z: torch.Tensor, part: slice) -> torch.Tensor:
                ones = torch.ones(1, z.shape[0], dtype=torch.bool, device=z.device)
                cols = {c: r[part][None] for c, r in rows.items()}
                return self._term(name, z[None], targets[part][None], cols, ones) * z.shape[0]
            return term

        loss, parts = head_losses(hidden, output.weight, output.bias, {n: chunk_sum(n) for n in self.terms}, self.terms)
        return {"loss": loss, **parts}

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], reduce: Reduce = alone) -> dict[str, Any]:
        """Perplexity and next-token accuracy on the real text; top-1 agreement with the teacher where
        the cache knows the teacher's argmax (full and top-k caches)."""
        model.eval()
        total: dict[str, float] = {}
        for batch in map(self.unpacked, batches):
            ids, mask = lm_targets(batch)
            output = self.forward(model, ids[:, :-1])
            if isinstance(self.signal, TopkRecord) and TOPK_INDICES in batch:
                top1 = batch[TOPK_INDICES][..., 0]
            elif isinstance(self.signal, FullLogitsRecord) and LOGITS in batch:
                top1 = batch[LOGITS].argmax(-1)
            else:  # sampled or sequence caches, or text with no teacher outputs: no argmax to agree with
                top1 = torch.full_like(ids[:, 1:], -1)
                total["no_teacher"] = 1.0
            if isinstance(output, Hidden):  # the head applied a chunk of the counted positions at a time
                at, hidden = _counted(output, mask)
                targets, top1 = ids[:, 1:].reshape(-1)[at], top1.reshape(-1)[at]
                ones = torch.ones(1, len(at), dtype=torch.bool, device=ids.device)
                sums = head_sums(hidden, output.weight, output.bias,
                                 lambda z, p: lm_eval_sums(z[None], targets[p][None], ones[:, p], top1[p][None]))
            else:
                sums = lm_eval_sums(output, ids[:, 1:], mask, top1)
            for k, v in sums.items():
                total[k] = total.get(k, 0.0) + v
        total = reduce(total)
        tokens = max(total.get("tokens", 0.0), 1.0)
        nll = total.get("nll_sum", math.nan) / tokens
        out = {"val_perplexity": math.exp(nll) if nll == nll else math.nan, "val_nll": nll,
               "val_accuracy": total.get("correct", math.nan) / tokens,  # next-token accuracy
               "val_tokens": total.get("tokens", 0.0)}
        if "val_agreement" in self.result_metrics and "no_teacher" not in total:
            out["val_agreement"] = total.get("agree", math.nan) / tokens
        return out


def _counted(output: Hidden, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices of the positions that count, their hidden states (N, H)): padding never meets the head."""
    at = mask.reshape(-1).nonzero().squeeze(1)
    return at, output.hidden.reshape(-1, output.hidden.shape[-1])[at]


def lm_targets(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The real text: ids (B, L + 1) and the mask of real targets, t < length - 1."""
    ids = batch[INPUT_IDS]
    pos = torch.arange(ids.shape[1] - 1, device=ids.device)[None, :]
    return ids, pos < batch[LENGTH][:, None] - 1


@torch.no_grad()
def lm_eval_sums(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    teacher_top1: torch.Tensor,
) -> dict[str, float]:
    """Additive evaluation sums over the masked tokens of a batch.

    Sums, not means, so batches and workers combine by addition: perplexity is
    exp(nll_sum / tokens), accuracy correct / tokens, teacher agreement agree / tokens.

    Args:
        student_logits: (B, L, V) raw student logits.
        targets: (B, L) long next tokens.
        mask: (B, L) target positions that count.
        teacher_top1: (B, L) long teacher argmax (TOPK_INDICES[..., 0] of a top-k cache).

    Returns:
        {"tokens", "nll_sum", "agree", "correct"} as Python floats.
    """
    keep = mask.bool()
    vocab = student_logits.shape[-1]
    targets = keep_masked(targets.long(), mask).clamp(0, vocab - 1)
    log_q = F.log_softmax(student_logits.double() if student_logits.dtype == torch.float64 else student_logits.float(), dim=-1)
    nll = -log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    pred = student_logits.argmax(dim=-1)
    return {
        "tokens": float(keep.sum().item()),
        "nll_sum": float(nll[keep].double().sum().item()),
        "agree": float((pred == teacher_top1.long())[keep].sum().item()),
        "correct": float((pred == targets)[keep].sum().item()),
    }
