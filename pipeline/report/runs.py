"""One HTML page comparing finished student runs with their teacher, and what their cache costs.

The page is self-contained (PNG plots as data URIs, inline CSS, no scripts) so it can be attached
to a ticket, mailed, or opened straight from a bucket with no server and no network.
Figures are `matplotlib.figure.Figure` objects rendered by Agg: no pyplot, no global state.
"""

from __future__ import annotations

import html
import math
import os
import re
import statistics
from datetime import datetime, timezone

from matplotlib.figure import Figure

from pipeline import storage
from pipeline.cache.manifest import Manifest, TapRecord, read_manifest
from pipeline.cache.schema import INPUT_IDS, LABEL, LENGTH, SAMPLE_ID, X
from pipeline.errors import DistillError
from pipeline.report.html import CSS, DPI, FIGSIZE, fmt, img, row, section, table
from pipeline.rundir import RunResult, read_result

_SEED_SUFFIX = re.compile(r"-seed\d+$")
_Caches = dict[str, "tuple[Manifest, dict[str, float]] | str"]  # cache URI -> (manifest, bytes per row) or why unreadable
def group_of(name: str) -> str:
    """Runs that differ only by a trailing `-seed<N>` are one student, reported as mean ± std."""
    return _SEED_SUFFIX.sub("", name)


def reliability(bins: dict[str, list[float]]) -> tuple[list[float], list[float], float]:
    """Mean confidence and accuracy of the non-empty bins, and the expected calibration error.

    ECE = sum_i n_i/N * |acc_i - conf_i| (Guo et al., "On Calibration of Modern Neural Networks", 2017).
    """
    total = sum(bins["count"]) or 1
    kept = [(s / n, c / n, n) for n, s, c in zip(bins["count"], bins["confidence_sum"], bins["correct"]) if n]
    ece = sum(n / total * abs(acc - conf) for conf, acc, n in kept)
    return [conf for conf, _, _ in kept], [acc for _, acc, _ in kept], ece


def write_report(run_dirs: list[str], out_path: str | None = None, options: storage.Options = None) -> str:
    """Write the report for these run directories; returns its path (default: beside the first run)."""
    if not run_dirs:
        raise DistillError("no run directories given", "pass one or more directories that `distill train` finished")
    runs = [read_result(d, options) for d in run_dirs]
    caches = _load_caches(runs, options)
    sections = [_runs_table(runs, caches), _curves(runs), _accuracy_bars(runs), _calibration(runs), _cache_sections(caches)]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Distillation report</title><style>{CSS}</style>"
            f"</head><body><h1>Distillation report</h1><p class='why'>{len(runs)} runs, "
            f"generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>{''.join(sections)}</body></html>\n")
    if out_path is None:
        first = run_dirs[0].rstrip("/")
        parent = os.path.dirname(storage.local_path(first)) if storage.is_local(first) else first.rsplit("/", 1)[0]
        out_path = storage.join(parent, "report.html")
    storage.write_bytes_atomic(out_path, page.encode(), options)
    return out_path


def _load_caches(runs: list[RunResult], options: storage.Options) -> _Caches:
    """Each distinct cache once: its manifest and bytes per row, or why it cannot be read (deleted caches are normal)."""
    caches: _Caches = {}
    for uri in dict.fromkeys(r.cache for r in runs if r.cache):
        try:
            manifest = read_manifest(uri, options)
            caches[uri] = manifest, manifest.bytes_per_row()
        except DistillError as e:
            caches[uri] = e.problem
        except (OSError, ValueError) as e:  # shards deleted or damaged under a live manifest (ArrowInvalid is a ValueError)
            caches[uri] = f"{type(e).__name__}: {e}"
    return caches


