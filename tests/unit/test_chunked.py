"""Stage 1 at a large vocabulary: logits made and encoded a chunk of positions at a time equal the
whole batch's, and a model with a linear head never makes the (B, L, V) logits."""

import numpy as np
import pytest
import torch

from pipeline.cache.schema import INPUT_IDS, LENGTH, SAMPLE_ID, SAMPLED_INDICES, SAMPLED_WEIGHTS, TOPK_INDICES, TOPK_LSE, TOPK_VALUES
from pipeline.models.lm import causal_lm
from pipeline.teacher import chunked
from pipeline.teacher.chunked import chunk_positions, encode_in_chunks, logit_chunks
from pipeline.teacher.encode import encode_topk
from pipeline.teacher.grouping import grouped_forward
from pipeline.teacher.predictor import TeacherPredictor

V, L = 50, 12


@pytest.fixture
def lm():
    torch.manual_seed(0)
    return causal_lm(num_classes=V, input_shape=(L,), d_model=16, n_layers=1, n_heads=2).eval()


def _batch(rows=5, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, V, (rows, L))), np.array([L + 1, 4, 9, L + 1, 2])[:rows]


def test_chunk_positions_follow_the_vocabulary():
    assert chunk_positions(2**17) == 128 and chunk_positions(2**10) == 2**14 and chunk_positions(2**30) == 1


@pytest.mark.parametrize("wrapped", [False, True], ids=["linear head", "any module"])
def test_chunks_are_the_whole_batchs_logits_with_zeros_past_each_row(lm, wrapped):
    ids, lengths = _batch()
    with torch.no_grad():
        whole = grouped_forward(lm, ids, lengths).reshape(-1, V)
        model = torch.nn.Sequential(lm) if wrapped else lm  # Sequential's forward takes no `hidden`
        chunks = list(logit_chunks(model, ids, lengths, chunk_logits=7 * V))
    assert [c.shape[0] for c in chunks] == [7] * 8 + [4]  # 60 positions, 7 a chunk
    torch.testing.assert_close(torch.cat(chunks), whole, atol=1e-6, rtol=1e-5)
    assert torch.all(whole.reshape(5, L, V)[1, 3:] == 0)  # row 1 has 4 tokens: targets at positions 0..2


def test_a_linear_head_model_never_makes_the_batchs_logits(lm):
    calls = []
    forward = lm.forward

    def spy(x, hidden=False):
        calls.append(hidden)
        return forward(x, hidden=hidden)

    lm.forward = spy
    ids, lengths = _batch()
    with torch.no_grad():
        chunks = list(logit_chunks(lm, ids, lengths, chunk_logits=3 * V))
    assert calls and all(calls) and max(c.shape[0] for c in chunks) == 3


def test_topk_in_chunks_equals_the_whole_batch(lm):
    ids, lengths = _batch()
    with torch.no_grad():
        whole = encode_topk(grouped_forward(lm, ids, lengths), 5, [1.0, 2.0])
        parts = encode_in_chunks(logit_chunks(lm, ids, lengths, chunk_logits=7 * V),
                                 lambda z: encode_topk(z, 5, [1.0, 2.0]), 5, L)
    np.testing.assert_array_equal(parts[TOPK_INDICES], whole[TOPK_INDICES])
    np.testing.assert_array_equal(parts[TOPK_VALUES], whole[TOPK_VALUES])
    np.testing.assert_allclose(parts[TOPK_LSE], whole[TOPK_LSE], rtol=1e-6)
    assert parts[TOPK_INDICES].shape == (5, L, 5)


def _predictor(tmp_path, lm, mode):
    weights = tmp_path / "lm.pt"
    torch.save(lm.state_dict(), weights)
    spec = {"factory": "pipeline.models.lm:causal_lm", "weights": str(weights),
            "kwargs": {"d_model": 16, "n_layers": 1, "n_heads": 2}}
    return TeacherPredictor({"teacher": spec}, (L,), V, logits_spec=mode)


def test_the_teacher_actor_encodes_sampled_outputs_a_chunk_at_a_time(tmp_path, lm, monkeypatch):
    ids, lengths = _batch()
    window = np.concatenate([ids.numpy(), np.zeros((5, 1), np.int64)], axis=1)  # (B, L + 1): the teacher reads [:, :-1]
    batch = {SAMPLE_ID: np.array([f"r{i}" for i in range(5)]), INPUT_IDS: window, LENGTH: lengths}
    predictor = _predictor(tmp_path, lm, {"mode": "sampled", "k": 6})
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", 7 * V)
    seen = []
    real = chunked.encode_in_chunks

    def counting(chunks, encode, batch, width):
        return real((seen.append(c.shape[0]) or c for c in chunks), encode, batch, width)

    monkeypatch.setattr("pipeline.teacher.predictor.encode_in_chunks", counting)
    first, again = predictor(dict(batch)), predictor(dict(batch))
    assert max(seen) == 7 and sum(seen) == 2 * 5 * L
    np.testing.assert_array_equal(first[SAMPLED_INDICES], again[SAMPLED_INDICES])  # the same draws on a rerun
    assert first[SAMPLED_INDICES].shape == (5, L, 6) and first[SAMPLED_INDICES].max() < V
    np.testing.assert_allclose(first[SAMPLED_WEIGHTS].astype(np.float32).sum(-1), 1.0, atol=2e-3)
