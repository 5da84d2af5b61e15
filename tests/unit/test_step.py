"""One optimizer step: accumulation, clipping and mixed precision, on small tensors without Ray."""

import copy

import pytest
import torch

from pipeline.student.train.step import as_float, train_step
from pipeline.student.train.precision import Precision
from tests.conftest import in_memory_task
from pipeline.cache.schema import LABEL, LOGITS, X


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {X: torch.randn(n, 3, generator=g), LABEL: torch.randint(0, 4, (n,), generator=g),
            LOGITS: torch.randn(n, 4, generator=g)}


def _setup(seed=0):
    task = in_memory_task({"kd": 0.7, "ce": 0.3}, 2.0, num_classes=4, input_shape=(3,))
    torch.manual_seed(seed)
    model = task.build_model()
    return task, model


def _split(batch, parts):
    n = len(batch[X])
    edges = [i * n // parts for i in range(parts + 1)]
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("parts", [2, 3])
def test_accumulated_micro_batches_make_the_step_of_one_batch(parts):
    task, model = _setup()
    other = copy.deepcopy(model)
    batch = _batch(12)
    opt_a, opt_b = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(other.parameters(), lr=0.5)
    loss_a, rows_a, _ = train_step(model, [batch], task, opt_a)
    loss_b, rows_b, _ = train_step(other, _split(batch, parts), task, opt_b)
    assert rows_a == rows_b == 12
    assert loss_b["loss"] == pytest.approx(float(loss_a["loss"]), rel=1e-5)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # And the step did move the weights.
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), _setup()[1].parameters()))


def test_clipping_bounds_the_update_by_the_max_norm():
    task, model = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    batch = _batch(16)
    batch[LOGITS] = batch[LOGITS] * 50  # steep targets: a large gradient
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, [batch], task, opt, clip=0.1)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm() == pytest.approx(0.1, rel=1e-4)  # SGD, lr 1: the update is the clipped gradient


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_weights_and_losses_in_float32():
    task, model = _setup()
    seen = []
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fp32 = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts, _, _ = train_step(model, [_batch(8)], task, opt, Precision("bf16", torch.device("cpu")))
    assert seen == [torch.bfloat16]
    assert parts["loss"].dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    ref, _, _ = train_step(fp32, [_batch(8)], task, torch.optim.SGD(fp32.parameters(), lr=0.1))
    assert float(parts["loss"]) == pytest.approx(float(ref["loss"]), rel=0.02)  # bf16 keeps ~3 significant digits


def test_fp16_scaler_skips_a_step_with_inf_gradients_and_lowers_the_scale():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    prec = Precision("fp16", torch.device("cpu"))
    scale = prec.scaler.get_scale()
    prec.backward((p * torch.tensor([float("inf"), 1.0])).sum())
    prec.step(opt, [p], clip=None)
    assert torch.equal(p.detach(), torch.ones(2)) and prec.scaler.get_scale() == scale / 2
    opt.zero_grad()
    prec.backward(p.sum())
    prec.step(opt, [p], clip=None)
    torch.testing.assert_close(p.detach(), torch.zeros(2))  # unscaled: the true gradient of 1
    assert Precision("fp16", torch.device("cpu")).state_dict() != {} and Precision("bf16", torch.device("cpu")).state_dict() == {}


def test_as_float_casts_half_outputs_and_leaves_the_rest():
    out = as_float({"logits": torch.ones(2, dtype=torch.bfloat16), "ids": torch.ones(2, dtype=torch.long),
                    "hints": {"h": torch.ones(1, dtype=torch.float16)}})
    assert out["logits"].dtype == torch.float32 and out["ids"].dtype == torch.long and out["hints"]["h"].dtype == torch.float32


def test_scaled_unequal_worker_parts_make_the_step_of_the_global_batch():
    """Lanes give workers unequal parts of a step: each loss scaled by rows x workers / batch, the
    workers' mean gradient (DDP's all-reduce) is the global batch's."""
    task, model = _setup()
    batch = _batch(12)
    parts = [{k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}]
    whole = copy.deepcopy(model)
    train_step(whole, [batch], task, torch.optim.SGD(whole.parameters(), lr=0.5))
    workers = [copy.deepcopy(model) for _ in parts]
    for w, part in zip(workers, parts):
        train_step(w, [part], task, torch.optim.SGD(w.parameters(), lr=0.5), scale=len(part[X]) * 2 / 12)
    for p, a, b in zip(whole.parameters(), *(w.parameters() for w in workers)):
        assert torch.allclose(p, (a + b) / 2, atol=1e-6)  # SGD is linear in the gradient: the mean of the steps
    unscaled = [copy.deepcopy(model) for _ in parts]
    for w, part in zip(unscaled, parts):
        train_step(w, [part], task, torch.optim.SGD(w.parameters(), lr=0.5))
    assert not all(torch.allclose(p, (a + b) / 2, atol=1e-6) for p, a, b in zip(whole.parameters(), *(w.parameters() for w in unscaled)))
