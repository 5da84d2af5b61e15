import copy

import pytest
import torch

from pipeline.teacher.identity import resolve_target
from pipeline.cache.key import cache_identity, cache_key
from pipeline.config import load_precompute_config
from pipeline.models.builtin import digits_cnn
from pipeline.models.factory import save_state

BASE = cache_identity(
    teacher={"factory": "m:f", "kwargs": {"width": 32}, "weights_sha256": "abc"},
    dataset={"kind": "digits", "fingerprint": "f00", "split": {"val_fraction": 0.2, "split_seed": 0}},
    outputs={"logits": {"mode": "full", "dtype": "float16"}},
)


def test_key_is_deterministic_and_short():
    assert cache_key(BASE) == cache_key(copy.deepcopy(BASE))
    assert len(cache_key(BASE)) == 16


def test_key_ignores_dict_order():
    reordered = {k: BASE[k] for k in reversed(list(BASE))}
    assert cache_key(reordered) == cache_key(BASE)


@pytest.mark.parametrize("path,value", [
    (("teacher", "factory"), "m:g"),
    (("teacher", "kwargs"), {"width": 64}),
    (("teacher", "weights_sha256"), "abd"),
    (("dataset", "fingerprint"), "f01"),
    (("dataset", "split"), {"val_fraction": 0.3, "split_seed": 0}),
    (("outputs", "logits"), {"mode": "full", "dtype": "float32"}),
    (("format_version",), 2),
])
def test_key_changes_with_every_content_input(path, value):
    changed = copy.deepcopy(BASE)
    node = changed
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    assert cache_key(changed) != cache_key(BASE)


def test_config_key_follows_weights_and_ignores_scheduling(digits_precompute_yaml, tmp_path):
    cfg = load_precompute_config(digits_precompute_yaml)
    torch.manual_seed(0)
    save_state(digits_cnn(), cfg.teacher.weights)
    key = resolve_target(cfg).cache_id
    # Scheduling knobs do not change the content...
    assert resolve_target(load_precompute_config(digits_precompute_yaml, ["batch_size=7", "num_actors=3"])).cache_id == key
    # ...but the cache root moves the URI, not the id.
    moved = resolve_target(load_precompute_config(digits_precompute_yaml, [f"cache_root={tmp_path}/other"]))
    assert moved.cache_id == key and moved.uri != resolve_target(cfg).uri
    # Different weights, different key.
    torch.manual_seed(1)
    save_state(digits_cnn(), cfg.teacher.weights)
    assert resolve_target(cfg).cache_id != key
    assert resolve_target(load_precompute_config(digits_precompute_yaml, ["source.val_fraction=0.3"])).cache_id != resolve_target(cfg).cache_id
