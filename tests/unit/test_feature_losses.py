"""Feature, relational, hard and multi-teacher terms against their papers' formulas, written out by hand."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.schema import LABEL
from pipeline.student.losses.classification import (
    DistillationLoss,
    LossInputs,
    attention_loss,
    deit_hard_loss,
    hint_loss,
    kd_loss,
    mixture_targets,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    soft_target_kd,
)

torch.manual_seed(0)
S_EMB = torch.randn(5, 3)
T_EMB = torch.randn(5, 4)


def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_distance_equals_paper_formula():
    def psi(e):
        pairs = [(i, j) for i in range(len(e)) for j in range(len(e)) if i != j]
        d = {(i, j): math.dist(e[i].tolist(), e[j].tolist()) for i, j in pairs}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}
    ps, pt = psi(S_EMB), psi(T_EMB)
    expected = sum(_huber(ps[k], pt[k]) for k in ps) / len(ps)
    assert rkd_distance_loss(S_EMB, T_EMB).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_equals_paper_formula():
    def cos_angles(e):
        out = {}
        for i, j, k in itertools.product(range(len(e)), repeat=3):
            a, b = e[i] - e[j], e[k] - e[j]
            na, nb = a.norm().item(), b.norm().item()
            out[(i, j, k)] = 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)
        return out
    cs, ct = cos_angles(S_EMB), cos_angles(T_EMB)
    expected = sum(_huber(cs[k], ct[k]) for k in cs) / len(cs)
    assert rkd_angle_loss(S_EMB, T_EMB).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_is_weighted_sum_and_zero_for_a_scaled_copy():
    combined = rkd_loss(S_EMB, T_EMB, 1.0, 2.0).item()
    assert combined == pytest.approx(rkd_distance_loss(S_EMB, T_EMB).item() + 2 * rkd_angle_loss(S_EMB, T_EMB).item(), rel=1e-6)
    # Relational: distances normalised by their mean and angles are scale invariant.
    assert rkd_loss(3.0 * T_EMB, T_EMB).item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_gradient_is_finite_for_identical_rows():
    e = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    rkd_loss(e, torch.randn(3, 4)).backward()
    assert torch.isfinite(e.grad).all()


def test_attention_loss_equals_zagoruyko_formula():
    fs = torch.randn(2, 3, 4, 4)
    ft = torch.randn(2, 5, 2, 2)

    def q(f, size):
        a = f.abs().pow(2).mean(1, keepdim=True)
        a = F.avg_pool2d(a, f.shape[-1] // size) if f.shape[-1] != size else a
        v = a.flatten(1)
        return v / v.norm(dim=1, keepdim=True)
    expected = (q(fs, 2) - q(ft, 2)).pow(2).mean().item()
    assert attention_loss(fs, q(ft, 2), (2, 2)).item() == pytest.approx(expected, rel=1e-5)
    assert attention_loss(ft, q(ft, 2), (2, 2)).item() == pytest.approx(0.0, abs=1e-7)


def test_hint_loss_is_mse_and_deit_uses_teacher_argmax():
    a, b = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    assert hint_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    s = torch.randn(4, 5)
    t = torch.randn(4, 5)
    expected = -sum(F.log_softmax(s, -1)[i, t[i].argmax()].item() for i in range(4)) / 4
    assert deit_hard_loss(s, F.softmax(t, -1)).item() == pytest.approx(expected, rel=1e-6)


def test_mixture_targets_average_softened_distributions():
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    p = mixture_targets([z1, z2], [1.0, 3.0], 2.0)
    expected = 0.25 * F.softmax(z1 / 2, -1) + 0.75 * F.softmax(z2 / 2, -1)
    assert torch.allclose(p, expected, atol=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(3))
    # One teacher: the mixture KD is plain Hinton KD.
    s = torch.randn(3, 4)
    assert soft_target_kd(s, mixture_targets([z1], [1.0], 4.0), 4.0).item() == pytest.approx(kd_loss(s, z1, 4.0).item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["average", "per_teacher"])
def test_multi_teacher_modes(mode):
    s, z1, z2 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    batch = {"a_logits": z1, "b_logits": z2, LABEL: torch.tensor([0, 1, 2])}
    loss = DistillationLoss({"kd": 1.0}, 2.0, LossInputs(logits={"a_logits": 1.0, "b_logits": 1.0}, multi_teacher=mode))
    got = loss(s, batch)["kd"].item()
    if mode == "per_teacher":
        expected = 0.5 * kd_loss(s, z1, 2.0).item() + 0.5 * kd_loss(s, z2, 2.0).item()
    else:
        expected = soft_target_kd(s, 0.5 * F.softmax(z1 / 2, -1) + 0.5 * F.softmax(z2 / 2, -1), 2.0).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_combines_feature_terms_by_weight():
    logits = torch.randn(4, 3)
    feat = torch.randn(4, 2, 4, 4)
    emb = torch.randn(4, 6)
    t_map = F.normalize(torch.rand(4, 4), dim=1)
    batch = {"teacher_logits": torch.randn(4, 3), LABEL: torch.tensor([0, 1, 2, 0]), "tap_h": torch.randn(4, 5),
             "tap_a": t_map, "tap_e": torch.randn(4, 7)}
    inputs = LossInputs(hint=(("m", "tap_h"),), attention=(("f", "tap_a", (2, 2), 2.0),), rkd=("e", "tap_e", 1.0, 2.0))
    out = {"logits": logits, "features": {"f": feat, "e": emb}, "hints": {"tap_h": torch.randn(4, 5)}}
    weights = {"kd": 0.5, "ce": 0.5, "deit_hard": 0.2, "hint": 1.0, "attention": 100.0, "rkd": 0.3}
    parts = DistillationLoss(weights, 4.0, inputs)(out, batch)
    assert parts["hint"].item() == pytest.approx(hint_loss(out["hints"]["tap_h"], batch["tap_h"]).item())
    assert parts["attention"].item() == pytest.approx(attention_loss(feat, t_map, (2, 2)).item())
    assert parts["rkd"].item() == pytest.approx(rkd_loss(emb, batch["tap_e"]).item())
    assert parts["loss"].item() == pytest.approx(sum(w * parts[k].item() for k, w in weights.items()), rel=1e-5)
