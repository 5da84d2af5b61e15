"""Text corpora, tokenizers and token windows (pipeline/data/corpus.py, tokenizer.py, windows.py). No Ray."""

from __future__ import annotations

import itertools
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models

from pipeline import storage
from pipeline.data import corpus, tokenizer, windows
from pipeline.data.corpus import Document
from pipeline.data.split import hash_split
from pipeline.errors import DistillError

SAMPLE = "def f(x):\n    return x  # naïve café, 日本語, emoji 🐍, a literal <eos> and <pad>\n\ttabs\r\n  "


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return list(corpus.read_documents(max_documents=30))


@pytest.fixture(scope="module")
def bpe(docs):
    return tokenizer.train_bpe(docs, vocab_size=1000)


def _memory_uri() -> str:
    return f"memory://text-test-{uuid.uuid4().hex[:8]}"


# --- corpora -----------------------------------------------------------------------------------


def test_default_corpus_is_the_stdlib_without_tests_or_site_packages():
    files = corpus.default_corpus_files()
    rel = [os.path.relpath(f, corpus.stdlib_root()).replace(os.sep, "/") for f in files]
    assert len(files) > 100
    assert files == corpus.default_corpus_files()
    assert rel == sorted(rel)
    assert {"os.py", "json/__init__.py", "asyncio/events.py"} <= set(rel)
    excluded = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not [r for r in rel if excluded & set(r.split("/")[:-1])]
    assert all(r.endswith(".py") for r in rel)


def test_stdlib_documents_are_named_relative_to_the_stdlib(docs):
    files = corpus.default_corpus_files()[:30]
    assert [d.doc_id for d in docs] == [os.path.relpath(f, corpus.stdlib_root()).replace(os.sep, "/") for f in files]
    with open(files[0], encoding="utf-8") as f:
        assert docs[0].text == f.read()


def test_limits_take_a_deterministic_prefix():
    first = list(corpus.read_documents(max_documents=10))
    assert len(first) == 10
    sizes = [len(d.text.encode()) for d in first]
    budget = sum(sizes[:6]) + sizes[6] // 2
    capped = list(corpus.read_documents(max_bytes=budget))
    assert [d.doc_id for d in capped] == [d.doc_id for d in first[:6]]
    assert list(corpus.read_documents(max_documents=3, max_bytes=budget)) == first[:3]
    assert list(corpus.read_documents(max_documents=0)) == []


def _write_text_corpus(root) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "x.txt").write_text("first")
    (root / "sub" / "y.txt").write_text("second ü")
    (root / "sub" / "z.md").write_text("third")
    (root / ".hidden").write_text("never read")


def test_directory_glob_and_file_list(tmp_path):
    root = tmp_path / "corpus"
    _write_text_corpus(root)
    by_dir = list(corpus.read_documents(str(root)))
    assert [(d.doc_id, d.text) for d in by_dir] == [("sub/y.txt", "second ü"), ("sub/z.md", "third"), ("x.txt", "first")]
    assert [d.doc_id for d in corpus.read_documents(str(root / "**" / "*.txt"))] == ["sub/y.txt", "x.txt"]
    listed = corpus.read_documents([str(root / "x.txt"), str(root / "sub" / "y.txt")])
    assert [d.doc_id for d in listed] == ["sub/y.txt", "x.txt"]
    assert [d.doc_id for d in corpus.read_documents(str(root / "x.txt"))] == ["x.txt"]
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "w.txt").write_text("fourth")
    mixed = corpus.read_documents([str(tmp_path / "more"), str(root / "sub" / "*.md"), str(root / "x.txt")])
    assert [d.doc_id for d in mixed] == ["corpus/sub/z.md", "corpus/x.txt", "more/w.txt"]  # relative to the common root
    with pytest.raises(DistillError, match="does not exist"):
        list(corpus.read_documents(str(tmp_path / "nope")))


def test_fsspec_directory_gives_the_same_documents(tmp_path):
    root = tmp_path / "corpus"
    _write_text_corpus(root)
    uri = _memory_uri()
    for rel in ("x.txt", "sub/y.txt", "sub/z.md"):
        storage.write_bytes_atomic(f"{uri}/{rel}", (root / rel).read_bytes())
    assert list(corpus.read_documents(uri)) == list(corpus.read_documents(str(root)))


