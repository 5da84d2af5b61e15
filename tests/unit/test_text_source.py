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
