"""Connecting to Ray, keeping its output quiet, and the one place that touches Ray's internals.

Everything here that depends on something Ray does not publish (an environment knob read by its
C++ core, a private logger, the name Ray Data gives its actors) is named in `RAY_INTERNALS`, and
`tests/unit/test_ray_internals.py` checks each against the installed Ray, so an upgrade that
moves one fails that test instead of silently slowing or flooding a run.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from urllib.parse import urlparse

from pipeline.errors import DistillError

# Logical CPUs for a local Ray. Ray Data's budget stalls when Train workers hold most of a
# 2-CPU node, so a small machine is given a few more logical CPUs than it has cores.
LOCAL_MIN_CPUS = 4
VERBOSE_ENV = "DISTILL_VERBOSE"  # set by `distill -v`: Ray's own progress and INFO logs are shown

# Ray Train V2 workers block in report() until the controller polls the result queue, which it
# does every health-check interval (2 s by default): that was 85% of an epoch here.
TRAIN_HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Ray keeps at most `num_cpus` idle worker processes (a raylet setting). Ray Train and Ray Data park
# ~6 helper actors, so with 4 logical CPUs every per-epoch read task started a fresh Python process.
WORKERS_SOFT_LIMIT_ENV = "RAY_num_workers_soft_limit"
# Ray Data's documented logging-config variable; ours keeps its console at ERROR (see the YAML).
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
# Tune's console reporter: "0" selects the older one, which prints nothing at verbose=0 (the newer
# prints an experiment box and result paths whatever the verbosity).
TUNE_NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's token authentication: "token" or "disabled"
RAY_DATA_LOGGING = os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")
RAY_INTERNALS = {
    TRAIN_HEALTH_CHECK_ENV: "ray.train.v2._internal.constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR",
    WORKERS_SOFT_LIMIT_ENV: "a RayConfig flag compiled into ray/_raylet.so",
    "train report logger": "ray.train.v2._internal.execution.context.logger (logs every report's metrics at INFO)",
    "map worker actor name": "ray.data._internal.execution.operators.actor_pool_map_operator.get_map_worker_cls_name",
    TUNE_NEW_OUTPUT_ENV: "ray.tune.experimental.output.get_air_verbosity reads it",
    RAY_DATA_LOGGING_ENV: "ray_data_logging.yaml names Ray Data's handler and filter classes (ray.data._internal.logging)",
}
# What a submitted job's processes need from the submitting side (never credentials).
JOB_ENV = {TRAIN_HEALTH_CHECK_ENV: "0.25"}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


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
        configure_data_context()  # this driver's datasets, whoever connected first
        return
    for name, value in JOB_ENV.items():
        os.environ.setdefault(name, value)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise DistillError(
            f"{address} is a Ray dashboard (Jobs API) address",
            "use `distill submit ...` to run the stage on that cluster as a Ray Job, "
            "or give the cluster's GCS address (host:6379) to run this driver there",
        )
    level = logging.INFO if verbose() else logging.WARNING
    if address:
        probe(address)
        try:
            ray.init(address=address, logging_level=level)
        except Exception as e:
            error = auth_error(e, address)
            if error is None:
                raise
            raise error from None
    else:
        cpus = int(os.environ.get("DISTILL_LOCAL_CPUS", max(LOCAL_MIN_CPUS, os.cpu_count() or 1)))
        # Idle workers kept warm (see WORKERS_SOFT_LIMIT_ENV): cut a 1-worker student from ~5,000 to ~900 samples/s.
        os.environ.setdefault(WORKERS_SOFT_LIMIT_ENV, str(max(16, 2 * cpus)))
        if not verbose():  # every process of the local Ray inherits it: Ray Data's actors log to the file only
            os.environ.setdefault(RAY_DATA_LOGGING_ENV, RAY_DATA_LOGGING)
            # A local Ray turns token authentication on by default and says so at WARNING on every start.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # The dashboard serves the state API, which Ray Train's placement-group cleaner polls.
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", logging_level=level)
    configure_data_context()


def configure_data_context() -> None:
    """Ray Data settings for this pipeline, applied in the driver before datasets are built.

    Ray 2.60 routes read_parquet through DataSourceV2 (ListFiles -> ReadFiles) by default; on a
    2-core machine each execution of it costs 1.5-3 s even for a 100 KB file, against 0.1 s
    for the V1 reader, and stage 2 re-reads its shards every epoch. Override with
    RAY_DATA_USE_DATASOURCE_V2=1. Unless verbose, Ray Data's progress lines and plans stay out
    of the user's terminal: our own progress lines say the same in one line.
    """
    import ray.data
    from ray.data.extensions import FixedShapeTensorFormat

    ctx = ray.data.DataContext.get_current()
    # Per-row tensors as Arrow's canonical `arrow.fixed_shape_tensor`, not Ray's own extension type:
    # the cache is then readable by any Arrow tool without Ray (see pipeline/cache/tensors.py).
    ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        ctx.use_datasource_v2 = False
    if not verbose():
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def quiet_stopped_process() -> None:
    """Ray ends a stopped actor (an early-stopped trial, a worker group shut down) with SystemExit,
    which can land inside a garbage-collector callback; Python then prints it as "Exception ignored
    in ... Traceback ... SystemExit" on the user's console. That is the process doing as told: only
    that is dropped, any other error in a callback still prints."""
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    sys.unraisablehook = hook


def quiet_train_worker() -> None:
    """In a Train worker: Ray Train V2 logs every `report()` with its whole metrics dict at INFO
    (calibration bins included), and Ray Data a line per epoch's dataset execution; our epoch line
    says it in one line."""
    if verbose():
        return
    quiet_stopped_process()
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # checked by the test of RAY_INTERNALS
        return
    context.logger.setLevel(logging.WARNING)


def map_worker_class_name(udf: type) -> str:
    """The actor class name Ray Data gives the actors of `map_batches(udf)` (used to find them in the state API)."""
    return f"MapWorker(MapBatches({udf.__name__}))"


def actor_nodes(class_name: str) -> list[str]:
    """Node ids where this job's actors of `class_name` ran (Ray's state API; empty when unavailable)."""
    import ray
    from ray.util.state import list_actors

    try:
        actors = list_actors(filters=[("class_name", "=", class_name), ("job_id", "=", ray.get_runtime_context().get_job_id())],
                             limit=10_000, timeout=10, raise_on_missing_output=False)
    except Exception:  # no dashboard, or an old cluster: the stat is informative, not required
        return []
    return sorted({a.node_id for a in actors if a.node_id})


_AUTH_SIGNS = ("Authentication required", "InvalidAuthToken", "Unauthenticated", "authentication token")


def auth_error(e: BaseException, address: str) -> DistillError | None:
    """The one line for a cluster that wants Ray's token authentication (Ray 2.60 turns it on for any
    `ray start --head` on a machine where a local Ray has run), or None for any other failure."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if not any(type(x).__name__ == "AuthenticationError" or any(s in str(x) for s in _AUTH_SIGNS) for x in chain):
        return None
    mode = os.environ.get(AUTH_MODE_ENV)
    now = f" (RAY_AUTH_MODE is {mode!r})" if mode else " (RAY_AUTH_MODE is not set)"
    return DistillError(f"the Ray cluster at {address} requires token authentication{now}",
                        "set RAY_AUTH_MODE=token with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
                        "(see docs/cluster.md, Ray token authentication)")


def root_cause(e: BaseException) -> str:
    """The user-facing line inside a Ray error: our own DistillError if a task or actor raised one,
    else `Type: last line` of the innermost cause. Ray wraps a worker's exception in `RayTaskError`
    (its `.cause` is the original) and Train wraps that again (`__cause__`)."""
    from pipeline.errors import DistillError

    marker = "DistillError: "  # a DistillError Ray could not carry as itself: only its text came back
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DistillError):
            return e.line()
        text = str(e)
        if marker in text:
            return text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException):
            e = inner
        elif e.__cause__ is not None:
            e = e.__cause__
        else:
            break
    text = str(e)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__