def test_parquet_corpus_with_and_without_an_id_column(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    pq.write_table(pa.table({"id": ["b", "a"], "body": ["two", "one"]}), root / "part-0.parquet")
    pq.write_table(pa.table({"id": ["c"], "body": ["three"]}), root / "part-1.parquet")
    (root / "_SUCCESS").write_text("")
    with_ids = list(corpus.read_documents(str(root), text_column="body", id_column="id"))
    assert with_ids == [Document("b", "two"), Document("a", "one"), Document("c", "three")]
    by_row = list(corpus.read_documents(str(root), text_column="body"))
    assert [d.doc_id for d in by_row] == ["0", "1", "2"]
    assert [d.text for d in by_row] == ["two", "one", "three"]
    with pytest.raises(DistillError, match="lacks column"):
        list(corpus.read_documents(str(root), text_column="text"))
    pq.write_table(pa.table({"id": ["a"], "body": ["dup"]}), root / "part-2.parquet")
    with pytest.raises(DistillError, match="duplicate id 'a'"):
        list(corpus.read_documents(str(root), text_column="body", id_column="id"))


# --- tokenizers --------------------------------------------------------------------------------


def test_bpe_round_trips_any_text(bpe, docs):
    assert bpe.get_vocab_size() == 1000
    assert (bpe.token_to_id("<pad>"), bpe.token_to_id("<eos>")) == (0, 1)
    for t in [SAMPLE, docs[3].text, "", "\x00\x01\xff"]:
        ids = bpe.encode(t).ids
        assert bpe.decode(ids) == t
    ids = tokenizer.encode_texts(bpe, [SAMPLE])[0]
    assert 0 not in ids and 1 not in ids  # "<eos>" in the text is ordinary bytes, not a document end
    # merges were learned: code compresses well below one token per byte
    assert len(tokenizer.encode_texts(bpe, [docs[3].text])[0]) < 0.5 * len(docs[3].text.encode())


@pytest.mark.parametrize("where", ["local", "memory"])
def test_save_and_load_keep_ids_and_digest(bpe, tmp_path, where):
    uri = str(tmp_path / "tok" / "tokenizer.json") if where == "local" else f"{_memory_uri()}/tokenizer.json"
    tokenizer.save_tokenizer(bpe, uri)
    loaded = tokenizer.load_tokenizer(uri)
    assert tokenizer.encode_texts(loaded, [SAMPLE]) == tokenizer.encode_texts(bpe, [SAMPLE])
    assert tokenizer.tokenizer_digest(loaded) == tokenizer.tokenizer_digest(bpe)
    assert len(tokenizer.tokenizer_digest(bpe)) == 16
    assert tokenizer.tokenizer_digest(tokenizer.byte_tokenizer()) != tokenizer.tokenizer_digest(bpe)


def test_load_missing_or_broken_tokenizer_is_a_distill_error(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        tokenizer.load_tokenizer(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DistillError, match="not a valid tokenizer"):
        tokenizer.load_tokenizer(str(tmp_path / "bad.json"))


def test_byte_tokenizer_ids_are_bytes_plus_two():
    tok = tokenizer.byte_tokenizer()
    assert tok.get_vocab_size() == 258
    ids = tokenizer.encode_texts(tok, [SAMPLE])[0]
    assert ids == [b + 2 for b in SAMPLE.encode()]
    assert tok.decode(ids) == SAMPLE
    assert tokenizer.special_ids(tok) == (0, 1)


def test_special_ids_of_a_foreign_tokenizer():
    # a GPT-2 style tokenizer: end-of-text is <|endoftext|>, and with no pad token padding uses it
    gpt2_like = Tokenizer(models.BPE(vocab={"a": 0, "<|endoftext|>": 1}, merges=[]))
    assert tokenizer.special_ids(gpt2_like) == (1, 1)
    with pytest.raises(DistillError, match="end-of-text"):
        tokenizer.special_ids(Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))


# --- windows -----------------------------------------------------------------------------------


def test_windows_overlap_by_one_and_pad_the_tail():
    tok = tokenizer.byte_tokenizer()
    rows = list(windows.chunk_documents([Document("d", "abcdefghij")], tok, seq_len=4))
    tokens = [b + 2 for b in b"abcdefghij"] + [1]  # 11 tokens with <eos>
    assert [r["sample_id"] for r in rows] == ["d@0", "d@4", "d@8"]
    assert [r["length"] for r in rows] == [5, 5, 3]
    assert all(r["input_ids"].dtype == np.int32 and r["input_ids"].shape == (5,) for r in rows)
    assert rows[0]["input_ids"].tolist() == tokens[0:5]
    assert rows[1]["input_ids"].tolist() == tokens[4:9]
    assert rows[2]["input_ids"].tolist() == tokens[8:11] + [0, 0]


def test_window_edge_cases():
    tok = tokenizer.byte_tokenizer()
    assert list(windows.chunk_documents([Document("empty", "")], tok, seq_len=4)) == []  # only <eos>: length 1, dropped
    exact = list(windows.chunk_documents([Document("e", "abcd")], tok, seq_len=4))  # 5 tokens = one full window
    assert [(r["sample_id"], r["length"]) for r in exact] == [("e@0", 5)]
    one_more = list(windows.chunk_documents([Document("e", "abcde")], tok, seq_len=4))
    assert [(r["sample_id"], r["length"]) for r in one_more] == [("e@0", 5), ("e@4", 2)]
    assert windows.window_starts(11, 4, stride=2) == [0, 2, 4, 6]
    with pytest.raises(ValueError):
        list(windows.chunk_documents([Document("e", "abc")], tok, seq_len=4, stride=5))


def test_every_token_is_a_target_exactly_once(bpe, docs):
    seq_len = 32
    rows = list(windows.chunk_documents(docs, bpe, seq_len))
    by_doc: dict[str, list[dict]] = {}
    for r in rows:
        by_doc.setdefault(windows.doc_id_of(r["sample_id"]), []).append(r)
    assert list(by_doc) == [d.doc_id for d in docs]
    for doc in docs:
        tokens = tokenizer.encode_texts(bpe, [doc.text])[0] + [1]
        doc_windows = by_doc[doc.doc_id]
        assert [int(w["sample_id"].rsplit("@", 1)[1]) for w in doc_windows] == list(range(0, len(doc_windows) * seq_len, seq_len))
        targets = [t for w in doc_windows for t in w["input_ids"][1:w["length"]].tolist()]
        assert targets == tokens[1:]
        for a, b in itertools.pairwise(doc_windows):
            assert a["length"] == seq_len + 1 and a["input_ids"][-1] == b["input_ids"][0]
        last = doc_windows[-1]
        assert 2 <= last["length"] <= seq_len + 1
        assert (last["input_ids"][last["length"]:] == 0).all()


def test_sample_ids_are_unique_and_stable(bpe, docs):
    first = list(windows.chunk_documents(docs, bpe, 64))
    fresh = Tokenizer.from_str(bpe.to_str())  # a separate instance, documents read again
    second = list(windows.chunk_documents(corpus.read_documents(max_documents=30), fresh, 64))
    ids = [r["sample_id"] for r in first]
    assert len(set(ids)) == len(ids)
    assert ids == [r["sample_id"] for r in second]
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))


