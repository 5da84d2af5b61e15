"""A `ray start --head` cluster with Ray's token authentication on (Ray 2.60's default once a local Ray
has run on the machine), reached as a user reaches it: a client that has not set RAY_AUTH_MODE gets
one line saying what to set, and nothing is submitted."""

from __future__ import annotations

import pytest
import yaml

from tests.cli import distill

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def cluster(head):
    return head.gcs, head.url


@pytest.fixture
def train_yaml(tmp_path, tiny_cache):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"cache": tiny_cache, "student": {"factory": "pipeline.models.builtin:mlp"}, "epochs": 1, "batch_size": 16,
                                    "num_workers": 1, "storage_path": str(tmp_path / "runs"), "name": "secured"}))
    return str(path)


def test_jobs_api_without_the_token_mode_is_one_line(cluster, train_yaml):
    _, url = cluster
    for args in (["jobs", "ls", "--address", url], ["submit", "train", train_yaml, "--address", url, "--wait"]):
        ran = distill(*args)
        line = ran.one_line_error()
        assert ran.code == 2 and f"the Ray cluster at {url} requires token authentication" in line
        assert "RAY_AUTH_MODE is not set" in line and "set RAY_AUTH_MODE=token" in line
    ok = distill("jobs", "ls", "--address", url, env={"RAY_AUTH_MODE": "token"})
    assert ok.code == 0 and "secured" not in ok.out  # the refused submission left no job behind


def test_a_driver_joining_the_cluster_without_the_token_mode_says_what_to_set(cluster, train_yaml):
    gcs, _ = cluster
    ran = distill("train", train_yaml, "--address", gcs)
    last = ran.err.strip().splitlines()[-1]
    assert ran.code == 2 and "Traceback" not in ran.err
    assert last.startswith(f"error: the Ray cluster at {gcs} requires token authentication") and "RAY_AUTH_MODE=token" in last
