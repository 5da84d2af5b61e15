"""`make bench-storage`: what each kind of teacher output costs to keep, and how fast a cache's
shards read from local disk and from an S3 endpoint (moto's server on 127.0.0.1), in one run.

Bytes are Parquet's compressed bytes per column, summed from the shard footers (the manifest's
`column_bytes`). Read throughput is a full `pyarrow.parquet.read_table` of every shard
through the same filesystems the pipeline uses, best of 3; the S3 figure is reported as a ratio
to local disk. Writes runs/bench/storage.json and storage.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import pyarrow.parquet as pq

from jobs.benchmarks.common import machine, write_report
from pipeline import storage
from pipeline.cache.catalog import list_caches
from pipeline.cache.manifest import Manifest, TapRecord, read_manifest
from pipeline.errors import DistillError

_INPUTS = {"sample_id": "ids", "x": "input", "label": "label", "input_ids": "input", "length": "input"}


def output_kinds(uri: str, manifest: Manifest) -> dict[str, dict[str, float]]:
    """column -> {kind, bytes_per_row}: what each stored signal costs."""
    kinds = {}
    for o in manifest.outputs:
        kind = f"tap:{o.kind}" if isinstance(o, TapRecord) else f"tokens:{o.mode}" if manifest.task == "tokens" else "logits"
        kinds.update({c: kind for c in o.columns})
    per_row = manifest.bytes_per_row()
    out = {}
    for col, b in per_row.items():
        kind = _INPUTS.get(col) or kinds.get(col, "other")
        out[col] = {"kind": kind, "bytes_per_row": b}
    return out


def read_seconds(uri: str, manifest: Manifest, options: storage.Options = None, repeats: int = 3) -> float:
    fs, root = storage.arrow_filesystem(uri, options)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for shard in manifest.shards:
            pq.read_table(f"{root}/{shard.path}", filesystem=fs)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-roots", nargs="+", default=["runs/cache", "runs/bench/topk/cache"],
                        help="every complete cache under these is measured")
    parser.add_argument("--max-mb", type=float, default=100.0, help="skip caches larger than this for the read test")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args(argv)
    entries = [e for root in args.cache_roots if storage.exists(root) for e in list_caches(root) if e.complete]
    if not entries:
        print(f"error: no complete cache under {args.cache_roots} — run `make demo` or `make methods` first", file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    rows = []
    try:
        host, port = server.get_host_and_port()
        s3_options = storage.StorageOptions(endpoint_url=f"http://{host}:{port}")
        s3, _ = storage.filesystem("s3://bench/x", s3_options)
        s3.mkdir("bench")
        for e in entries:
            m = read_manifest(e.uri)
            row = {"cache_id": m.cache_id, "rows": m.rows, "mb": round(m.bytes / 1e6, 2),
                   "mode": m.logits().mode, "outputs": output_kinds(e.uri, m),
                   "tokens_per_row": m.input_shape[0] if m.task == "tokens" else None}
            if m.bytes / 1e6 <= args.max_mb:
                local_s = read_seconds(e.uri, m)
                s3.put(storage.local_path(e.uri), f"bench/{m.cache_id}", recursive=True)
                s3_s = read_seconds(f"s3://bench/{m.cache_id}", m, s3_options)
                row.update({"local_mb_per_s": round(m.bytes / 1e6 / local_s, 1), "local_rows_per_s": round(m.rows / local_s),
                            "s3_mb_per_s": round(m.bytes / 1e6 / s3_s, 1), "s3_rows_per_s": round(m.rows / s3_s),
                            "s3_over_local": round(local_s / s3_s, 3)})
            rows.append(row)
            print(f"{m.cache_id}: {row['mb']} MB, {json.dumps({c: o['bytes_per_row'] for c, o in row['outputs'].items()})}", flush=True)
    except DistillError as err:
        print(f"error: {err.line()}", file=sys.stderr)
        return 2
    finally:
        server.stop()
    summary = {"caches": rows, "machine": machine(), "command": "make bench-storage"}
    md = ["| cache | mode | rows | MB | teacher bytes per row (per token for token caches) | local read MB/s | "
          "S3 (moto) read MB/s | S3 / local |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["tokens_per_row"] or 1
        outs = ", ".join(f"{c} ({o['kind']}) {o['bytes_per_row'] / per:.0f}" for c, o in r["outputs"].items()
                         if o["kind"] not in ("ids", "input", "label"))
        md.append(f"| {r['cache_id']} | {r['mode']} | {r['rows']} | {r['mb']} | {outs} | {r.get('local_mb_per_s', '-')} | "
                  f"{r.get('s3_mb_per_s', '-')} | {r.get('s3_over_local', '-')} |")
    write_report(args.out, "storage", summary, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