def test_chunk_batch_matches_chunk_documents(bpe, docs):
    batch = {"doc_id": np.array([d.doc_id for d in docs[:5]], dtype=object), "text": np.array([d.text for d in docs[:5]], dtype=object)}
    cols = windows.chunk_batch(batch, bpe, 16)
    rows = list(windows.chunk_documents(docs[:5], bpe, 16))
    assert cols["sample_id"].tolist() == [r["sample_id"] for r in rows]
    assert cols["input_ids"].shape == (len(rows), 17) and cols["input_ids"].dtype == np.int32
    assert np.array_equal(cols["input_ids"], np.stack([r["input_ids"] for r in rows]))
    assert cols["length"].tolist() == [r["length"] for r in rows]
    empty = windows.chunk_batch({"doc_id": np.array(["e"]), "text": np.array([""])}, bpe, 16)
    assert empty["input_ids"].shape == (0, 17)


def split_of(sample_id: str, val_fraction: float, seed: int) -> str:
    """The text source's split of one window: the hash split of its document id."""
    return str(hash_split([windows.doc_id_of(sample_id)], val_fraction, seed)[0])


def test_split_keeps_documents_together_and_is_about_val_fraction():
    doc_ids = [f"pkg/mod_{i}.py" for i in range(4000)]
    splits = {d: {split_of(f"{d}@{o}", 0.2, seed=7) for o in (0, 64, 128, 4096)} for d in doc_ids}
    assert all(len(s) == 1 for s in splits.values())
    val = [d for d, s in splits.items() if s == {"val"}]
    assert 0.17 < len(val) / len(doc_ids) < 0.23
    other_seed = [d for d in doc_ids if split_of(f"{d}@0", 0.2, seed=8) == "val"]
    assert set(other_seed) != set(val)
    assert split_of("a@b@0", 0.5, 1) == split_of("a@b@64", 0.5, 1)  # an id may itself contain "@"


def test_corpus_fingerprint_tracks_content():
    a = [Document("x", "one"), Document("y", "two")]
    assert corpus.corpus_fingerprint(a) == corpus.corpus_fingerprint(list(a))
    assert corpus.corpus_fingerprint(a) != corpus.corpus_fingerprint([Document("x", "one"), Document("y", "two!")])
    assert corpus.corpus_fingerprint(a) != corpus.corpus_fingerprint([Document("x", "onet"), Document("y", "wo")])


def test_bpe_training_is_deterministic(docs, bpe):
    again = tokenizer.train_bpe(docs, vocab_size=1000)
    assert tokenizer.tokenizer_digest(again) == tokenizer.tokenizer_digest(bpe)
    assert tokenizer.tokenizer_digest(tokenizer.train_bpe(docs, vocab_size=900)) != tokenizer.tokenizer_digest(bpe)