def _short(uri: str) -> str:
    """The cache id (last path part of a cache URI) names the teacher in legends."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _runs_table(runs: list[RunResult], caches: _Caches) -> str:
    rows = []
    for r in runs:
        m = r.metrics
        terms = ", ".join(f"{k} {v:g}" for k, v in r.loss_terms.items())
        rows.append(row([r.name, r.student or "", terms, "" if r.seed is None else str(r.seed), f"{r.epochs:g}",
                          *(fmt(m.get(k), ".4f") for k in ("val_accuracy", "val_agreement", "val_kl")),
                          fmt(r.wall_s, ".1f")], num_from=3))
    for uri, acc in _teachers(runs).items():
        cache = caches.get(uri)
        factory = cache[0].teacher.factory if isinstance(cache, tuple) else ""
        rows.append(row([f"teacher ({_short(uri)})", str(factory), "", "", "", fmt(acc, ".4f"), "", "", ""], 3, "teacher"))
    header = ["run", "student", "loss terms", "seed", "epochs", "val accuracy", "agreement", "KL", "wall s"]
    return section("Runs", "Final validation metrics of each run; agreement: how often student and teacher pick the same class.",
                    table(header, rows))


def _teachers(runs: list[RunResult]) -> dict[str, float | None]:
    """Teacher validation accuracy per cache: the teacher is fixed by the cache, so every run on it agrees."""
    return {r.cache or "?": r.metrics.get("teacher_val_accuracy") for r in runs}


def _groups(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Runs by student (`group_of`), in the order given."""
    return {g: [r for r in runs if group_of(r.name) == g] for g in dict.fromkeys(group_of(r.name) for r in runs)}


