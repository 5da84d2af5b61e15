"""Connecting to Ray: a cluster address (argument or RAY_ADDRESS) or a local Ray started in-process."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from urllib.parse import urlparse

from pipeline.errors import DistillError

# Logical CPUs for a local Ray. Ray Data's budget stalls when Train workers hold most of a
# 2-CPU node, so a small machine is given a few more logical CPUs than it has cores.
LOCAL_MIN_CPUS = 4


def probe(address: str, timeout: float = 3.0, default_port: int = 6379) -> None:
    """Fail in seconds with a clear message, instead of Ray's long retry loop, when nothing answers."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise DistillError(
            f"the Ray cluster at {address} does not answer ({e.strerror or e})",
            "check the address and that the head node is up (ray status), or unset RAY_ADDRESS to run locally",
        ) from None


def ensure_ray(address: str | None = None) -> None:
    """Connect once per process. Without an address, start a local Ray sized for this machine."""
    import ray

    if ray.is_initialized():
        return
    # Ray Train V2 workers block in report() until the controller polls the result queue, which
    # it does every health-check interval (2 s by default): that was 85% of an epoch here.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise DistillError(
            f"{address} is a Ray dashboard (Jobs API) address",
            "use `distill submit ...` to run the stage on that cluster as a Ray Job, "
            "or give the cluster's GCS address (host:6379) to run this driver there",
        )
    if address:
        probe(address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        cpus = int(os.environ.get("DISTILL_LOCAL_CPUS", max(LOCAL_MIN_CPUS, os.cpu_count() or 1)))
        # Ray keeps at most `num_cpus` idle worker processes. Ray Train and Ray Data park ~6
        # helper actors, so with 4 logical CPUs every per-epoch read task started a fresh Python
        # process (~2 s of CPU each), which cut a 1-worker student from ~5,000 to ~900 samples/s.
        os.environ.setdefault("RAY_num_workers_soft_limit", str(max(16, 2 * cpus)))
        # The dashboard serves the state API, which Ray Train's placement-group cleaner polls.
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    configure_data_context()


def configure_data_context() -> None:
    """Ray Data settings for this pipeline, applied in the driver before datasets are built.

    Ray 2.60 routes read_parquet through DataSourceV2 (ListFiles -> ReadFiles) by default; on a
    2-core machine each execution of it costs 1.5-3 s even for a 100 KB file, against 0.1 s
    for the V1 reader, and stage 2 re-reads its shards every epoch. Measured in
    jobs/benchmarks; override with RAY_DATA_USE_DATASOURCE_V2=1.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        ctx.use_datasource_v2 = False


@contextmanager
def quiet_data_context():
    """Datasets built inside this block log no progress or plans (they run once per epoch in stage 2)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
