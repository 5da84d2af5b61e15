"""The learning-rate schedule and the step budget, against their formulas (no training)."""

import math

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.student.train.schedule import lr_factor, scheduler, total_steps


def test_warmup_is_linear_and_the_first_step_already_moves():
    assert [lr_factor(s, 100, warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_runs_from_the_base_lr_after_warmup_to_the_floor_at_the_last_step(schedule):
    total, warmup, floor = 50, 10, 0.1
    f = [lr_factor(s, total, warmup, schedule, floor) for s in range(total)]
    assert f[warmup] == pytest.approx(1.0) and f[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # never rises after warmup
    mid = warmup + (total - warmup - 1) / 2
    expected = 0.5 * (1 + math.cos(math.pi * 0.5)) if schedule == "cosine" else 0.5
    assert lr_factor(int(mid), total, warmup, schedule, 0.0) == pytest.approx(expected, abs=0.05)


def test_constant_schedule_is_flat():
    assert {lr_factor(s, 20, 0, "constant") for s in range(20)} == {1.0}


def _cfg(**kw):
    return TrainConfig.model_validate({"cache": "c", "student": {"factory": "m:f"}, **kw})


def test_step_budget_is_max_steps_or_tokens_capped_by_epochs():
    assert total_steps(_cfg(epochs=3), 22) == 66
    assert total_steps(_cfg(epochs=3, max_steps=50), 22) == 50
    assert total_steps(_cfg(epochs=3, max_steps=500), 22) == 66  # epochs stay an upper bound
    # 10,000 tokens at 64 rows x 31 target tokens per step: ceil(10000 / 1984) = 6 steps.
    assert total_steps(_cfg(epochs=3, max_tokens=10_000), 22, tokens_per_step=64 * 31) == 6


def test_max_steps_and_max_tokens_exclude_each_other():
    with pytest.raises(ValueError, match="at most one"):
        _cfg(max_steps=10, max_tokens=100)


def test_scheduler_state_restores_the_same_lr():
    cfg = _cfg(optimizer={"lr": 0.1, "schedule": "cosine", "warmup_steps": 3})
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=0.1)
    sched = scheduler(opt, cfg, 20)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD(params, lr=0.1)
    sched2 = scheduler(opt2, cfg, 20)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr() == [pytest.approx(0.1 * lr_factor(7, 20, 3, "cosine"))]