def _curves(runs: list[RunResult]) -> str:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, (group, members) in enumerate(_groups(runs).items()):
        for k, r in enumerate(members):
            hist, label = r.history, None if k else group  # seeds share a colour and one legend entry
            # Reports at checkpoint steps between evaluations have no val_accuracy: each curve keeps its points.
            for ax, key, lab in ((loss_ax, "train_loss", label), (acc_ax, "val_accuracy", None)):
                points = [(h["epoch"], h[key]) for h in hist if h.get(key) is not None and h.get("epoch") is not None]
                ax.plot([e for e, _ in points], [v for _, v in points], color=f"C{i % 10}", lw=1, label=lab)
    for j, acc in enumerate(sorted({a for a in _teachers(runs).values() if a is not None})):
        acc_ax.axhline(acc, color="k", ls="--", lw=0.8, label=None if j else "teacher")
    losses = [h["train_loss"] for r in runs for h in r.history if h.get("train_loss") is not None]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:  # KD terms scale with T²: losses span decades
        loss_ax.set_yscale("log")
    loss_ax.set(title="train loss", xlabel="epoch")
    acc_ax.set(title="val accuracy", xlabel="epoch")
    fig.legend(loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return section("Training curves", "Train loss and validation accuracy per epoch, one line per run (seeds share a colour).",
                    img(fig))


def _mean_std(members: list[RunResult], key: str) -> tuple[float, float]:
    values = [r.metrics.get(key) or 0.0 for r in members]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _accuracy_bars(runs: list[RunResult]) -> str:
    groups = _groups(runs)
    labels = [g if len(members) == 1 else f"{g}\n(n={len(members)})" for g, members in groups.items()]
    acc = [_mean_std(members, "val_accuracy") for members in groups.values()]
    agree = [_mean_std(members, "val_agreement") for members in groups.values()]
    for uri, teacher_acc in _teachers(runs).items():
        labels.append(f"teacher\n{_short(uri)[:8]}")
        acc.append((teacher_acc or 0.0, 0.0))
        agree.append((float("nan"), 0.0))  # a teacher agrees with itself: no bar
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    xs, width = range(len(labels)), 0.38
    for offset, (name, values) in zip((-width / 2, width / 2), (("accuracy", acc), ("agreement", agree))):
        bars = ax.bar([x + offset for x in xs], [m for m, _ in values], width, yerr=[s for _, s in values], capsize=3, label=name)
        ax.bar_label(bars, labels=["" if math.isnan(m) else f"{m:.3f}" for m, _ in values], fontsize=7, padding=2)
    low = min(m for m, _ in acc + agree if not math.isnan(m))  # zoom in: the differences that matter are a few points
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(list(xs), labels, fontsize=8)
    fig.legend(loc="outside upper center", ncols=2, fontsize=8, frameon=False)
    return section("Accuracy and agreement", "Validation accuracy and teacher agreement per student (mean ± std over seeds) "
                    "beside the teacher's accuracy.", img(fig))


def _calibration(runs: list[RunResult]) -> str:
    why = "Reliability diagram: accuracy against confidence per bin; the diagonal is perfect calibration. ECE in the legend."
    students: dict[str, dict[str, list[float]]] = {}
    teachers: dict[str, dict[str, list[float]]] = {}
    calibrated = [r for r in runs if r.metrics.get("calibration")]
    for r in calibrated:
        cal = r.metrics["calibration"]
        if cal.get("teacher"):
            teachers.setdefault(r.cache or "?", cal["teacher"])
        pooled = students.setdefault(group_of(r.name), {k: [0.0] * len(v) for k, v in cal["student"].items()})
        for key, values in cal["student"].items():  # bins are counts and sums: seeds pool by adding
            pooled[key] = [a + b for a, b in zip(pooled[key], values)]
    missing = [r.name for r in runs if r not in calibrated]
    note = f"<p class='note'>No calibration recorded for: {html.escape(', '.join(missing))} (older runs).</p>" if missing else ""
    if not students:
        return section("Calibration", why, note)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    names = list(_groups(runs))
    for group, bins in students.items():
        conf, acc, ece = reliability(bins)
        ax.plot(conf, acc, "o-", ms=3, lw=1, color=f"C{names.index(group) % 10}", label=f"{group} (ECE {ece:.3f})")
    for uri, bins in teachers.items():
        conf, acc, ece = reliability(bins)
        ax.plot(conf, acc, "s--", ms=3, lw=1, color="k", label=f"teacher {_short(uri)[:8]} (ECE {ece:.3f})")
    ax.set(xlabel="mean confidence in bin", ylabel="accuracy in bin", xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.legend(fontsize=8, loc="upper left")
    return section("Calibration", why, img(fig) + note)


def _roles(manifest: Manifest) -> dict[str, str]:
    """Column -> what it holds, from the manifest's outputs."""
    roles = {X: "student input", LABEL: "hard label", SAMPLE_ID: "sample id", INPUT_IDS: "token ids", LENGTH: "tokens in row"}
    for out in manifest.outputs:
        what = (f"tap {out.name}: {out.kind} of {out.teacher}" if isinstance(out, TapRecord)
                else f"{out.count} views per image" if out.mode == "views" else f"{out.mode} logits of {out.teacher}")
        roles.update({column: what for column in out.columns})
    return roles


def _cache_sections(caches: _Caches) -> str:
    parts = []
    for uri, cache in caches.items():
        title = f"<p><code>{html.escape(uri)}</code></p>"
        if isinstance(cache, str):
            parts.append(f"{title}<p class='note'>cache not available: {html.escape(cache)}</p>")
            continue
        manifest, per_row = cache
        # The whole cache beside the source it came from: inputs are stored by reference to the source's
        # own form, so the cache should cost about the source plus the teacher's outputs.
        totals = {"cache (all columns)": manifest.bytes / max(manifest.rows, 1)}
        if manifest.source_bytes:
            totals["source (its own files)"] = manifest.source_bytes / max(manifest.rows, 1)
        bars_of = {**per_row, **totals}
        fig = Figure(figsize=(FIGSIZE[0], 0.6 + 0.4 * len(bars_of)), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        bars = ax.barh(list(bars_of), list(bars_of.values()), color=["C0"] * len(per_row) + ["C1", "C2"][:len(totals)])
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        ax.invert_yaxis()
        ax.set_xlabel("compressed bytes per row")
        ax.margins(x=0.15)
        roles = _roles(manifest)
        rows = [row([name, roles.get(name, ""), manifest.columns.get(name, ""), f"{b:.1f}"], 3) for name, b in per_row.items()]
        rows += [row([name, "", "", f"{b:.1f}"], 3) for name, b in totals.items()]
        summary = f"<p>{manifest.rows:,} rows, {manifest.bytes / 1e6:.2f} MB in {len(manifest.shards)} shards.</p>"
        parts.append(title + summary + img(fig) + table(["column", "role", "type", "bytes/row"], rows))
    return section("Cache size", "Compressed Parquet bytes per row of each column, as the manifest records them: "
                    "what each teacher output costs to keep; then the whole cache's bytes per row beside the "
                    "source's own (inputs are kept in the source's form, so the difference is the teacher's outputs).",
                   "".join(parts))
