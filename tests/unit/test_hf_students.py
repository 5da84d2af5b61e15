"""Hugging Face models at the edges of the pipeline: students built from a config, padded logit rows
dropped, students written with save_pretrained and their tokenizer, length-grouped teacher passes."""

import numpy as np
import pytest
import torch

from pipeline.config import ModelSpec
from pipeline.errors import DistillError
from pipeline.models import hf
from pipeline.models.factory import build_model
from pipeline.teacher.grouping import grouped_forward, length_groups

transformers = pytest.importorskip("transformers")


def _gpt2_dir(path, vocab, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    return model


def test_a_student_from_a_config_takes_the_caches_vocabulary_and_window():
    spec = ModelSpec(factory="pipeline.models.hf:hf_causal_lm_config",
                     kwargs={"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2})
    model = build_model(spec, input_shape=(12,), num_classes=300)
    assert model(torch.zeros(2, 12, dtype=torch.long)).shape == (2, 12, 300)
    assert model.model.config.n_positions == 12 and isinstance(model.model, transformers.GPT2LMHeadModel)
    with pytest.raises(DistillError, match="unknown HF model_type 'gpt9'"):
        hf.hf_causal_lm_config("gpt9", num_classes=10)


def test_padded_logit_rows_past_the_tokenizer_are_dropped_and_counted(tmp_path):
    # An embedding padded to 264 rows for a 258-token tokenizer: ids 258..263 never exist.
    reference = _gpt2_dir(tmp_path / "m", vocab=264)
    model = hf.hf_causal_lm(str(tmp_path / "m"), num_classes=258)
    ids = torch.randint(0, 258, (2, 8))
    out = model(ids)
    assert out.shape == (2, 8, 258) and model.dropped_logits == 6
    with torch.inference_mode():
        torch.testing.assert_close(out, reference(ids).logits[..., :258])
    assert hf.hf_logit_width(str(tmp_path / "m")) == 264
    with pytest.raises(DistillError, match="predicts 264 tokens but the pipeline expects 300"):
        hf.hf_causal_lm(str(tmp_path / "m"), num_classes=300)  # fewer logits than tokens: never padded up


def test_device_map_loads_through_accelerate(tmp_path):
    _gpt2_dir(tmp_path / "m", vocab=50)
    model = hf.hf_causal_lm(str(tmp_path / "m"), device_map="cpu")
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 50)


def test_length_groups_cut_padding_and_keep_the_batch_order():
    lengths = np.array([9, 3, 9, 5, 2, 9, 4, 7])
    groups = length_groups(lengths, max_groups=3)
    assert sorted(np.concatenate(groups).tolist()) == list(range(8))
    assert [lengths[g].max() for g in groups] == sorted(lengths[g].max() for g in groups)
    assert length_groups(np.full(5, 9))[0].tolist() == list(range(5))  # all full: one forward

    torch.manual_seed(0)
    from pipeline.models.lm import causal_lm

    model = causal_lm(num_classes=40, input_shape=(8,), d_model=16, n_layers=1, n_heads=2).eval()
    ids = torch.randint(0, 40, (8, 8))
    calls = []
    with torch.inference_mode():
        whole = model(ids)
        grouped = grouped_forward(lambda x: calls.append(tuple(x.shape)) or model(x), ids, lengths, max_groups=3)
    assert sum(a * b for a, b in calls) < 8 * 8  # fewer positions computed than the padded batch
    for row, n in enumerate(lengths):
        torch.testing.assert_close(grouped[row, :n - 1], whole[row, :n - 1], rtol=1e-5, atol=1e-5)
        assert torch.all(grouped[row, n - 1:] == 0)


def test_an_hf_student_with_another_tokenizer_is_refused(tmp_path):
    from pipeline.cache.manifest import TopkRecord
    from pipeline.config import TrainConfig
    from pipeline.data.tokenizer import byte_tokenizer, save_tokenizer, tokenizer_digest, train_bpe
    from pipeline.student.tasks.tokens import TokenTask
    from tests.conftest import make_manifest

    _gpt2_dir(tmp_path / "student", vocab=258)
    cache_tok = byte_tokenizer()
    other = train_bpe(["hello world " * 50], vocab_size=270)
    save_tokenizer(other, str(tmp_path / "student" / "tokenizer.json"))
    manifest = make_manifest([TopkRecord(teacher="teacher", columns=["topk_indices", "topk_values", "topk_lse"], shape=[16, 258],
                                         k=4, temperatures=[1.0], values="float16", step=0.0, bytes_per_token=1.0).model_dump()],
                             num_classes=258, input_shape=(16,), task="tokens")
    manifest.dataset.tokenizer = {"path": "tokenizer.json", "digest": tokenizer_digest(cache_tok), "vocab_size": 258, "kind": "byte"}
    manifest = type(manifest).model_validate(manifest.model_dump())
    cfg = TrainConfig.model_validate({"cache": "c", "loss": {"temperature": 1.0, "terms": {"kd": 1.0}},
                                      "student": {"factory": "pipeline.models.hf:hf_causal_lm", "kwargs": {"path": str(tmp_path / "student")}}})
    with pytest.raises(DistillError, match="student's tokenizer .* differs from the one cache"):
        TokenTask(cfg, manifest).check()
    save_tokenizer(cache_tok, str(tmp_path / "student" / "tokenizer.json"))
    TokenTask(cfg, manifest).check()  # the same tokenizer: accepted
