"""Byte-level tokenizers (HF `tokenizers`): trained on a corpus, byte-per-token, or loaded from a
`tokenizer.json`, with a digest that identifies the vocabulary in a cache."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline import storage
from pipeline.data.corpus import Document
from pipeline.errors import DistillError

PAD = "<pad>"  # id 0 in the tokenizers made here; its value never matters, `length` masks it
EOS = "<eos>"  # id 1; appended to every document, so the model learns where a document ends
SPECIAL_TOKENS = (PAD, EOS)
# End-of-text names used by tokenizers made elsewhere (a teacher's own tokenizer.json).
_EOS_NAMES = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>")
_PAD_NAMES = (PAD, "<|pad|>", "[PAD]")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _finish(tok: Tokenizer) -> Tokenizer:
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return _plain_text_specials(tok)


def _plain_text_specials(tok: Tokenizer) -> Tokenizer:
    # A document that contains the text "<eos>" is encoded as ordinary bytes: the only end of a
    # document is the one chunk_documents appends. The flag is not part of the JSON, so every
    # function here that hands out a tokenizer sets it.
    tok.encode_special_tokens = True
    return tok


def train_bpe(documents: Iterable[Document | str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on the documents; any text round-trips exactly.

    Ids 0 and 1 are `<pad>` and `<eos>`, then the 256 byte symbols, then the merges. The result
    may have fewer than `vocab_size` entries when the corpus has too few frequent pairs.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size {vocab_size} is below 258 (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((d if isinstance(d, str) else d.text for d in documents), trainer=trainer)
    return _finish(tok)


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte: id = byte + 2 (after `<pad>` 0 and `<eos>` 1); vocabulary 258."""
    table = _bytes_to_unicode()
    vocab = {PAD: 0, EOS: 1, **{table[b]: b + len(SPECIAL_TOKENS) for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges it would only cost time.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return _finish(tok)


def save_tokenizer(tok: Tokenizer, uri: str, options: storage.Options = None) -> None:
    """Write the tokenizer's JSON (the HF `tokenizer.json` format) to any fsspec URI, atomically."""
    storage.write_bytes_atomic(uri, tok.to_str().encode(), options)


def load_tokenizer(uri: str, options: storage.Options = None) -> Tokenizer:
    """Read a tokenizer JSON written by `save_tokenizer` (or any HF `tokenizer.json`)."""
    if not storage.exists(uri, options):
        raise DistillError(f"tokenizer {uri!r} does not exist", "train one first (train_bpe + save_tokenizer) or fix the URI")
    try:
        tok = Tokenizer.from_str(storage.read_bytes(uri, options).decode())
    except Exception as e:  # noqa: BLE001 (the Rust side raises a bare Exception for malformed JSON)
        raise DistillError(f"tokenizer {uri!r} is not a valid tokenizer JSON: {e}", "point at a tokenizer.json") from None
    return _plain_text_specials(tok)


def tokenizer_digest(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (sorted keys, no whitespace), 16 hex chars."""
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def special_ids(tok: Tokenizer) -> tuple[int, int]:
    """(pad_id, eos_id). A tokenizer without a pad token pads with its end-of-text id."""
    eos = next((i for name in _EOS_NAMES if (i := tok.token_to_id(name)) is not None), None)
    if eos is None:
        raise DistillError("the tokenizer has no end-of-text token", f"add one of {list(_EOS_NAMES)} as a special token")
    pad = next((i for name in _PAD_NAMES if (i := tok.token_to_id(name)) is not None), eos)
    return pad, eos


def encode_texts(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added, on all cores."""
    _plain_text_specials(tok)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers >= 0.21)
    return [e.ids for e in encode(texts, add_special_tokens=False)]

