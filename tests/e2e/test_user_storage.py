"""Commands that take a URI instead of a config, run as a user runs them (the installed `distill` in a
fresh process) against an S3 server (moto on 127.0.0.1): they reach it through `--endpoint-url` or
the standard AWS_ENDPOINT_URL, and a location they cannot use is one line with exit 2."""

from __future__ import annotations


import pytest
import yaml

from tests.cli import distill
from tests.conftest import DIGITS_PRECOMPUTE
from deploy.local.s3 import S3Proxy, moto_s3

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def s3():
    import ray

    if ray.is_initialized():  # an earlier module's local Ray: this module's commands start their own
        ray.shutdown()
    with moto_s3() as (endpoint, fs):
        yield endpoint, fs


@pytest.fixture(scope="module")
def made(s3, head, tmp_path_factory):
    """A digits teacher, its cache (written by Ray: tensor columns) and a student run whose storage is S3,
    both stages on the cluster RAY_ADDRESS names."""
    endpoint, fs = s3
    root = tmp_path_factory.mktemp("user")
    pre = yaml.safe_load(open(DIGITS_PRECOMPUTE))
    pre.update(cache_root=str(root / "cache"))
    pre["teacher"].update(weights=str(root / "teacher.pt"), fit={"epochs": 2, "shift": 0})
    (root / "precompute.yaml").write_text(yaml.safe_dump(pre))
    train = {"precompute": "precompute.yaml", "student": {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [16]}},
             "epochs": 2, "num_workers": 1, "cpus_per_worker": 0.5, "name": "s3-run", "storage_path": "s3://distill/runs",
             "storage": {"endpoint_url": endpoint}}
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    for args in (["fit-teacher", "precompute.yaml"], ["precompute", "precompute.yaml"], ["train", "train.yaml"]):
        ran = distill(*args, cwd=str(root), env=head.env)
        assert ran.code == 0, ran.err[-3000:]
    cache = next(p for p in (root / "cache").iterdir() if not p.name.startswith("_"))
    fs.put(str(cache), f"distill/cache/{cache.name}", recursive=True)
    return {"root": root, "cache": cache, "s3_cache": f"s3://distill/cache/{cache.name}", "endpoint": endpoint}


def test_verify_in_a_fresh_process_calls_a_sound_cache_sound(made):
    ran = distill("cache", "verify", str(made["cache"]))
    assert ran.code == 0 and ran.out.startswith("ok: ") and "sound" in ran.out, ran.out[-2000:]


def test_uri_commands_reach_an_s3_compatible_server(made):
    flags = ["--endpoint-url", made["endpoint"]]
    ls = distill("cache", "ls", "s3://distill/cache", *flags)
    assert ls.code == 0 and made["cache"].name in ls.out and "complete" in ls.out
    show = distill("cache", "show", made["s3_cache"], *flags)
    assert show.code == 0 and "format v2" in show.out and "teacher_logits" in show.out
    verify = distill("cache", "verify", made["s3_cache"], *flags)
    assert verify.code == 0 and "is sound" in verify.out, verify.out[-2000:]
    # The standard environment variable works as well as the flag.
    env_verify = distill("cache", "verify", made["s3_cache"], env={"AWS_ENDPOINT_URL": made["endpoint"]})
    assert env_verify.code == 0, env_verify.err
    resume = distill("train", "--resume", "s3://distill/runs/s3-run", *flags)
    assert resume.code == 0 and "already finished" in resume.out, resume.err[-2000:]
    report = distill("report", "s3://distill/runs/s3-run", "--out", str(made["root"] / "report.html"), *flags)
    assert report.code == 0 and (made["root"] / "report.html").stat().st_size > 10_000, report.err[-2000:]
    gc = distill("cache", "gc", "s3://distill/cache", "--older-than", "0s", *flags)
    assert gc.code == 0 and "no incomplete caches" in gc.out


def test_removing_every_cache_leaves_a_root_that_lists_none(made, s3):
    _, fs = s3
    fs.put(str(made["cache"]), "distill/gone/onlycache000000", recursive=True)
    flags = ["--endpoint-url", made["endpoint"]]
    assert distill("cache", "rm", "s3://distill/gone/onlycache000000", *flags).code == 0
    ls = distill("cache", "ls", "s3://distill/gone", *flags)
    assert ls.code == 0 and ls.out.strip() == "no caches under s3://distill/gone"


@pytest.mark.parametrize("case", ["no endpoint answers", "no such bucket", "denied"])
def test_a_location_that_cannot_be_used_is_one_line(made, case):
    if case == "no endpoint answers":
        ran = distill("cache", "ls", "s3://distill/cache", "--endpoint-url", "http://127.0.0.1:9")
        assert "does not answer" in ran.one_line_error() and "--endpoint-url" in ran.err
    elif case == "no such bucket":
        ran = distill("cache", "show", "s3://nosuchbucket/cache/x", "--endpoint-url", made["endpoint"])
        assert "bucket 'nosuchbucket'" in ran.one_line_error() and "does not exist" in ran.err
    else:
        proxy = S3Proxy(made["endpoint"], lambda method, path, n: (403, "AccessDenied"))
        try:
            ran = distill("train", "--resume", "s3://distill/runs/s3-run", "--endpoint-url", proxy.endpoint)
        finally:
            proxy.close()
        assert "access denied to bucket 'distill'" in ran.one_line_error()
    assert ran.code == 2 and "Traceback" not in ran.err


def test_a_cache_that_is_not_there_is_one_line(made):
    ran = distill("cache", "verify", "s3://distill/cache/0000000000000000", "--endpoint-url", made["endpoint"])
    assert ran.code == 1 and "no manifest.json" in ran.out  # verify reports problems on stdout, exit 1
    show = distill("cache", "show", "s3://distill/cache/0000000000000000", "--endpoint-url", made["endpoint"])
    assert show.code == 2 and "no cache at s3://distill/cache/0000000000000000" in show.one_line_error()
