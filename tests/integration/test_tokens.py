"""Token caches through both stages on a local Ray: a small causal LM teacher over standard-library
text, top-k with exact tail mass, sampled draws and teacher sequences, and the errors a student
of the wrong vocabulary or temperature gets before any worker starts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.manifest import read_manifest
from pipeline.cache.schema import (
    INPUT_IDS,
    LENGTH,
    SAMPLE_ID,
    TEACHER_SEQUENCE,
    TOKENIZER_FILE,
    TOPK_INDICES,
    TOPK_LSE,
    TOPK_VALUES,
)
from pipeline.cache.tensors import to_numpy
from pipeline.cli import main
from pipeline.config import ModelSpec, load_precompute_config
from pipeline.data.sources import load_split
from pipeline.data.tokenizer import load_tokenizer
from pipeline.models.factory import build_model
from pipeline.teacher.identity import resolve_target
from tests.conftest import write_yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def column(table, name):
    """One column of a shard as numpy (tensor columns as (rows, *shape))."""
    return to_numpy(table.column(name), table.schema.field(name))

TEACHER = {"factory": "pipeline.models.lm:causal_lm", "kwargs": {"d_model": 32, "n_layers": 1, "n_heads": 2}}
SOURCE = {"kind": "text", "seq_len": 16, "val_fraction": 0.25, "max_bytes": 40_000, "tokenizer": {"kind": "bpe", "vocab_size": 400}}


@pytest.fixture(scope="module")
def lm_teacher(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    data = {"source": SOURCE, "teacher": {**TEACHER, "weights": str(root / "teacher.pt"),
                                          "fit": {"epochs": 3, "lr": 0.01, "batch_size": 32, "shift": 0}},
            "outputs": {"logits": {"mode": "topk", "k": 8, "temperatures": [1.0, 2.0], "values": "uint8"}},
            "cache_root": str(root / "cache"), "batch_size": 64}
    path = write_yaml(root / "precompute.yaml", data)
    assert main(["fit-teacher", path]) == 0
    assert main(["precompute", path]) == 0
    return {"root": root, "path": path, "data": data}


def _rows(uri, split="val"):
    m = read_manifest(uri)
    return m, pq.read_table([f"{uri}/{e.path}" for e in m.shards_of(split)])


def test_topk_cache_holds_the_teachers_exact_buckets(lm_teacher):
    cfg = load_precompute_config(lm_teacher["path"])
    uri = resolve_target(cfg).uri
    m, table = _rows(uri)
    spec = m.logits()
    assert spec.mode == "topk" and spec.k == 8 and spec.temperatures == [1.0, 2.0]
    assert 0 < spec.bytes_per_token < 8 * 2 + 8 + 2 * 4 + 1  # uint16 ids + uint8 values + 2 lse, compressed
    assert m.num_classes == 400 and m.input_shape == [16]
    # The tokenizer travels with the cache and is the one the ids came from.
    tok = load_tokenizer(f"{uri}/{TOKENIZER_FILE}")
    assert tok.get_vocab_size() == 400 and m.dataset.tokenizer.vocab_size == 400
    val = load_split(cfg.source, "val")
    order = {s: i for i, s in enumerate(table.column(SAMPLE_ID).to_pylist())}
    rows = [order[s] for s in val[SAMPLE_ID]]
    col = {c: column(table, c)[rows] for c in (TOPK_INDICES, TOPK_VALUES, TOPK_LSE, INPUT_IDS, LENGTH)}
    assert col[TOPK_INDICES].dtype == np.uint16 and col[TOPK_VALUES].dtype == np.uint8
    np.testing.assert_array_equal(col[INPUT_IDS], val[INPUT_IDS])
    # Recompute the teacher here: stored ids are its top-8, stored lse its full-vocabulary normaliser.
    teacher = build_model(cfg.teacher, input_shape=(16,), num_classes=400).eval()
    with torch.inference_mode():
        z = teacher(torch.from_numpy(val[INPUT_IDS][:, :-1].astype(np.int64))).float()
    top = z.topk(8, dim=-1)
    mask = np.arange(16)[None, :] < val[LENGTH][:, None] - 1
    agree = (col[TOPK_INDICES][..., 0].astype(np.int64) == top.indices[..., 0].numpy())[mask].mean()
    assert agree > 0.99
    for i, t in enumerate((1.0, 2.0)):
        lse_rel = torch.logsumexp(z / t, -1) - top.values[..., 0] / t
        np.testing.assert_allclose(col[TOPK_LSE][..., i][mask], lse_rel.numpy()[mask], rtol=1e-4, atol=1e-4)
    offsets = (top.values[..., :1] - top.values).numpy()
    assert np.abs(col[TOPK_VALUES][mask] * (1 / 16) - offsets[mask]).max() <= 1 / 32 + 1e-3


def test_students_train_from_topk_and_sampled_caches(lm_teacher, tmp_path):
    # Top-k is the fixture's own cache (a hit); a sampled cache carries only the sampled mode's fields.
    # The sampled cache uses priority sampling: its own encoder and a loss that keeps the weights as stored.
    priority = {"mode": "sampled", "k": 8, "temperatures": [1.0], "estimator": "priority"}
    for mode, logits in (("topk", lm_teacher["data"]["outputs"]["logits"]), ("sampled", priority)):
        pre = dict(lm_teacher["data"])
        pre["outputs"] = {"logits": logits}
        pre_path = write_yaml(tmp_path / f"pre-{mode}.yaml", pre)
        assert main(["precompute", pre_path]) == 0
        train = {"precompute": pre_path, "student": {"factory": "pipeline.models.lm:causal_lm", "kwargs": {"d_model": 16, "n_heads": 2, "n_layers": 1}},
                 "loss": {"temperature": 1.0, "terms": {"kd": 0.5, "ce": 0.5}}, "optimizer": {"name": "adamw", "lr": 0.01},
                 "epochs": 2, "batch_size": 32, "num_workers": 1, "cpus_per_worker": 1, "storage_path": str(tmp_path / "runs"),
                 "name": f"student-{mode}"}
        assert main(["train", write_yaml(tmp_path / f"train-{mode}.yaml", train)]) == 0
        result = json.loads((tmp_path / "runs" / f"student-{mode}" / "result.json").read_text())
        hist = result["history"]
        # Two short epochs on 395 windows: the training loss falls; val perplexity can wobble between epochs.
        assert hist[-1]["train_loss"] < hist[0]["train_loss"] and np.isfinite(hist[-1]["train_kd"])
        assert 1 < result["metrics"]["val_perplexity"] < 400  # better than uniform over the vocabulary
        assert result["workers_with_teacher"] == 0
        if mode == "topk":
            assert 0 <= result["metrics"]["val_agreement"] <= 1
            # `distill evaluate` on the cache's val split gives the run's own final numbers, and on the
            # precompute config's source (text tokenised with the cache's tokenizer) the same perplexity.
            out = tmp_path / "eval.json"
            assert main(["evaluate", str(tmp_path / "runs" / "student-topk"), "--source", result["cache"], "--out", str(out)]) == 0
            scored = json.loads(out.read_text())["metrics"]
            assert scored["val_perplexity"] == pytest.approx(result["metrics"]["val_perplexity"], rel=1e-4)
            assert scored["val_agreement"] == pytest.approx(result["metrics"]["val_agreement"], rel=1e-4)
            assert main(["evaluate", str(tmp_path / "runs" / "student-topk"), "--source", pre_path, "--out", str(out)]) == 0
            from_config = json.loads(out.read_text())["metrics"]
            assert from_config["val_perplexity"] == pytest.approx(scored["val_perplexity"], rel=1e-4)
            assert "val_agreement" not in from_config  # text without teacher outputs


def test_wrong_vocabulary_or_temperature_fails_before_any_worker(lm_teacher, tmp_path, capsys):
    base = {"precompute": lm_teacher["path"], "loss": {"temperature": 1.0, "terms": {"kd": 1.0}},
            "student": {"factory": "pipeline.models.lm:causal_lm", "kwargs": {"d_model": 16, "n_heads": 2, "n_layers": 1}},
            "storage_path": str(tmp_path / "runs"), "num_workers": 1}
    wrong_vocab = {**base, "student": {**base["student"], "kwargs": {**base["student"]["kwargs"], "num_classes": 500}}}
    assert main(["train", write_yaml(tmp_path / "v.yaml", wrong_vocab)]) == 2
    assert "vocabulary of 500" in capsys.readouterr().err
    assert main(["train", write_yaml(tmp_path / "t.yaml", {**base, "loss": {"temperature": 4.0, "terms": {"kd": 1.0}}})]) == 2
    err = capsys.readouterr().err
    assert "serves temperatures [1.0, 2.0], not 4.0" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_sequence_level_kd_stores_the_teachers_greedy_continuations(lm_teacher, tmp_path):
    pre = dict(lm_teacher["data"])
    pre["outputs"] = {"logits": {"mode": "sequences", "prompt_tokens": 4, "new_tokens": 8, "strategy": "greedy"}}
    path = write_yaml(tmp_path / "pre-seq.yaml", pre)
    assert main(["precompute", path]) == 0
    cfg = load_precompute_config(path)
    m, table = _rows(resolve_target(cfg).uri, "train")
    seq = column(table, TEACHER_SEQUENCE)[:8].astype(np.int64)
    ids = column(table, INPUT_IDS)[:8].astype(np.int64)
    assert seq.shape == (8, 12) and (seq[:, :4] == ids[:, :4]).all()
    teacher = build_model(cfg.teacher, input_shape=(16,), num_classes=400).eval()
    with torch.inference_mode():
        cur = torch.from_numpy(seq[:, :4])
        for _ in range(8):
            cur = torch.cat([cur, teacher(cur)[:, -1].argmax(-1, keepdim=True)], 1)
    np.testing.assert_array_equal(seq, cur.numpy())
    train = {"precompute": path, "student": {"factory": "pipeline.models.lm:causal_lm", "kwargs": {"d_model": 16, "n_heads": 2, "n_layers": 1}},
             "loss": {"terms": {"ce": 1.0}}, "optimizer": {"name": "adamw", "lr": 0.01}, "epochs": 1, "batch_size": 32,
             "num_workers": 1, "cpus_per_worker": 1, "storage_path": str(tmp_path / "runs"), "name": "seqkd"}
    assert main(["train", write_yaml(tmp_path / "train-seq.yaml", train)]) == 0
    result = json.loads((tmp_path / "runs" / "seqkd" / "result.json").read_text())
    assert np.isfinite(result["metrics"]["val_perplexity"])
    kd = {**train, "name": "seqkd-kd", "loss": {"terms": {"kd": 1.0}}}
    assert main(["train", write_yaml(tmp_path / "train-seq-kd.yaml", kd)]) == 2  # a sequences cache has no logits


def test_hugging_face_teacher_from_a_local_directory(ray_session, tmp_path):
    """`from_pretrained` on a directory saved here (nothing downloaded); its vocabulary is the byte tokenizer's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-gpt2"
    # 264 logits for the byte tokenizer's 258 tokens: an embedding padded past the vocabulary.
    config = transformers.GPT2Config(vocab_size=264, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    data = {"source": {**SOURCE, "max_bytes": 8000, "tokenizer": {"kind": "byte"}},
            "teacher": {"factory": "pipeline.models.hf:hf_causal_lm", "kwargs": {"path": str(model_dir)}},
            "outputs": {"logits": {"mode": "topk", "k": 4, "temperatures": [1.0], "values": "float16"}},
            "cache_root": str(tmp_path / "cache")}
    path = write_yaml(tmp_path / "pre-hf.yaml", data)
    assert main(["precompute", path]) == 0
    cfg = load_precompute_config(path)
    uri = resolve_target(cfg).uri
    m, table = _rows(uri, "train")
    assert m.num_classes == 258 and m.teacher.files_sha256
    assert m.teacher.logit_width == 264 and m.teacher.dropped_logit_rows == 6
    ids = column(table, INPUT_IDS)[:4].astype(np.int64)
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        expected = hf(torch.from_numpy(ids[:, :-1])).logits[..., :258].topk(4, dim=-1)
    stored = column(table, TOPK_VALUES)[:4].astype(np.float32)
    np.testing.assert_allclose(stored, expected.values.numpy(), rtol=1e-2, atol=1e-2)

    # An HF student built from a config, sharded over two workers in bf16, written with save_pretrained.
    train = {"precompute": path, "loss": {"temperature": 1.0, "terms": {"kd": 0.5, "ce": 0.5}},
             "student": {"factory": "pipeline.models.hf:hf_causal_lm_config",
                         "kwargs": {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2}},
             "optimizer": {"name": "adamw", "lr": 0.01, "schedule": "linear", "warmup_steps": 2},
             "max_steps": 12, "batch_size": 16, "num_workers": 2, "parallel": "fsdp", "precision": "bf16",
             "storage_path": str(tmp_path / "runs"), "name": "hf-student"}
    assert main(["train", write_yaml(tmp_path / "train-hf.yaml", train)]) == 0
    run = tmp_path / "runs" / "hf-student"
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 12 and result["hf_model"] == str(run / "hf")
    assert result["throughput"]["tokens_per_s"] > 0 and result["history"][-1]["train_tokens"] > 0
    student = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    assert tokenizer("def f():")["input_ids"] == load_tokenizer(f"{uri}/{TOKENIZER_FILE}").encode("def f():").ids
    # special ids inside the cache's vocabulary, the same in the model, its generation config and the tokenizer
    assert student.config.eos_token_id == student.config.bos_token_id == tokenizer.eos_token_id < 258
    assert student.config.pad_token_id == tokenizer.pad_token_id < 258
    assert student.generation_config.eos_token_id == tokenizer.eos_token_id
    state = torch.load(run / "student.pt", weights_only=True)
    wrapped = build_model(ModelSpec.model_validate(train["student"]), input_shape=(16,), num_classes=258)
    wrapped.load_state_dict(state)
    probe = torch.from_numpy(ids[:2, :-1])
    with torch.inference_mode():
        torch.testing.assert_close(student(probe).logits, wrapped.eval()(probe))


def test_ids_above_65535_travel_packed_through_both_stages(ray_session, tmp_path):
    """A 70,000-token vocabulary (a word-level tokenizer made here): stage 1 stores top-k ids at 17
    bits each, they are the teacher's own top-k, and a student trains from them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pipeline.cache.packing import packed_bytes, unpack_ids
    from pipeline.models.factory import save_state
    from pipeline.models.lm import causal_lm

    vocab = 70_000
    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    docs = tmp_path / "docs"
    docs.mkdir()
    for d in range(12):  # uniform words: a tenth of the ids are above 65,535
        (docs / f"doc{d}.txt").write_text(" ".join(f"w{i}" for i in rng.integers(2, vocab, 200)))
    teacher = {"factory": "pipeline.models.lm:causal_lm", "kwargs": {"d_model": 16, "n_layers": 1, "n_heads": 2},
               "weights": str(tmp_path / "teacher.pt")}
    torch.manual_seed(0)
    save_state(causal_lm(num_classes=vocab, input_shape=(16,), d_model=16, n_layers=1, n_heads=2), teacher["weights"])
    pre = write_yaml(tmp_path / "pre.yaml", {
        "source": {"kind": "text", "files": [str(docs)], "seq_len": 16, "val_fraction": 0.25,
                   "tokenizer": {"uri": str(tmp_path / "tokenizer.json")}},
        "teacher": teacher, "outputs": {"logits": {"mode": "topk", "k": 4, "temperatures": [1.0]}},
        "cache_root": str(tmp_path / "cache"), "batch_size": 32})
    assert main(["precompute", pre]) == 0
    cfg = load_precompute_config(pre)
    m, table = _rows(resolve_target(cfg).uri, "train")
    assert m.num_classes == vocab and m.logits().index_bits == 17
    packed = column(table, TOPK_INDICES)
    assert packed.dtype == np.uint8 and packed.shape[1:] == (packed_bytes(16 * 4, 17),)  # 136 bytes, not 256 as uint32
    ids = unpack_ids(packed, 17, (16, 4))
    model = build_model(ModelSpec.model_validate(teacher), input_shape=(16,), num_classes=vocab).eval()
    with torch.inference_mode():
        z = model(torch.from_numpy(column(table, INPUT_IDS)[:, :-1].astype(np.int64)))
        top = z.to(torch.float16).float().topk(4, dim=-1).indices.numpy()  # the cache describes the float16 teacher
    real = np.arange(16)[None, :] < column(table, LENGTH)[:, None] - 1
    assert (ids[real] == top[real]).mean() > 0.99 and ids[real].max() > 65_535  # ties aside, the teacher's own
    train = {"precompute": pre, "student": {"factory": "pipeline.models.lm:causal_lm", "kwargs": {"d_model": 16, "n_heads": 2, "n_layers": 1}},
             "loss": {"temperature": 1.0, "terms": {"kd": 0.5, "ce": 0.5}}, "epochs": 1, "batch_size": 16, "num_workers": 1,
             "cpus_per_worker": 1, "storage_path": str(tmp_path / "runs"), "name": "wide"}
    assert main(["train", write_yaml(tmp_path / "train.yaml", train)]) == 0
    result = json.loads((tmp_path / "runs" / "wide" / "result.json").read_text())
    assert np.isfinite(result["history"][-1]["train_kd"]) and 0 <= result["metrics"]["val_agreement"] <= 1
