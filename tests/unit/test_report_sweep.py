"""`distill report SWEEP_DIR` from a synthetic sweep folder: no Ray, no training."""

from __future__ import annotations

import base64
import json
import re

from pipeline.cli import main
from pipeline.report.sweep import is_sweep, write_sweep_report
from tests.unit.test_report import fake_result

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_sweep(root) -> str:
    sweep_dir = root / "sweeps" / "demo"
    trials = []
    for trial_id, alpha, temperature, accuracy, status in (("t2", 0.9, 4.0, 0.96, "finished"), ("t1", 0.5, 2.0, 0.95, "finished"),
                                                           ("t3", 0.0, 4.0, 0.93, "finished"), ("t4", 0.5, 4.0, 0.70, "stopped early")):
        run_dir = sweep_dir / "trials" / trial_id
        run_dir.mkdir(parents=True)
        result = fake_result(trial_id, "/tmp/cache/abc", 0, False)
        result["history"][-1]["val_accuracy"] = accuracy
        (run_dir / "result.json").write_text(json.dumps(result))
        trials.append({"trial_id": trial_id, "values": {"alpha": alpha}, "label": f"alpha={alpha}", "alpha": alpha,
                       "fields": {"loss.temperature": temperature, "alpha": alpha,
                                  "student": {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [128]}}},
                       "status": status, "metric": accuracy, "epochs": 3 if status == "finished" else 1, "run_dir": str(run_dir)})
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "name": "demo", "metric": "val_accuracy", "mode": "max", "trial_mode": "direct", "cache": "/tmp/cache/abc",
        "varied": ["loss.temperature", "alpha", "student"], "wall_s": 42.0, "best": "t2", "trials": trials}))
    return str(sweep_dir)


def test_sweep_page_has_the_sorted_trials_the_claim_and_a_plot_per_field(tmp_path):
    sweep_dir = make_sweep(tmp_path)
    assert is_sweep(sweep_dir) and not is_sweep(str(tmp_path))
    page = open(write_sweep_report(sweep_dir)).read()
    rows = re.findall(r"<tr class=''><td>(\d+)</td><td>(t\d)</td>", page)
    assert rows[:4] == [("1", "t2"), ("2", "t1"), ("3", "t3"), ("4", "t4")]
    assert "mlp(hidden=[128])" in page and "stopped early" in page
    claim = page.split("Best distilled trial against hard labels")[1].split("<h2>")[0]
    assert "t2" in claim and "t3" in claim and "+0.0300" in claim
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG_SIGNATURE) for i in images)


def test_distill_report_on_a_sweep_folder(tmp_path, capsys):
    sweep_dir = make_sweep(tmp_path)
    assert main(["report", sweep_dir]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {sweep_dir}/report.html"
    assert main(["report", sweep_dir, sweep_dir]) == 2
    assert "covers one sweep folder" in capsys.readouterr().err
