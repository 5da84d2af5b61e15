"""One local Ray for the whole integration session, and one digits teacher + cache shared by its tests."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import DIGITS_PRECOMPUTE, write_yaml


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from pipeline.runtime import ensure_ray
    from deploy.local.s3 import set_fake_credentials

    set_fake_credentials()  # before Ray starts, so its workers inherit them, as on a real cluster
    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_stage1(ray_session, tmp_path_factory):
    """A trained digits teacher and its cache, computed once through the real CLI."""
    from pipeline.cli import main
    from pipeline.config import load_precompute_config

    root = tmp_path_factory.mktemp("digits")
    data = yaml.safe_load(open(DIGITS_PRECOMPUTE))
    data["cache_root"] = str(root / "cache")
    data["teacher"]["weights"] = str(root / "teacher.pt")
    data["teacher"]["fit"]["epochs"] = 10
    path = write_yaml(root / "precompute.yaml", data)
    assert main(["fit-teacher", path]) == 0
    assert main(["precompute", path]) == 0
    cfg = load_precompute_config(path)
    return {"root": root, "config_path": path, "config": cfg}
