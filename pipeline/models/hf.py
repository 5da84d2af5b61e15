"""Hugging Face causal LMs as pipeline models: loaded with `from_pretrained` from a saved directory
(local or any fsspec URI), never from the Hub, with their forward returning the logits tensor."""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile

import torch
from torch import nn

from pipeline import storage
from pipeline.errors import DistillError
from pipeline.models.hidden import Hidden


class HFCausalLM(nn.Module):
    """An HF `*ForCausalLM` whose forward returns the logits tensor; the HF model is `self.model`,
    so taps name its modules as `model.<HF name>` (e.g. `model.transformer.h.0`)."""

    def __init__(self, model: nn.Module, keep: int | None = None) -> None:
        super().__init__()
        self.model = model
        # Logit rows past the tokenizer's vocabulary (an embedding padded to a multiple of 64 or
        # 128: 152,064 logits for 151,936 tokens) are dropped here, so no id ever points at one.
        self.keep = keep

    @property
    def dropped_logits(self) -> int:
        return _vocab_size(self.model) - self.keep if self.keep else 0

    def head_is_linear(self) -> bool:
        """Whether the logits are the output embedding of the base model's last hidden state and no
        more (models that soft-cap or scale their logits are run whole)."""
        config, head = self.model.config, self.model.get_output_embeddings()
        scaled = any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale"))
        return isinstance(head, nn.Linear) and not scaled and getattr(self.model, "base_model", None) is not self.model

    def forward(self, input_ids: torch.Tensor, hidden: bool = False) -> torch.Tensor | Hidden:
        # A model spread over GPUs by device_map takes its inputs on the first layer's device.
        input_ids = input_ids.long().to(self.model.device)
        if hidden:
            last = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
            head = self.model.get_output_embeddings()
            weight, bias = head.weight, head.bias
            if self.keep:
                weight, bias = weight[:self.keep], None if bias is None else bias[:self.keep]
            return Hidden(last.to(weight.device), weight, bias)
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        return logits[..., :self.keep] if self.keep else logits


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hf_causal_lm(path: str, num_classes: int | None = None, input_shape: tuple[int, ...] | None = None,
                 dtype: str | None = None, device_map: str | dict | None = None,
                 storage_options: storage.StorageOptions | None = None) -> nn.Module:
    """Load `AutoModelForCausalLM.from_pretrained` from a saved directory, never from the Hub.

    Args:
        path: a local directory or an fsspec URI (s3://...) of one; a remote directory is copied
            to a local temporary directory first.
        num_classes: the vocabulary the pipeline expects (the tokenizer's or the cache's); a model
            with another vocabulary size is a DistillError naming both.
        input_shape: (L,); longer than the model's position table is a DistillError.
        dtype: "float32", "bfloat16" or "float16"; default: as saved.
        device_map: passed to from_pretrained ("auto": layers placed across the process's GPUs,
            for a teacher larger than one GPU; needs the accelerate package).
        storage_options: the endpoint a remote `path` is read through (the config's `storage:`).

    Returns:
        `HFCausalLM`: input_ids (B, L) -> logits (B, L, V).
    """
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise DistillError("hf_causal_lm needs the transformers package", "pip install transformers") from None
    if dtype is not None and dtype not in _DTYPES:
        raise DistillError(f"unknown dtype {dtype!r} for {path}", f"use one of {list(_DTYPES)}")
    quiet_transformers()
    kwargs: dict[str, object] = {"local_files_only": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if dtype is not None:
        # transformers 5 names it `dtype`; 4.x (before 4.56) only knows `torch_dtype`.
        kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = _DTYPES[dtype]
    if storage.is_local(path):
        local = storage.local_path(path)
        if not os.path.isdir(local):
            raise DistillError(f"HF model directory {path!r} does not exist",
                               "save one with model.save_pretrained(DIR) and point `path` at DIR")
        model = AutoModelForCausalLM.from_pretrained(local, **kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="hf-model-") as local:
            _copy_dir(path, local, storage_options)
            model = AutoModelForCausalLM.from_pretrained(local, **kwargs)
    model.eval()
    vocab = _vocab_size(model)
    if num_classes is not None and num_classes > vocab:
        raise DistillError(
            f"vocabulary mismatch: the model at {path} predicts {vocab} tokens but the pipeline expects {num_classes}",
            "teacher and student must share one tokenizer: train the student with the teacher's tokenizer "
            "(or a cache made with it), or set num_classes to the model's vocabulary size",
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if input_shape is not None and positions is not None and int(input_shape[0]) > positions:
        raise DistillError(f"windows of {input_shape[0]} tokens exceed the {positions} positions of the model at {path}",
                           f"use seq_len <= {positions}")
    return HFCausalLM(model, keep=num_classes if num_classes is not None and num_classes < vocab else None)


def hf_logit_width(path: str, options: storage.Options = None) -> int | None:
    """The width of a saved model's logits (its config's vocab_size), without loading it."""
    import json

    uri = storage.join(path, "config.json")
    if not storage.exists(uri, options):
        return None
    config = json.loads(storage.read_bytes(uri, options))
    width = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(width) if width else None


def hf_causal_lm_config(model_type: str = "gpt2", num_classes: int | None = None,
                        input_shape: tuple[int, ...] | None = None, **config: object) -> nn.Module:
    """A randomly initialised `AutoModelForCausalLM` of `model_type` (any architecture transformers
    ships: gpt2, llama, qwen2, ...) sized by `config` (e.g. n_layer, n_embd, n_head for gpt2).

    The vocabulary comes from the cache (`num_classes`) and the position table from its windows
    (`input_shape`) unless `config` sets them. Nothing is downloaded.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise DistillError("hf_causal_lm_config needs the transformers package", "pip install transformers") from None
    quiet_transformers()
    settings = dict(config)
    if num_classes is not None:
        settings.setdefault("vocab_size", num_classes)
    if input_shape is not None:
        settings.setdefault("max_position_embeddings", int(input_shape[0]))
    try:
        hf_config = AutoConfig.for_model(model_type, **settings)
    except ValueError as e:
        raise DistillError(f"unknown HF model_type {model_type!r}: {str(e).splitlines()[0]}",
                           "use a model_type transformers knows, e.g. gpt2, llama, qwen2") from None
    return HFCausalLM(AutoModelForCausalLM.from_config(hf_config))


def saved_tokenizer(path: str, options: storage.Options = None) -> str | None:
    """The tokenizer.json saved beside an HF model directory, if any (to check a student's vocabulary)."""
    uri = storage.join(path, "tokenizer.json")
    return uri if storage.exists(uri, options) else None


def quiet_transformers() -> None:
    """transformers draws a progress bar per load and save; distill prints its own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _copy_dir(uri: str, local: str, options: storage.Options = None) -> None:
    fs, root = storage.filesystem(uri, options)
    root = root.rstrip("/")
    files = [p for p in fs.find(root) if fs.isfile(p)]
    if not files:
        raise DistillError(f"HF model directory {uri!r} is empty or does not exist",
                           "upload the directory written by save_pretrained, or fix `path`")
    for p in files:
        target = os.path.join(local, *posixpath.relpath(p, root).split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(p, target)


def hf_weights_digest(path: str, options: storage.Options = None) -> str:
    """Digest of every file in a saved model directory (names and contents), 16 hex chars:
    the teacher's identity in a cache key, as `weights_digest` is for a .pt file."""
    fs, root = storage.filesystem(path, options)
    root = root.rstrip("/")
    h = hashlib.sha256()
    for p in sorted(p for p in fs.find(root) if fs.isfile(p)):
        h.update(posixpath.relpath(p, root).encode() + b"\0" + storage.sha256_of(p, fs).encode())
    return h.hexdigest()[:16]
