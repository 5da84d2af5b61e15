"""Distillation loss terms. Pure PyTorch, each tested against its paper's formula.

Each term maps (student outputs, batch of cache columns) to a scalar; `DistillationLoss` weighs
and sums them and returns every term by name, so the loop calls backward() on "loss" and logs
the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F

from pipeline.cache.schema import LABEL, LOGITS
from pipeline.models.taps import attention_map, embedding
from pipeline.models.vit import DISTILL_LOGITS
from pipeline.student.losses.divergence import kl_divergence, softened_log_probs


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015) soft-target loss: T^2 * KL(p_teacher(T) || p_student(T)), mean over the batch.

    Args:
        student_logits: (B, C) raw student logits.
        teacher_logits: (B, C) raw teacher logits (any float dtype; computed in float32).
        temperature: T > 0. The T^2 factor keeps the gradient scale independent of T, so the
            gradient w.r.t. the student logits is T * (p_student(T) - p_teacher(T)) / B.
    """
    t = float(temperature)
    kl = kl_divergence(softened_log_probs(teacher_logits, t), softened_log_probs(student_logits, t))
    return (t * t) * kl.mean()


def soft_target_kd(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(target || p_student(T)) for any target distribution (B, C), e.g. a teachers' mixture."""
    t = float(temperature)
    kl = kl_divergence(torch.log(target_probs.float()), softened_log_probs(student_logits, t))
    return (t * t) * kl.mean()


def mixture_targets(teacher_logits: list[torch.Tensor], weights: list[float], temperature: float) -> torch.Tensor:
    """Multi-teacher soft targets: sum_i w_i softmax(z_i / T) / sum_i w_i, shape (B, C)."""
    total = float(sum(weights))
    return sum(w / total * F.softmax(z.float() / float(temperature), dim=-1) for z, w in zip(teacher_logits, weights))  # type: ignore[return-value]


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the hard labels, mean over the batch."""
    return F.cross_entropy(student_logits.float(), labels)


def deit_hard_loss(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Touvron et al. (2021) hard distillation: CE to the teacher's argmax label y_t = argmax z_t.

    DeiT's objective is 1/2 CE(student, y) + 1/2 CE(student, y_t): weigh `ce` and `deit_hard`
    equally. Derived from the stored logits, so it needs no column of its own.
    """
    return F.cross_entropy(student_logits.float(), target_probs.argmax(dim=-1))


def hint_loss(adapted_student: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Romero et al. (2015) FitNets hint: mean squared error between the regressor's output
    r(f_s) (a learned adapter, same shape as the teacher's) and the teacher's feature f_t."""
    return F.mse_loss(adapted_student.float(), teacher_feature.float())


def attention_loss(student_feature: torch.Tensor, teacher_map: torch.Tensor, size: tuple[int, int], p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis (2017) attention transfer between one pair of layers.

    With Q = vec(mean_c |A_c|^p) / ||vec(mean_c |A_c|^p)||_2, the loss is the mean over samples
    and positions of (Q_s - Q_t)^2: the paper's reference implementation, whose weight beta
    (1e3 in the paper) goes in the term's weight.

    Args:
        student_feature: (B, C_s, H_s, W_s) student activations; its map is resized to `size`.
        teacher_map: (B, h*w) stored unit-norm teacher map.
        size: (h, w) of the stored map.
    """
    q_s = attention_map(student_feature, p=p, size=size)
    return (q_s - teacher_map.float()).pow(2).mean()


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Park et al. (2019) distance-wise RKD: Huber(psi_D(s_i, s_j), psi_D(t_i, t_j)) over pairs i != j,
    where psi_D = ||e_i - e_j||_2 / mu and mu is the batch's mean pairwise distance."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    ds, dt = _pairwise_distances(s)[off], _pairwise_distances(t)[off]
    return F.smooth_l1_loss(ds / ds.mean().clamp_min(1e-12), dt / dt.mean().clamp_min(1e-12))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Park et al. (2019) angle-wise RKD: Huber between cos angle(e_i - e_j, e_k - e_j) of the student
    and the teacher, over all triplets (i, j, k) of the batch."""
    def angles(e: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(e.float().flatten(1)[None, :, :] - e.float().flatten(1)[:, None, :], p=2, dim=2)  # [j, i] = e_i - e_j
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # [j, i, k] = <e_ij, e_kj>
    return F.smooth_l1_loss(angles(student), angles(teacher))


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 1.0, angle_weight: float = 2.0) -> torch.Tensor:
    """lambda_D * L_RKD-D + lambda_A * L_RKD-A on (B, D_s) and (B, D_t) embeddings (dims may differ)."""
    return distance_weight * rkd_distance_loss(student, teacher) + angle_weight * rkd_angle_loss(student, teacher)


@dataclass(frozen=True)
class LossInputs:
    """Which cache columns and student layers each term reads, resolved against the manifest."""

    logits: dict[str, float] = field(default_factory=lambda: {LOGITS: 1.0})  # teacher logits column -> weight
    multi_teacher: str = "average"  # or "per_teacher"
    hint: tuple[tuple[str, str], ...] = ()  # (student module, tap column)
    attention: tuple[tuple[str, str, tuple[int, int], float], ...] = ()  # (student module, column, (h, w), p)
    rkd: tuple[str, str, float, float] | None = None  # (student module, column, distance weight, angle weight)


# A mixed batch (mixup, CutMix): row i is lam * image i + (1 - lam) * image perm[i], so its targets are too.
MIX_PERM, MIX_LAM = "_mix_perm", "_mix_lam"


def mixed(values: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-row targets (probabilities) of a mixed batch: lam * own + (1 - lam) * partner's; unmixed as is."""
    if MIX_PERM not in batch:
        return values
    lam = batch[MIX_LAM]
    return lam * values + (1 - lam) * values[batch[MIX_PERM]]


def mixed_ce(logits: torch.Tensor, labels: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """CE to the labels, mixed like the images: lam CE(y) + (1 - lam) CE(y[perm]) (= CE to the mixed one-hots)."""
    if MIX_PERM not in batch:
        return ce_loss(logits, labels)
    lam = batch[MIX_LAM]
    return lam * ce_loss(logits, labels) + (1 - lam) * ce_loss(logits, labels[batch[MIX_PERM]])


# Cache columns each term reads beyond the label; the logits columns come from LossInputs.
TERM_INPUTS: dict[str, tuple[str, ...]] = {"kd": (LOGITS,), "ce": (LABEL,), "deit_hard": (LOGITS,)}


class DistillationLoss:
    """sum_i w_i * term_i. With terms {kd: alpha, ce: 1 - alpha}: alpha*T^2*KL + (1-alpha)*CE.

    The student's output is its logits, or a dict with "logits", "features" (student module ->
    activation) and "hints" (tap column -> adapter output) when feature terms are in use. A student
    with DeiT's distillation token adds "distill_logits": `kd` and `deit_hard` read that head, `ce`
    the class head.
    """

    def __init__(self, terms: Mapping[str, float], temperature: float, inputs: LossInputs | None = None) -> None:
        unknown = set(terms) - {"kd", "ce", "deit_hard", "hint", "attention", "rkd"}
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}")
        # Zero-weight terms are skipped, so a hard-label run never touches the teacher columns.
        self.terms = {name: float(w) for name, w in terms.items() if w > 0}
        self.temperature = float(temperature)
        self.inputs = inputs or LossInputs()

    def _targets(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cols = list(self.inputs.logits)
        return mixed(mixture_targets([batch[c] for c in cols], [self.inputs.logits[c] for c in cols], self.temperature), batch)

    def _kd(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.inputs.multi_teacher == "per_teacher":
            total = sum(self.inputs.logits.values())
            t = self.temperature
            if MIX_PERM in batch:
                return sum(w / total * soft_target_kd(logits, mixed(F.softmax(batch[c].float() / t, dim=-1), batch), t)  # type: ignore[return-value]
                           for c, w in self.inputs.logits.items())
            return sum(w / total * kd_loss(logits, batch[c], t) for c, w in self.inputs.logits.items())  # type: ignore[return-value]
        return soft_target_kd(logits, self._targets(batch), self.temperature)

    def _deit_hard(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """CE to the teacher's argmax; in a mixed batch, to each image's own and its partner's, mixed."""
        cols = list(self.inputs.logits)
        own = mixture_targets([batch[c] for c in cols], [self.inputs.logits[c] for c in cols], self.temperature)
        return mixed_ce(logits, own.argmax(dim=-1), batch)

    def __call__(self, output: torch.Tensor | Mapping[str, object], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = output if isinstance(output, Mapping) else {"logits": output}
        logits: torch.Tensor = out["logits"]  # type: ignore[assignment]
        features: Mapping[str, torch.Tensor] = out.get("features", {})  # type: ignore[assignment]
        hints: Mapping[str, torch.Tensor] = out.get("hints", {})  # type: ignore[assignment]
        distill: torch.Tensor = out.get(DISTILL_LOGITS, logits)  # type: ignore[assignment]
        parts: dict[str, torch.Tensor] = {}
        for name in self.terms:
            if name == "kd":
                parts[name] = self._kd(distill, batch)
            elif name == "ce":
                parts[name] = mixed_ce(logits, batch[LABEL], batch)
            elif name == "deit_hard":
                parts[name] = self._deit_hard(distill, batch)
            elif name == "hint":
                parts[name] = sum(hint_loss(hints[c], batch[c]) for _, c in self.inputs.hint) / len(self.inputs.hint)  # type: ignore[assignment]
            elif name == "attention":
                parts[name] = sum(attention_loss(features[m], batch[c], size, p)
                                  for m, c, size, p in self.inputs.attention) / len(self.inputs.attention)  # type: ignore[assignment]
            elif name == "rkd":
                m, c, wd, wa = self.inputs.rkd  # type: ignore[misc]
                parts[name] = rkd_loss(embedding(features[m]), batch[c], wd, wa)
        total = sum(w * parts[name] for name, w in self.terms.items())
        return {"loss": total, **parts}  # type: ignore[dict-item]
