"""Causal language models (pipeline/models/lm.py): the built-in decoder and the HF adapter. No Ray, no network."""

from __future__ import annotations

import uuid

import pytest
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.config import ModelSpec
from pipeline.errors import DistillError
from pipeline.models import hf, lm, taps
from pipeline.models.factory import build_model, output_width

V, L = 300, 16


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters are counted once


def test_output_shape_and_any_id_dtype():
    torch.manual_seed(0)
    model = lm.causal_lm(num_classes=V, input_shape=(L,), d_model=32, n_layers=2, n_heads=4).eval()
    ids = torch.randint(0, V, (3, L))
    out = model(ids)
    assert out.shape == (3, L, V) and out.dtype == torch.float32
    assert torch.equal(model(ids.int()), out)
    assert torch.equal(model(ids.float()), out)  # the teacher actor casts its input to float32
    assert model(ids[:, :5]).shape == (3, 5, V)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, L + 1, dtype=torch.long))


def test_causal_changing_a_token_changes_nothing_before_it():
    torch.manual_seed(0)
    model = lm.causal_lm(num_classes=V, input_shape=(L,), d_model=32, n_layers=2, n_heads=4).eval()
    ids = torch.randint(0, V, (2, L))
    for t in (0, 5, L - 1):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        a, b = model(ids), model(changed)
        assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
        assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-4)


def test_trains_on_a_repeated_sequence():
    torch.manual_seed(0)
    model = lm.causal_lm(num_classes=50, input_shape=(L,), d_model=32, n_layers=1, n_heads=2)
    seq = torch.arange(L + 1).remainder(7).repeat(8, 1)  # a period-7 pattern, fully predictable from context
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.0  # about ln 50 at initialisation
    assert losses[-1] < 0.1 * losses[0]


def _expected_params(vocab: int, length: int, d: int, layers: int) -> int:
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    return vocab * d + length * d + layers * block + 2 * d  # tied head adds nothing


@pytest.mark.parametrize(("preset", "d", "layers", "expected"), [
    (lm.lm_tiny, 64, 1, 578_496), (lm.lm_small, 128, 2, 1_453_568), (lm.lm_teacher, 256, 4, 5_273_088),
])
def test_preset_parameter_counts(preset, d, layers, expected):
    model = preset(num_classes=8192, input_shape=(64,))
    assert _count(model) == expected == _expected_params(8192, 64, d, layers)
    assert model.head.weight is model.tok_emb.weight
    assert model(torch.zeros(2, 64, dtype=torch.long)).shape == (2, 64, 8192)


def test_untied_head_and_named_modules():
    tied = lm.causal_lm(num_classes=V, input_shape=(L,), d_model=32, n_layers=2)
    untied = lm.causal_lm(num_classes=V, input_shape=(L,), d_model=32, n_layers=2, tie_weights=False)
    assert _count(untied) - _count(tied) == V * 32
    names = taps.module_names(tied)
    assert {"tok_emb", "pos_emb", "blocks.0", "blocks.1.attn", "blocks.1.mlp", "ln_f", "head"} <= set(names)
    with taps.capture(tied, ["blocks.0", "blocks.1.attn"]) as found:
        tied(torch.zeros(2, L, dtype=torch.long))
    assert found["blocks.0"].shape == (2, L, 32) and found["blocks.1.attn"].shape == (2, L, 32)


def test_build_model_fills_vocab_and_length():
    model = build_model(ModelSpec(factory="pipeline.models.lm:lm_tiny"), num_classes=V, input_shape=(L,))
    assert model.pos_emb.num_embeddings == L
    assert output_width(model, (L,)) == V


# --- Hugging Face ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny randomly initialised GPT-2 written with save_pretrained: the real loading path, no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1)
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(path)
    return str(path), model


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))


def test_hf_causal_lm_returns_the_models_logits(hf_dir):
    path, reference = hf_dir
    wrapped = hf.hf_causal_lm(path)
    ids = _ids()
    out = wrapped(ids)
    assert out.shape == (2, 8, V)
    assert torch.equal(out, reference(ids).logits)
    assert torch.equal(wrapped(ids.int()), out)
    assert hf.hf_causal_lm(path, dtype="bfloat16")(ids).dtype == torch.bfloat16


def test_hf_vocab_mismatch_names_both_sizes(hf_dir):
    with pytest.raises(DistillError, match=r"predicts 300 tokens but the pipeline expects 8192"):
        hf.hf_causal_lm(hf_dir[0], num_classes=8192)
    with pytest.raises(DistillError, match="vocabulary mismatch"):
        build_model(ModelSpec(factory="pipeline.models.hf:hf_causal_lm", kwargs={"path": hf_dir[0]}), num_classes=301)


def test_hf_other_errors(hf_dir, tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        hf.hf_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(DistillError, match="exceed the 32 positions"):
        hf.hf_causal_lm(hf_dir[0], input_shape=(64,))
    with pytest.raises(DistillError, match="unknown dtype"):
        hf.hf_causal_lm(hf_dir[0], dtype="float8")


def test_hf_through_build_model(hf_dir):
    path, reference = hf_dir
    spec = ModelSpec(factory="pipeline.models.hf:hf_causal_lm", kwargs={"path": path})
    model = build_model(spec, num_classes=V, input_shape=(8,))
    assert torch.equal(model(_ids()), reference(_ids()).logits)
    assert output_width(model, (8,)) == V
    assert "model.transformer.h.0" in taps.module_names(model)


def test_hf_from_an_fsspec_copy(hf_dir, tmp_path):
    import os

    path, reference = hf_dir
    uri = f"memory://hf-{uuid.uuid4().hex[:8]}/gpt2-tiny"
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            storage.write_bytes_atomic(f"{uri}/{name}", f.read())
    model = hf.hf_causal_lm(uri, num_classes=V)
    assert torch.equal(model(_ids()), reference(_ids()).logits)
    assert hf.hf_weights_digest(uri) == hf.hf_weights_digest(path)
    storage.write_bytes_atomic(f"{uri}/extra.txt", b"changed")
    assert hf.hf_weights_digest(uri) != hf.hf_weights_digest(path)
    with pytest.raises(DistillError, match="empty or does not exist"):
        hf.hf_causal_lm(f"memory://hf-{uuid.uuid4().hex[:8]}/nothing")
