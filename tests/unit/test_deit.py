"""DeiT's distillation token: the class head learns the labels, the distillation head the teacher, and
predictions average the two; a token nothing trains is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import DistillError
from pipeline.models.vit import DISTILL_LOGITS, vit_student
from pipeline.student.losses.classification import DistillationLoss, ce_loss, kd_loss
from pipeline.student.train.step import make_optimizer, train_step
from tests.conftest import in_memory_task

SMALL = {"patch": 4, "dim": 16, "depth": 1, "heads": 2}


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(n, 1, 8, 8, generator=g), "label": torch.randint(0, 10, (n,), generator=g),
            "teacher_logits": torch.randn(n, 10, generator=g)}


def test_train_mode_gives_both_heads_and_eval_their_mean():
    torch.manual_seed(0)
    model = vit_student((1, 8, 8), 10, **SMALL)
    x = torch.rand(3, 1, 8, 8)
    out = model.train()(x)
    assert set(out) == {"logits", DISTILL_LOGITS} and out["logits"].shape == (3, 10)
    assert not torch.allclose(out["logits"], out[DISTILL_LOGITS])  # two heads on two tokens
    mean = model.eval()(x)
    torch.testing.assert_close(mean, (out["logits"] + out[DISTILL_LOGITS]) / 2)
    plain = vit_student((1, 8, 8), 10, distillation_token=False, **SMALL)
    assert plain.train()(x).shape == (3, 10) and plain.tokens.shape[1] == 1
    with pytest.raises(ValueError, match="patch 3 does not tile"):
        vit_student((1, 8, 8), 10, patch=3)


def test_the_class_head_takes_ce_and_the_distillation_head_the_teacher_terms():
    b = _batch()
    cls, dist = torch.randn(8, 10), torch.randn(8, 10)
    out = DistillationLoss({"ce": 0.5, "kd": 0.5, "deit_hard": 0.25}, 3.0)({"logits": cls, DISTILL_LOGITS: dist}, b)
    torch.testing.assert_close(out["ce"], ce_loss(cls, b["label"]))
    torch.testing.assert_close(out["kd"], kd_loss(dist, b["teacher_logits"], 3.0))
    torch.testing.assert_close(out["deit_hard"], F.cross_entropy(dist, b["teacher_logits"].argmax(-1)))
    torch.testing.assert_close(out["loss"], 0.5 * out["ce"] + 0.5 * out["kd"] + 0.25 * out["deit_hard"])


def test_a_step_trains_each_head_from_its_own_terms_only():
    task = in_memory_task({"ce": 0.5, "deit_hard": 0.5}, student="pipeline.models.vit:vit_student")
    task.cfg.student.kwargs.update(SMALL)
    task.check()
    model = task.build_model()
    opt = make_optimizer(model.parameters(), "sgd", 0.0)  # lr 0: gradients kept, weights unchanged
    train_step(model, [_batch()], task, opt)
    net = task.student(model)
    assert net.head.weight.grad.abs().sum() > 0 and net.head_dist.weight.grad.abs().sum() > 0
    hard_only = in_memory_task({"ce": 1.0}, student="pipeline.models.vit:vit_student")
    hard_only.cfg.student.kwargs.update(SMALL)
    with pytest.raises(DistillError, match="distillation token.*no teacher term"):
        hard_only.check()
    hard_only.cfg.student.kwargs["distillation_token"] = False
    hard_only.check()


def test_a_few_deit_steps_lower_both_heads_losses():
    """A few steps of DeiT on one batch lower both heads' losses (the wiring trains, not only runs)."""
    task = in_memory_task({"ce": 0.5, "kd": 0.5}, temperature=2.0, student="pipeline.models.vit:vit_student")
    task.cfg.student.kwargs.update(SMALL)
    torch.manual_seed(0)
    model = task.build_model()
    opt = make_optimizer(model.parameters(), "adamw", 3e-3)
    batch = _batch(32)
    first = train_step(model, [batch], task, opt)[0]
    for _ in range(30):
        last = train_step(model, [batch], task, opt)[0]
    assert last["ce"] < 0.7 * first["ce"] and last["kd"] < 0.8 * first["kd"]
