"""The fused token losses (the student's head applied inside the loss, a chunk of positions at a
time) against the unfused formulas on the full logits: the same value and the same gradients in
hidden, head weight and bias, for every cache mode, in float64; and the models' `hidden=True`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.models import hf, lm
from pipeline.models.hidden import Hidden, returns_hidden
from pipeline.student.losses import fused
from pipeline.student.tasks.tokens import TokenTask
from tests.conftest import make_manifest

V, L, B, H, K = 50, 6, 3, 8, 4
SIGNALS = {
    "topk": ({"k": K, "temperatures": [1.0, 2.0], "values": "float16", "step": 0.0625, "bytes_per_token": 1.0},
             ["topk_indices", "topk_values", "topk_lse"]),
    "topk_uint8": ({"k": K, "temperatures": [1.0, 2.0], "values": "uint8", "step": 0.0625, "bytes_per_token": 1.0},
                   ["topk_indices", "topk_values", "topk_lse"]),
    "sampled": ({"k": K, "temperatures": [2.0], "seed": 0, "bytes_per_token": 1.0}, ["sampled_indices", "sampled_weights"]),
    "priority": ({"k": K, "temperatures": [2.0], "seed": 0, "bytes_per_token": 1.0, "estimator": "priority"},
                 ["sampled_indices", "sampled_weights"]),
    "full": ({"dtype": "float16"}, ["teacher_logits"]),
}


def _task(signal: str, terms: dict[str, float], topk_tail: str = "bucket") -> TokenTask:
    fields, columns = SIGNALS[signal]
    mode = signal.split("_")[0] if signal != "priority" else "sampled"
    manifest = make_manifest([{"mode": mode, "teacher": "teacher", "columns": columns, "shape": [L, V], **fields}],
                             task="tokens", num_classes=V, input_shape=(L,))
    cfg = TrainConfig.model_validate({"cache": "c", "student": {"factory": "pipeline.models.lm:lm_tiny"},
                                      "loss": {"temperature": 2.0, "terms": terms, "topk_tail": topk_tail}})
    return TokenTask(cfg, manifest)


def _batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch whose padded positions hold garbage (NaN values, out-of-range ids) the losses must ignore."""
    ids = torch.randint(0, V, (B, L + 1), generator=g)
    indices = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * L)]).reshape(B, L, K)
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    top = logits.topk(K, dim=-1)
    lse = torch.stack([torch.logsumexp(logits / t, -1) for t in (1.0, 2.0)], -1)
    batch = {"input_ids": ids, "length": torch.tensor([L + 1, 4, 2]),
             "topk_indices": top.indices, "topk_values": top.values, "topk_lse": lse,
             "sampled_indices": indices, "sampled_weights": torch.rand(B, L, K, generator=g, dtype=torch.float64),
             "teacher_logits": logits}
    batch["topk_values"] = batch["topk_values"].clone()
    batch["topk_values"][2, 3:] = float("nan")  # past row 2's length: padding
    batch["sampled_indices"][1, 4:] = V + 7
    return batch


def _uint8(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Top-k values as the cache's uint8 offsets from the max logit (255: clipped), lse relative."""
    values = torch.nan_to_num(batch["topk_values"])
    offsets = ((values[..., :1] - values) / 0.0625).round().clamp(0, 255)
    offsets[..., -1] = 255
    return {**batch, "topk_values": offsets, "topk_lse": batch["topk_lse"] - values[..., :1] / torch.tensor([1.0, 2.0])}


def _grads(task: TokenTask, hidden, weight, bias, batch, fuse: bool):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    output = Hidden(*leaves) if fuse else F.linear(leaves[0], leaves[1], leaves[2])
    parts = task.losses(output, batch)
    parts["loss"].backward()
    return {k: v.detach() for k, v in parts.items()}, [t.grad for t in leaves]


@pytest.mark.parametrize("signal,tail", [("topk", "bucket"), ("topk", "uniform"), ("topk_uint8", "bucket"),
                                         ("sampled", "bucket"), ("priority", "bucket"), ("full", "bucket")])
def test_fused_losses_equal_the_unfused_ones_and_their_gradients(signal, tail, monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 2 * V)  # two positions a chunk: many chunks, one ragged
    g = torch.Generator().manual_seed(0)
    task = _task(signal, {"kd": 0.7, "ce": 0.3}, tail)
    batch = _batch(g)
    batch = _uint8(batch) if signal == "topk_uint8" else batch
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    plain, plain_grads = _grads(task, hidden, weight, bias, batch, fuse=False)
    fused_parts, fused_grads = _grads(task, hidden, weight, bias, batch, fuse=True)
    assert set(fused_parts) == set(plain) == {"loss", "kd", "ce"}
    for name in plain:
        torch.testing.assert_close(fused_parts[name], plain[name], rtol=1e-10, atol=1e-10)
    for got, want in zip(fused_grads, plain_grads):
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert fused_grads[0][2, 2:].abs().max() == 0  # padded positions get no gradient


def test_a_batch_with_no_counted_position_gives_zero_loss_and_gradients():
    task = _task("sampled", {"kd": 1.0})
    batch = {**_batch(torch.Generator().manual_seed(1)), "length": torch.ones(B, dtype=torch.long)}
    hidden, weight = torch.randn(B, L, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    parts = task.losses(Hidden(hidden, weight), batch)
    parts["loss"].backward()
    assert parts["loss"].item() == 0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_the_built_in_lm_and_hf_models_hand_over_their_head(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    ids = torch.randint(0, V, (2, L))
    model = lm.lm_tiny(num_classes=V, input_shape=(L,)).eval()
    out = model(ids, hidden=True)
    assert returns_hidden(model) and out.hidden.shape == (2, L, 64)
    torch.testing.assert_close(F.linear(out.hidden, out.weight, out.bias), model(ids))
    GPT2LMHeadModel(GPT2Config(vocab_size=V + 6, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    student = hf.hf_causal_lm(str(tmp_path), num_classes=V).eval()  # padded logit rows dropped
    out = student(ids, hidden=True)
    assert returns_hidden(student) and out.weight.shape == (V, 16)
    torch.testing.assert_close(F.linear(out.hidden, out.weight, out.bias), student(ids))
    assert not returns_hidden(torch.nn.Linear(3, 3))


def test_training_and_evaluation_use_the_head_in_chunks_with_the_same_results(monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 3 * V)
    task = _task("topk", {"kd": 0.5, "ce": 0.5})
    torch.manual_seed(0)
    model = task.build_model()
    assert task.fused and task.eval_batch_size == (1 << 15) // L
    batch = _batch(torch.Generator().manual_seed(2))
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    assert isinstance(task.forward(model, batch["input_ids"][:, :-1]), Hidden)
    fused_metrics = task.evaluate(model, [batch])
    task.fused = False
    plain_metrics = task.evaluate(model, [batch])
    assert fused_metrics.keys() == plain_metrics.keys()
    for k, v in plain_metrics.items():
        assert math.isclose(fused_metrics[k], v, rel_tol=1e-5), k
    unfused = TrainConfig.model_validate({**task.cfg.model_dump(), "loss": {**task.cfg.loss.model_dump(), "fused_head": False}})
    plain_task = TokenTask(unfused, task.manifest)
    plain_task.build_model()
    assert not plain_task.fused and plain_task.eval_batch_size == min((1 << 15) // L, (1 << 27) // (L * V))
