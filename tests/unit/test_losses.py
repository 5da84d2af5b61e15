import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.schema import LABEL, LOGITS
from pipeline.student.losses.classification import DistillationLoss, ce_loss, kd_loss

S = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
T_LOGITS = torch.tensor([[1.5, 0.0, -0.5], [-1.0, 2.0, 1.0]])


def _kl_by_hand(s, t, temp):
    """KL(p_t || p_s) at temperature temp, written out element by element."""
    total = 0.0
    for row_s, row_t in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(v / temp) for v in row_s)
        zt = sum(math.exp(v / temp) for v in row_t)
        for vs, vt in zip(row_s, row_t):
            pt, ps = math.exp(vt / temp) / zt, math.exp(vs / temp) / zs
            total += pt * math.log(pt / ps)
    return total / len(s)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_loss_equals_formula_with_t_squared(temp):
    expected = temp**2 * _kl_by_hand(S, T_LOGITS, temp)
    assert kd_loss(S, T_LOGITS, temp).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_zero_when_student_matches_teacher():
    assert kd_loss(T_LOGITS, T_LOGITS, 3.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_gradient_is_t_times_prob_difference_over_batch(temp):
    s = S.clone().requires_grad_(True)
    kd_loss(s, T_LOGITS, temp).backward()
    expected = temp * (F.softmax(S / temp, -1) - F.softmax(T_LOGITS / temp, -1)) / len(S)
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


def test_kd_accepts_float16_teacher_logits():
    assert kd_loss(S, T_LOGITS.half(), 2.0).item() == pytest.approx(kd_loss(S, T_LOGITS.half().float(), 2.0).item())


def test_distillation_loss_is_alpha_mix():
    labels = torch.tensor([0, 2])
    batch = {LOGITS: T_LOGITS, LABEL: labels}
    alpha, temp = 0.7, 4.0
    out = DistillationLoss({"kd": alpha, "ce": 1 - alpha}, temp)(S, batch)
    expected = alpha * temp**2 * _kl_by_hand(S, T_LOGITS, temp) + (1 - alpha) * F.cross_entropy(S, labels).item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert set(out) == {"loss", "kd", "ce"}


def test_hard_label_loss_never_reads_teacher_columns():
    labels = torch.tensor([0, 2])
    out = DistillationLoss({"kd": 0.0, "ce": 1.0}, 4.0)(S, {LABEL: labels})
    assert set(out) == {"loss", "ce"}
    assert out["loss"].item() == pytest.approx(ce_loss(S, labels).item())


def test_unknown_term_rejected():
    with pytest.raises(ValueError, match="unknown"):
        DistillationLoss({"nope": 1.0}, 1.0)
