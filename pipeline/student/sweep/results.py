"""What a finished sweep leaves in its folder: each trial's result.json (and student.pt when it trained
to the end), `sweep.json` and `sweep.md` (the trials sorted by the metric), and `best.yaml`, the
best trial's train config, ready for `distill train`."""

from __future__ import annotations

import math
from typing import Any, Callable

import yaml

from pipeline import rundir, storage
from pipeline.cache.manifest import Manifest
from pipeline.config.sweep import SweepConfig, point_label, value_label
from pipeline.runtime import root_cause
from pipeline.student.sweep.trial import SweepContext, config_of, values_of

SWEEP_FILE = "sweep.json"
TABLE_FILE = "sweep.md"
BEST_FILE = "best.yaml"


def _checkpoint(result, mode: str, trials_path: str, options: storage.Options):
    """The trial's latest checkpoint: Tune's own for direct trials; the Train run's, whose path (on the
    run's filesystem, without a scheme) Tune's report callback adds to the metrics, for train trials."""
    if mode == "direct":
        return result.checkpoint
    path = (result.metrics or {}).get("checkpoint_path")
    if not path:
        return None
    import ray.train

    fs = None if storage.is_local(trials_path) else storage.arrow_filesystem(trials_path, options)[0]
    return ray.train.Checkpoint(path, filesystem=fs)


def collect(cfg: SweepConfig, grid, context: SweepContext, manifest: Manifest, cache_uri: str, mode: str,
            log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per trial (best first), after writing its result.json beside its checkpoints."""
    from pipeline.student.prelude import Prepared, check_student
    from pipeline.student.train.driver import result_record

    options = cfg.train.storage
    trials = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").split("/")[-1]
        values = values_of(result.config)
        trial_cfg = config_of(result.config, context, trial_id)
        row: dict[str, Any] = {"trial_id": trial_id, "values": values, "label": point_label(values),
                               "fields": {f: field_value(trial_cfg, f) for f in cfg.varied()}, "alpha": trial_cfg.alpha}
        if result.error is not None:
            trials.append({**row, "status": "failed", "error": root_cause(result.error)[:300]})
            continue
        run_dir = storage.join(context.trials_path, trial_id)
        rundir.write_config(run_dir, trial_cfg.model_dump(mode="json"), options)
        ready = Prepared(cache_uri, manifest, check_student(trial_cfg, manifest))
        record = result_record(trial_cfg, ready, run_dir, _checkpoint(result, mode, context.trials_path, options),
                               result.metrics, float((result.metrics or {}).get("time_total_s", 0.0)))
        record.sweep = rundir.SweepRecord(name=cfg.name, values=values)
        rundir.write_result(run_dir, record, options)
        last = record.history[-1] if record.history else dict(result.metrics or {})
        done = record.weights is not None
        trials.append({**row, "status": "finished" if done else "stopped early", "metric": last.get(cfg.metric),
                       "epochs": last.get("epoch"), "steps": last.get("step"), "wall_s": record.wall_s, "run_dir": run_dir})
    return sorted(trials, key=lambda t: _rank_key(t, cfg.mode))


def field_value(trial_cfg, field: str) -> Any:
    """A swept field's value in a trial's full config (the base's where the trial did not set it)."""
    if field == "alpha":
        return trial_cfg.alpha
    node: Any = trial_cfg.model_dump(mode="json")
    for part in field.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _rank_key(trial: dict[str, Any], mode: str) -> tuple[int, float]:
    value = trial.get("metric")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, 0.0)
    return (0, -value if mode == "max" else value)


def write_outputs(cfg: SweepConfig, sweep_dir: str, trials: list[dict[str, Any]], wall: float, mode: str, cache_uri: str,
                  log: Callable[[str], None]) -> dict[str, Any] | None:
    """sweep.json, sweep.md and best.yaml; prints the table. Returns the best trial."""
    ranked = [t for t in trials if t.get("metric") is not None]
    best = ranked[0] if ranked else None
    summary = {"name": cfg.name, "metric": cfg.metric, "mode": cfg.mode, "trial_mode": mode, "cache": cache_uri,
               "varied": cfg.varied(), "wall_s": round(wall, 2), "best": best["trial_id"] if best else None,
               "trials": trials, "config": cfg.model_dump(mode="json")}
    options = cfg.train.storage
    rundir.write_json(storage.join(sweep_dir, SWEEP_FILE), summary, options)
    table = table_lines(cfg, trials)
    storage.write_bytes_atomic(storage.join(sweep_dir, TABLE_FILE), ("\n".join(table) + "\n").encode(), options)
    if best is not None:
        best_cfg = dict(rundir.read_result(best["run_dir"], options).config)
        best_cfg.update(name=f"{cfg.name}-best", storage_path=cfg.train.storage_path, cache=cache_uri, precompute=None)
        header = (f"# The best trial of sweep {cfg.name} ({best['trial_id']}: {best['label']}), "
                  f"{cfg.metric} {best['metric']:.4f}.\n# Train it again: distill train {BEST_FILE}\n")
        storage.write_bytes_atomic(storage.join(sweep_dir, BEST_FILE),
                                   (header + yaml.safe_dump(best_cfg, sort_keys=False)).encode(), options)
    for line in table:
        log(line)
    finished = sum(t["status"] == "finished" for t in trials)
    log(f"sweep {cfg.name}: {len(trials)} trials ({finished} to the end) in {wall:.0f}s -> {sweep_dir}"
        + (f"; best {best['trial_id']} ({best['label']}), config in {storage.join(sweep_dir, BEST_FILE)}" if best else ""))
    return best


def table_lines(cfg: SweepConfig, trials: list[dict[str, Any]]) -> list[str]:
    """The trials as a Markdown table, best first."""
    fields = cfg.varied()
    head = ["rank", "trial", *fields, cfg.metric, "epochs", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(trials, 1):
        cells = {f: value_label(v) for f, v in t["fields"].items()}
        metric = f"{t['metric']:.4f}" if t.get("metric") is not None else "-"
        epochs = f"{t['epochs']:g}" if t.get("epochs") is not None else "-"
        lines.append("| " + " | ".join([str(i), t["trial_id"], *(cells.get(f, "-") for f in fields), metric, epochs, t["status"]]) + " |")
    return lines
