"""`distill cache ls | show | verify | rm | gc`: inspect and look after caches."""

from __future__ import annotations

import argparse

from pipeline.cli.options import add_storage_args, storage_options


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from pipeline.cache.catalog import list_caches

    entries = list_caches(args.root, storage_options(args, args.root, "cache root"))
    if not entries:
        print(f"no caches under {args.root}")
        return 0
    print(f"{'cache_id':<18} {'state':<10} {'rows':>8} {'MB':>9}  {'created':<25} teacher")
    for e in entries:
        state = "complete" if e.complete else "INCOMPLETE"
        rows = f"{e.rows}" if e.rows is not None else "-"
        mb = f"{e.bytes / 1e6:.2f}" if e.bytes is not None else "-"
        print(f"{e.cache_id:<18} {state:<10} {rows:>8} {mb:>9}  {e.created or '-':<25} {e.teacher or '-'}")
    return 0


def cmd_cache_show(args: argparse.Namespace) -> int:
    from pipeline.cache.manifest import TapRecord, ViewsRecord, read_manifest
    from pipeline.cache.values import describe_nonfinite, nonfinite_values

    options = storage_options(args, args.uri, "cache")
    m = read_manifest(args.uri, options)
    if args.json:
        print(m.to_json(), end="")
        return 0
    print(f"cache {m.cache_id} (format v{m.format_version}, {m.task}) created {m.created}")
    for name, t in m.teachers.items():
        width = f" logits={t.logit_width} ({t.dropped_logit_rows} padded rows dropped)" if t.dropped_logit_rows else ""
        print(f"  teacher  {name}: {t.factory} weights={t.weights} sha256={t.weights_sha256 or t.files_sha256}{width}")
    tokenizer = f" tokenizer={m.dataset.tokenizer.digest} ({m.dataset.tokenizer.vocab_size} tokens)" if m.dataset.tokenizer else ""
    print(f"  dataset  {m.dataset.kind} fingerprint={m.dataset.fingerprint}{tokenizer}")
    for out in m.outputs:
        size = f"{out.bytes_per_row} bytes/row" + (f", {out.bytes_per_token} bytes/token" if getattr(out, "bytes_per_token", None) else "")
        if isinstance(out, ViewsRecord):
            kinds = ", ".join(t["kind"] for t in out.transforms)
            what = f"{out.count} views per image (view 0 the whole image, the rest {kinds}, seed {out.seed}) {out.shape}"
        elif isinstance(out, TapRecord):
            pool = f", pooled to {out.pool}" if out.pool else ""
            what = f"tap {out.name!r} ({out.kind} of {out.teacher} module {out.module!r}{pool}), {out.dtype} {out.shape}"
        else:
            detail = {"full": lambda o: o.dtype, "topk": lambda o: f"k={o.k} values={o.values} T={o.temperatures}",
                      "sampled": lambda o: f"estimator={o.estimator}{f' head={o.head}' if o.head else ''} k={o.k} T={o.temperatures}",
                      "sequences": lambda o: f"{o.prompt_tokens} prompt + {o.new_tokens} {o.strategy} tokens"}[out.mode](out)
            what = f"{out.mode} logits of {out.teacher} ({detail}) {out.shape}"
        print(f"  output   {', '.join(out.columns)}: {what}, {size}")
    print(f"  rows     {m.rows} ({', '.join(f'{k} {v}' for k, v in m.rows_by_split.items())}); classes {m.num_classes}; input {m.input_shape}")
    print(f"  shards   {len(m.shards)}, {m.bytes / 1e6:.2f} MB, {m.bytes / max(m.rows, 1):.0f} bytes/row")
    print(f"  columns  {', '.join(f'{k}: {v}' for k, v in m.columns.items())}")
    print(f"  stats    {m.stats.model_dump_json()}")
    bad = describe_nonfinite(nonfinite_values(args.uri, m, options))
    print(f"  values   teacher outputs all finite" if not bad else "\n".join(f"  values   NOT FINITE: {line}" for line in bad))
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from pipeline.cache.verify import verify_cache

    problems = verify_cache(args.uri, storage_options(args, args.uri, "cache"))
    if not problems:
        print(f"ok: {args.uri} is sound")
        return 0
    for p in problems:
        print(f"problem: {p}")
    print(f"{len(problems)} problem(s) in {args.uri}; recompute it with `distill precompute CONFIG --force`")
    return 1


def cmd_cache_rm(args: argparse.Namespace) -> int:
    from pipeline.cache.gc import remove_cache

    remove_cache(args.uri, storage_options(args, args.uri, "cache"))
    print(f"removed {args.uri}")
    return 0


def cmd_cache_gc(args: argparse.Namespace) -> int:
    from pipeline.cache.gc import collect_garbage, parse_age

    options = storage_options(args, args.root, "cache root")
    found = collect_garbage(args.root, parse_age(args.older_than), dry_run=args.dry_run, options=options)
    for c in found:
        verb = "removed" if c.removed else ("would remove" if args.dry_run and c.age_s > parse_age(args.older_than) else "kept (recent)")
        print(f"{verb}: {c.uri} (incomplete, last change {c.age_s / 3600:.1f} h ago)")
    if not found:
        print(f"no incomplete caches under {args.root}")
    return 0


def register(sub) -> None:
    cache = sub.add_parser("cache", help="inspect caches").add_subparsers(dest="cache_command", required=True)
    p = cache.add_parser("ls", help="list the caches under a root")
    p.add_argument("root")
    add_storage_args(p)
    p.set_defaults(func=cmd_cache_ls)
    p = cache.add_parser("show", help="print a cache's manifest")
    p.add_argument("uri")
    p.add_argument("--json", action="store_true")
    add_storage_args(p)
    p.set_defaults(func=cmd_cache_show)
    p = cache.add_parser("rm", help="delete a cache (manifest first)")
    p.add_argument("uri")
    add_storage_args(p)
    p.set_defaults(func=cmd_cache_rm)
    p = cache.add_parser("gc", help="delete incomplete caches (no manifest) older than an age")
    p.add_argument("root")
    p.add_argument("--older-than", default="24h", help="age like 90s, 30m, 24h, 7d (default 24h)")
    p.add_argument("--dry-run", action="store_true")
    add_storage_args(p)
    p.set_defaults(func=cmd_cache_gc)
    p = cache.add_parser("verify", help="check every shard against the manifest (exit 0 only when sound)")
    p.add_argument("uri")
    add_storage_args(p)
    p.set_defaults(func=cmd_cache_verify)
