"""One `ray start --head` cluster (token authentication on, the Jobs API, fake S3 credentials in its
environment) for the e2e modules that need a one-node cluster, and the environment a `distill` command
needs to join it, as a user's shell with RAY_ADDRESS set does. A command that starts a local Ray of its
own costs about 8 s more here; the modules keep some commands on their own Ray to test that path too."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

from deploy.local.s3 import FAKE_CREDENTIALS
from tests.raycluster import ray_head

TOKEN = {"RAY_AUTH_MODE": "token"}


@dataclass(frozen=True)
class Head:
    gcs: str
    url: str

    @property
    def env(self) -> dict[str, str]:
        """What a `distill` command needs to run its Ray work on this cluster instead of a local Ray."""
        return {"RAY_ADDRESS": self.gcs, **TOKEN}


@pytest.fixture(scope="session")
def head():
    import ray

    if ray.is_initialized():  # the integration session's local Ray
        ray.shutdown()
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin", "HOME": os.environ["HOME"], **TOKEN, **FAKE_CREDENTIALS}
    with ray_head(sys.executable, env) as (gcs, url):
        yield Head(gcs, url)
