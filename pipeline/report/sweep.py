"""`distill report SWEEP_DIR`: one self-contained HTML page over a sweep's trials.

The trials side by side (sorted by the sweep's metric), the metric against each swept field, and the
curves of the best trials beside the best hard-label trial when the sweep has one. Reads only the
sweep's folder (`sweep.json` and each trial's `result.json`): no Ray, no torch.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

from matplotlib.figure import Figure

from pipeline import storage
from pipeline.config.sweep import value_label
from pipeline.errors import DistillError
from pipeline.report.html import CSS, DPI, FIGSIZE, img, row, section, table
from pipeline.rundir import RunResult, read_result

SWEEP_FILE = "sweep.json"  # as pipeline.student.sweep.results writes it
BEST_CURVES = 3


def is_sweep(path: str, options: storage.Options = None) -> bool:
    return storage.exists(storage.join(path, SWEEP_FILE), options)


def write_sweep_report(sweep_dir: str, out_path: str | None = None, options: storage.Options = None) -> str:
    """Write the sweep's page; returns its path (default: report.html in the sweep's folder)."""
    try:
        sweep = json.loads(storage.read_bytes(storage.join(sweep_dir, SWEEP_FILE), options))
    except (ValueError, UnicodeDecodeError) as e:
        raise DistillError(f"{sweep_dir}/{SWEEP_FILE} is unreadable: {e}", "run the sweep again with --resume") from None
    trials = sweep["trials"]
    results = {t["trial_id"]: read_result(t["run_dir"], options) for t in trials if t.get("run_dir")}
    metric, fields = sweep["metric"], sweep["varied"]
    sections = [_trials_table(sweep, trials), _claim(sweep, trials), _by_field(trials, metric, fields),
                _curves(trials, results, metric)]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {sweep['name']}</title><style>{CSS}</style>"
            f"</head><body><h1>Sweep {sweep['name']}</h1><p class='why'>{len(trials)} trials ({sweep['trial_mode']} trials) "
            f"on cache <code>{os.path.basename(sweep['cache'].rstrip('/'))}</code>, {metric} ({sweep['mode']}), "
            f"{sweep['wall_s']:.0f} s; generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>"
            f"{''.join(sections)}</body></html>\n")
    out_path = out_path or storage.join(sweep_dir, "report.html")
    storage.write_bytes_atomic(out_path, page.encode(), options)
    return out_path


def _trials_table(sweep: dict[str, Any], trials: list[dict[str, Any]]) -> str:
    fields, metric = sweep["varied"], sweep["metric"]
    rows = [row([str(i), t["trial_id"], *(value_label(t["fields"].get(f)) for f in fields),
                  f"{t['metric']:.4f}" if t.get("metric") is not None else "–",
                  f"{t['epochs']:g}" if t.get("epochs") is not None else "–", t["status"]], num_from=2 + len(fields))
            for i, t in enumerate(trials, 1)]
    return section("Trials", f"Sorted by {metric}, best first; each swept field as the trial ran it. Trials stopped early "
                    "by the scheduler show the epoch they reached.", table(["rank", "trial", *fields, metric, "epochs", "status"], rows))


def _hard(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials that trained on hard labels alone (alpha 0), with a metric."""
    return [t for t in trials if t.get("alpha") == 0.0 and t.get("metric") is not None]


def _claim(sweep: dict[str, Any], trials: list[dict[str, Any]]) -> str:
    distilled = [t for t in trials if t.get("metric") is not None and t.get("alpha") != 0.0]
    hard, metric = _hard(trials), sweep["metric"]
    if not distilled or not hard:
        return ""
    best, base = distilled[0], hard[0]  # both lists are in the sweep's order, best first
    gain = best["metric"] - base["metric"]
    return section("Best distilled trial against hard labels",
                    "The best trial with a teacher term against the best trial trained on the labels alone (alpha 0), "
                    "from the same cache.",
                    table(["", "trial", "values", metric], [
                        row(["best distilled", best["trial_id"], best["label"], f"{best['metric']:.4f}"], 3),
                        row(["hard labels", base["trial_id"], base["label"], f"{base['metric']:.4f}"], 3),
                        row(["difference", "", "", f"{gain:+.4f}"], 3)]))


def _by_field(trials: list[dict[str, Any]], metric: str, fields: list[str]) -> str:
    """The metric against each swept field: numbers on their own axis, anything else as categories."""
    scored = [t for t in trials if t.get("metric") is not None]
    if not scored or not fields:
        return ""
    fig = Figure(figsize=(3.2 * len(fields), 3.0), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(fields), squeeze=False)[0]
    for ax, field in zip(axes, fields):
        values = [t["fields"].get(field) for t in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = values
        else:
            categories = list(dict.fromkeys(value_label(v) for v in values))
            xs = [categories.index(value_label(v)) for v in values]
            ax.set_xticks(range(len(categories)), categories, rotation=20, fontsize=7)
        colours = ["C1" if t["status"] == "stopped early" else "C0" for t in scored]
        ax.scatter(xs, [t["metric"] for t in scored], c=colours, s=18)
        if numeric and len({v for v in values if v}) > 2 and min(values) > 0 and max(values) / min(values) >= 100:
            ax.set_xscale("log")
        ax.set(title=field, xlabel=field, ylabel=metric)
    return section(f"{metric} by swept field", "One point per trial (orange: stopped early, at the epoch it reached).", img(fig))


def _curves(trials: list[dict[str, Any]], results: dict[str, RunResult], metric: str) -> str:
    chosen = [t for t in trials if t.get("metric") is not None][:BEST_CURVES]
    chosen += [t for t in _hard(trials)[:1] if t not in chosen]
    if not chosen:
        return ""
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for i, t in enumerate(chosen):
        found = results.get(t["trial_id"])
        hist = found.history if found else []
        points = [(h["epoch"], h[metric]) for h in hist if h.get(metric) is not None and h.get("epoch") is not None]
        hard = t.get("alpha") == 0.0
        ax.plot([e for e, _ in points], [v for _, v in points], color=f"C{i}", ls="--" if hard else "-", lw=1.2, marker=".",
                label=f"{t['trial_id']}{' (hard labels)' if hard else ''}: {t['label']}")
    ax.set(xlabel="epoch", ylabel=metric)
    fig.legend(loc="outside lower center", ncols=1, fontsize=7, frameon=False)
    return section("Curves of the best trials", f"{metric} per evaluation of the {BEST_CURVES} best trials"
                    " and the best hard-label trial (dashed).", img(fig))
