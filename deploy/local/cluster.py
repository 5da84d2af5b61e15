"""A local multi-node Ray cluster on one machine: a head with the dashboard (Jobs API) on
127.0.0.1 and a second node carrying a custom resource that stands in for a GPU node.

Uses Ray's own multi-node test utility (`ray.cluster_utils.Cluster`), because two
`ray start` on one host clash on ports. `up.sh`/`down.sh` wrap it; the e2e tests call
`start_cluster()` directly.

    python -m deploy.local.cluster up [--state runs/local-cluster.json]   # blocks until SIGTERM
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading

GPU_STAND_IN = "teacher_gpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(head_cpus: int = 2, worker_cpus: int = 2, dashboard_port: int | None = None):
    """Start head + one 'GPU' node; returns (cluster, jobs_url, worker_node_id)."""
    import ray
    from ray.cluster_utils import Cluster

    # Nodes inherit this environment: the venv's python first on PATH (job entrypoints run
    # `python`), and whatever AWS credentials the environment holds (never the job metadata).
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("RAY_num_workers_soft_limit", "16")
    port = dashboard_port or free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
    })
    worker = cluster.add_node(num_cpus=worker_cpus, resources={GPU_STAND_IN: 1})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    ray.shutdown()
    return cluster, f"http://127.0.0.1:{port}", worker.node_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--state", default="runs/local-cluster.json")
    parser.add_argument("--head-cpus", type=int, default=2)
    parser.add_argument("--worker-cpus", type=int, default=2)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    args = parser.parse_args(argv)
    cluster, url, node = start_cluster(args.head_cpus, args.worker_cpus, args.dashboard_port)
    os.makedirs(os.path.dirname(os.path.abspath(args.state)), exist_ok=True)
    with open(args.state, "w") as f:
        json.dump({"jobs_address": url, "gcs_address": cluster.address, "gpu_stand_in_node": node, "pid": os.getpid()}, f)
    print(f"cluster up: RAY_ADDRESS={url}  (GCS {cluster.address}; node {node} has {{'{GPU_STAND_IN}': 1}})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    cluster.shutdown()
    os.remove(args.state)
    print("cluster down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
