"""Stage 2 finds the cache a precompute config produced from stage 1's record, without hashing
weights, reading the data or training a tokenizer."""

import pytest

from pipeline.cache.catalog import list_caches
from pipeline.cache.index import record_cache, recorded_cache
from pipeline.config import load_precompute_config, load_train_config
from pipeline.errors import DistillError
from pipeline.student.prelude import resolve_cache_uri
from tests.conftest import write_yaml

TEXT = "jobs/configs/text/precompute-topk.yaml"


@pytest.fixture
def text_configs(tmp_path):
    import yaml

    pre = yaml.safe_load(open(TEXT))
    pre["cache_root"] = str(tmp_path / "cache")
    pre_path = write_yaml(tmp_path / "precompute.yaml", pre)
    train = yaml.safe_load(open("jobs/configs/text/train-topk.yaml"))
    train["precompute"] = pre_path
    return pre_path, write_yaml(tmp_path / "train.yaml", train)


def test_the_record_maps_a_recipe_to_its_cache_id(tmp_path):
    recipe = load_precompute_config(TEXT).recipe()
    assert recorded_cache(str(tmp_path), recipe) is None
    record_cache(str(tmp_path), recipe, "abc123")
    assert recorded_cache(str(tmp_path), recipe) == "abc123"
    record_cache(str(tmp_path), recipe, "def456")  # a later precompute of the same config (e.g. refitted weights)
    assert recorded_cache(str(tmp_path), recipe) == "def456"
    assert list_caches(str(tmp_path)) == []  # the record directory is not a cache


def test_the_recipe_is_the_content_as_written_not_the_scheduling():
    base = load_precompute_config(TEXT).recipe()
    assert load_precompute_config(TEXT, ["batch_size=7", "num_actors=3", "cache_root=/elsewhere",
                                         "teacher.fit.epochs=9"]).recipe() == base
    for change in ("outputs.logits.k=16", "source.seq_len=32", "teacher.weights=other.pt", "source.tokenizer.vocab_size=4096"):
        assert load_precompute_config(TEXT, [change]).recipe() != base, change


def test_train_with_precompute_reads_the_record_and_does_no_stage1_work(text_configs, monkeypatch):
    pre_path, train_path = text_configs
    pre = load_precompute_config(pre_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("stage 2 did stage 1's identity work")

    for name in ("pipeline.models.factory.weights_digest", "pipeline.data.tokenizer.train_bpe",
                 "pipeline.data.corpus.read_documents", "pipeline.data.text.TextWindows.describe"):
        monkeypatch.setattr(name, forbidden)
    cfg = load_train_config(train_path)
    with pytest.raises(DistillError) as e:
        resolve_cache_uri(cfg)
    assert "no cache of precompute config" in e.value.problem and f"distill precompute {pre_path}" in e.value.fix
    record_cache(pre.cache_root, pre.recipe(), "0123456789abcdef")
    assert resolve_cache_uri(cfg) == f"{pre.cache_root}/0123456789abcdef"


def test_local_paths_become_absolute_for_jobs_and_records(tmp_path, monkeypatch):
    """A job runs in a copy of the working directory: the client makes local paths absolute, and the
    record's recipe does the same, so a relative and an absolute spelling find the same cache."""
    from pipeline.config import PrecomputeConfig

    monkeypatch.chdir(tmp_path)
    data = {"source": {"kind": "parquet", "uri": "data/table.parquet", "input_columns": ["a"]},
            "teacher": {"factory": "m:f", "weights": "./runs/teacher.pt"}, "cache_root": "s3://bucket/cache"}
    cfg = PrecomputeConfig.model_validate(data)
    fixed = cfg.with_absolute_paths()
    assert fixed.source.uri == str(tmp_path / "data/table.parquet") and fixed.teacher.weights == str(tmp_path / "runs/teacher.pt")
    assert fixed.cache_root == "s3://bucket/cache"  # URIs stay as they are
    spelled = PrecomputeConfig.model_validate({**data, "teacher": {"factory": "m:f", "weights": str(tmp_path / "runs/teacher.pt")}})
    assert spelled.recipe() == cfg.recipe()


def test_a_cache_hit_records_its_config_and_still_works_on_a_read_only_root(tiny_cache, tmp_path, monkeypatch):
    """Caches published before the records existed get one on their next hit; a root the user may
    only read still gives the hit, with a warning naming the cache URI to use instead."""
    import pipeline.teacher.precompute as precompute
    from pipeline.cache.manifest import read_manifest
    from pipeline.config import PrecomputeConfig
    from pipeline.data.sources import SourceInfo
    from pipeline.teacher.identity import CacheTarget

    root = str(tmp_path)
    cfg = PrecomputeConfig.model_validate({"source": {"kind": "digits"}, "teacher": {"factory": "pipeline.models.builtin:digits_cnn"},
                                           "cache_root": root})
    target = CacheTarget(cache_id="cachetest0000000", uri=tiny_cache, identity={}, rows=None,
                         source=SourceInfo("digits", "f", 10, (1, 8, 8), read_manifest(tiny_cache).rows_by_split))
    monkeypatch.setattr(precompute, "resolve_target", lambda cfg: target)
    lines = []
    assert precompute.run_precompute(cfg, log=lines.append).hit
    assert recorded_cache(root, cfg.recipe()) == "cachetest0000000" and lines == [f"cache hit: {tiny_cache}"]

    def denied(*args):
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(precompute, "record_cache", denied)
    lines.clear()
    assert precompute.run_precompute(cfg, log=lines.append).hit
    assert "could not record" in lines[1] and f"cache: {tiny_cache}" in lines[1]
