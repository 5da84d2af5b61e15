"""The text source as the pipeline sees it: windows with stable ids, split by document, the
vocabulary as the class count, and the configs that only make sense for token caches."""

import numpy as np
import pytest

from pipeline.cache.schema import INPUT_IDS, LENGTH, SAMPLE_ID
from pipeline.config import PrecomputeConfig, parse_source
from pipeline.data.sources import describe, load_split
from pipeline.data.windows import doc_id_of

SOURCE = {"kind": "text", "seq_len": 16, "val_fraction": 0.25, "max_bytes": 30_000, "tokenizer": {"kind": "bpe", "vocab_size": 400}}


def test_text_source_windows_split_by_document():
    cfg = parse_source(SOURCE)
    info = describe(cfg)
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    assert info.num_classes == 400 and info.input_shape == (16,)
    assert info.rows == {"train": len(train[SAMPLE_ID]), "val": len(val[SAMPLE_ID])} and min(info.rows.values()) > 0
    assert train[INPUT_IDS].shape[1] == 17 and train[INPUT_IDS].dtype == np.int32
    assert ((train[LENGTH] >= 2) & (train[LENGTH] <= 17)).all()
    assert not {doc_id_of(s) for s in train[SAMPLE_ID]} & {doc_id_of(s) for s in val[SAMPLE_ID]}
    assert len(set(train[SAMPLE_ID]) | set(val[SAMPLE_ID])) == sum(info.rows.values())


def test_token_modes_need_a_text_source_and_one_teacher():
    teacher = {"factory": "pipeline.models.lm:lm_tiny"}
    with pytest.raises(ValueError, match="needs `source.kind: text`"):
        PrecomputeConfig.model_validate({"source": {"kind": "digits"}, "teacher": teacher, "outputs": {"logits": {"mode": "topk"}}})
    with pytest.raises(ValueError, match="one temperature"):
        PrecomputeConfig.model_validate({"source": SOURCE, "teacher": teacher,
                                         "outputs": {"logits": {"mode": "sampled", "temperatures": [1.0, 2.0]}}})
    with pytest.raises(ValueError, match="one teacher and no taps"):
        PrecomputeConfig.model_validate({"source": SOURCE, "teacher": teacher, "teachers": {"b": teacher}})


def _info(vocab: int):
    from pipeline.data.sources import SourceInfo

    return SourceInfo(kind="text", fingerprint="f", num_classes=vocab, input_shape=(16,), rows={"train": 900, "val": 100})


def test_a_text_cache_without_outputs_gets_the_sampled_default_and_its_size_is_printed_first():
    from pipeline.teacher.sizing import check_token_outputs, token_cache_line

    teacher = {"factory": "pipeline.models.lm:lm_tiny"}
    cfg = PrecomputeConfig.model_validate({"source": SOURCE, "teacher": teacher})
    assert cfg.outputs.logits.mode == "sampled" and cfg.outputs.logits.k == 25
    check_token_outputs(cfg, _info(131_072))
    # 25 draws of a 17-bit packed id and a float16 weight; 16,000 tokens of 107 bytes with the input ids
    assert token_cache_line(cfg, _info(131_072)) == (
        "teacher signal: sampled at a vocabulary of 131,072, 103 raw bytes a token (+4 for the input ids); "
        "about 1.7 MB before compression for 16,000 tokens")
    assert "100 raw bytes a token" in token_cache_line(cfg, _info(2_048))  # uint16 ids
    image = PrecomputeConfig.model_validate({"source": {"kind": "digits"}, "teacher": teacher})
    assert image.outputs.logits.mode == "full" and token_cache_line(image, _info(10)) is None


def test_full_logits_at_a_large_vocabulary_need_an_explicit_mode():
    from pipeline.errors import DistillError
    from pipeline.submit import _payload
    from pipeline.teacher.sizing import check_token_outputs

    teacher = {"factory": "pipeline.models.lm:lm_tiny"}
    implicit = PrecomputeConfig.model_validate({"source": SOURCE, "teacher": teacher, "outputs": {"logits": {"dtype": "float16"}}})
    assert implicit.outputs.logits.mode == "full"
    check_token_outputs(implicit, _info(4_096))  # a small vocabulary: full logits are fine
    with pytest.raises(DistillError) as e:
        check_token_outputs(implicit, _info(32_000))
    assert "64,000 bytes a token, 1.0 GB for this source" in e.value.problem and "mode: full" in e.value.fix
    # the job submitted for it validates the config again, and refuses the same way
    again = PrecomputeConfig.model_validate(_payload(implicit))
    with pytest.raises(DistillError):
        check_token_outputs(again, _info(32_000))
    explicit = PrecomputeConfig.model_validate({"source": SOURCE, "teacher": teacher,
                                                "outputs": {"logits": {"mode": "full", "dtype": "float16"}}})
    check_token_outputs(explicit, _info(32_000))
    check_token_outputs(PrecomputeConfig.model_validate(_payload(explicit)), _info(32_000))
