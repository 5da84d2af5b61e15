import os
import time

import pytest

from pipeline.cache.manifest import manifest_uri
from pipeline.cli import main
from tests.conftest import make_cache


def _age(path, seconds):
    old = time.time() - seconds
    for dirpath, _, files in os.walk(path):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old, old))


def test_gc_removes_only_old_incomplete_caches(tmp_path, capsys):
    complete = make_cache(tmp_path / "a")
    stale = make_cache(tmp_path / "b")
    fresh = make_cache(tmp_path / "c")
    root = tmp_path / "root"
    root.mkdir()
    for name, uri in (("complete", complete), ("stale", stale), ("fresh", fresh)):
        os.rename(uri, root / name)
    os.remove(manifest_uri(str(root / "stale")))
    os.remove(manifest_uri(str(root / "fresh")))
    _age(root / "stale", 3 * 3600)
    _age(root / "complete", 3 * 3600)
    assert main(["cache", "gc", str(root), "--older-than", "2h", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and (root / "stale").exists()
    assert main(["cache", "gc", str(root), "--older-than", "2h"]) == 0
    out = capsys.readouterr().out
    assert f"removed: {root}/stale" in out and f"kept (recent): {root}/fresh" in out
    assert not (root / "stale").exists() and (root / "fresh").exists() and (root / "complete").exists()


def test_rm_removes_a_cache_and_names_a_missing_one(tiny_cache, capsys):
    assert main(["cache", "rm", tiny_cache]) == 0
    assert not os.path.exists(tiny_cache)
    assert main(["cache", "rm", tiny_cache]) == 2
    assert "no cache at" in capsys.readouterr().err


def test_bad_age(tmp_path, capsys):
    assert main(["cache", "gc", str(tmp_path), "--older-than", "soon"]) == 2
    assert "bad age" in capsys.readouterr().err


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("5", 5)])
def test_parse_age(text, seconds):
    from pipeline.cache.gc import parse_age

    assert parse_age(text) == seconds
