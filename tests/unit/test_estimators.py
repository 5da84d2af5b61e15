"""Sparse estimates of a teacher distribution: unbiased by simulation, k-sparse, and their variance order."""

import pytest
import torch

from pipeline.teacher.estimators import dense, estimate, head_tail, priority

V = 40


def _p(rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, V, generator=g, dtype=torch.float64) * 2.5, -1)


@pytest.mark.parametrize("name,head", [("multinomial", 0), ("priority", 0), ("head_tail", 3)])
def test_each_estimator_is_unbiased_and_k_sparse(name, head):
    p, k, n = _p(), 8, 20_000
    g = torch.Generator().manual_seed(1)
    ids, w = estimate(p.repeat(n, 1), name, k, head, g)
    assert ids.shape == w.shape == (3 * n, k) and (w >= 0).all()
    est = dense(ids, w, V).view(n, 3, V)
    mean, se = est.mean(0), est.std(0) / n ** 0.5
    # Tokens too rare to be drawn in n rows have no spread to measure: an absolute 2e-5 covers them.
    assert ((mean - p).abs() <= 5 * se + 2e-5).all(), ((mean - p).abs() - 5 * se).max()


def test_priority_keeps_tokens_above_tau_exactly_and_all_of_a_short_row():
    p = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05, 0.0]], dtype=torch.float64)
    ids, w = priority(p, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(dense(ids, w, 6), p)  # 5 nonzero tokens, k = 5: exact
    ids, w = priority(p.repeat(200, 1), 2, torch.Generator().manual_seed(0))
    big = w.max(-1).values
    assert torch.all(big >= 0.3)  # the kept weights are max(p_i, tau) >= p_i


def test_head_tail_is_exact_on_the_head_and_sums_to_one():
    p = _p(rows=5)
    ids, w = head_tail(p, 10, 4, torch.Generator().manual_seed(0))
    top = torch.topk(p, 4, -1)
    assert torch.equal(ids[:, :4], top.indices) and torch.equal(w[:, :4], top.values)
    torch.testing.assert_close(w.sum(-1), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="head must be"):
        head_tail(p, 4, 5)


def test_lower_variance_schemes_beat_plain_sampling_at_equal_k():
    p, k, n = _p(rows=4, seed=3), 8, 4000
    err = {}
    for name, head in (("multinomial", 0), ("priority", 0), ("head_tail", 4)):
        ids, w = estimate(p.repeat(n, 1), name, k, head, torch.Generator().manual_seed(2))
        err[name] = ((dense(ids, w, V).view(n, 4, V) - p) ** 2).sum(-1).mean().item()
    assert err["priority"] < err["multinomial"] and err["head_tail"] < err["multinomial"], err


@pytest.mark.parametrize("name,head,renormalise", [("priority", 0, False), ("head_tail", 3, True), ("multinomial", 0, True)])
def test_the_sampled_loss_gradient_is_the_full_kd_gradient_in_expectation(name, head, renormalise):
    from pipeline.student.losses.tokens import full_kd_loss, sampled_kd_loss

    n, k = 4000, 6
    teacher = torch.randn(1, 1, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    student = torch.randn(1, 1, V, generator=torch.Generator().manual_seed(6), dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    full_kd_loss(student, teacher, mask, 1.0).backward()
    exact, student.grad = student.grad.clone(), None
    ids, w = estimate(torch.softmax(teacher[0], -1).repeat(n, 1), name, k, head, torch.Generator().manual_seed(7))
    loss = sampled_kd_loss(student.expand(n, 1, V), ids[:, None, :], w[:, None, :], torch.ones(n, 1, dtype=torch.bool), 1.0,
                           renormalise=renormalise)
    loss.backward()  # the masked mean over the n draws: the average of their gradients
    assert (student.grad - exact).abs().max() < 0.01, (student.grad - exact).abs().max()
    assert (exact.abs().max() > 0.05)  # a gradient worth comparing
