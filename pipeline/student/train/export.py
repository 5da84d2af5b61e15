"""A trained Hugging Face student written as transformers expects it: `save_pretrained` of the
model and of the cache's tokenizer, so `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load it with no pipeline code."""

from __future__ import annotations

import os
import tempfile

import torch

from pipeline import storage
from pipeline.cache.manifest import Manifest
from pipeline.config import TrainConfig
from pipeline.models.factory import build_model
from pipeline.models.hf import HFCausalLM, quiet_transformers


def export_student(cfg: TrainConfig, manifest: Manifest, cache_uri: str, state: dict[str, torch.Tensor], uri: str) -> str | None:
    """Write the student to `uri` when it is an HF model (returns `uri`); None for any other student."""
    model = build_model(cfg.student.model_copy(update={"weights": None}), input_shape=tuple(manifest.input_shape),
                        num_classes=manifest.num_classes)
    if not isinstance(model, HFCausalLM):
        return None
    model.load_state_dict(state)
    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="hf-student-") as d:
        record = manifest.dataset.tokenizer
        if record is not None:
            pad, eos = _save_tokenizer(storage.join(cache_uri, record.path), d, cfg.storage)
            # The architecture's own special ids (GPT-2's 50256) would point outside the cache's vocabulary.
            for hf_config in (model.model.config, getattr(model.model, "generation_config", None)):
                if hf_config is not None:
                    hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id = eos, eos, pad
        model.model.save_pretrained(d)
        for name in sorted(os.listdir(d)):
            storage.write_bytes_atomic(storage.join(uri, name), open(os.path.join(d, name), "rb").read(), cfg.storage)
    return uri


def _save_tokenizer(tokenizer_uri: str, directory: str, options: storage.Options) -> tuple[int, int]:
    """The cache's tokenizer as a transformers fast tokenizer in `directory`; returns (pad, eos) ids."""
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.tokenizer import load_tokenizer, special_ids

    tok = load_tokenizer(tokenizer_uri, options)
    pad, eos = special_ids(tok)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=tok.id_to_token(eos), pad_token=tok.id_to_token(pad))
    fast.save_pretrained(directory)
    return pad, eos
