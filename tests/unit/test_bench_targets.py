"""`make bench` fails loudly: the target check on a report, without running the benchmark."""

from jobs.benchmarks.stages import check


def _report(teacher=0.85, student=0.93, n4=0.3):
    return {"teacher_stage_efficiency": teacher, "student_stage_efficiency": student,
            "amortisation": [{"n_students": 1, "offline_over_online": 0.7}, {"n_students": 4, "offline_over_online": n4}]}


def test_every_target_met_is_no_miss():
    assert check(_report(), on_gpu=False) == []


def test_each_missed_target_is_named_with_its_value():
    missed = check(_report(teacher=0.79, student=0.5, n4=0.36), on_gpu=False)
    assert len(missed) == 3
    assert missed[0].startswith("teacher_stage_efficiency = 0.790, target >= 0.8")
    assert missed[1].startswith("student_stage_efficiency = 0.500, target >= 0.9")
    assert missed[2].startswith("amortisation_n4 = 0.360, target <= 0.35")


def test_a_gpu_asks_more_of_stage_1_and_sections_not_run_are_not_checked():
    assert check(_report(teacher=0.85), on_gpu=True) == ["teacher_stage_efficiency = 0.850, target >= 0.9"]
    assert check({"student_stage_efficiency": 0.95}, on_gpu=False) == []


def test_stage_2_at_scale_misses_more_than_one_read_per_row_and_slow_sharded_evaluation():
    good = {"read_amplification": {"1": 1.0, "2": 1.01, "4": 1.04}, "eval_seconds_2_over_1": 0.6,
            "student_stage_efficiency_2_workers": 0.85}
    assert check(good, on_gpu=False) == []
    bad = {**good, "read_amplification": {"1": 1.0, "2": 2.0, "4": 4.0}, "eval_seconds_2_over_1": 1.0,
           "student_stage_efficiency_2_workers": 0.7}
    assert check(bad, on_gpu=False) == ["student_stage_efficiency_2_workers = 0.700, target >= 0.81",
                                        "read_amplification_2 = 2.000, target <= 1.05",
                                        "read_amplification_4 = 4.000, target <= 1.05",
                                        "eval_seconds_2_over_1 = 1.000, target <= 0.65"]


def test_the_scale_benchmark_names_each_ratio_that_misses():
    from jobs.benchmarks.scale import missed

    good = {"student_lm_efficiency": 0.95, "teacher_lm_efficiency": 0.85, "fsdp_memory_ratio": 0.5,
            "worker_rss_growth": 1.05, "actor_rss_growth": 1.1, "worker_throughput_growth": 0.98}
    assert missed(good) == []
    bad = {**good, "teacher_lm_efficiency": 0.49, "actor_rss_growth": 1.59}
    assert missed(bad) == ["teacher_lm_efficiency = 0.490, target >= 0.8", "actor_rss_growth = 1.590, target <= 1.2"]


def test_the_shared_check_reads_floors_and_ceilings_and_skips_sections_not_run():
    from jobs.benchmarks.common import Target, missed, targets

    table = targets(Target("efficiency", ">=", 0.8), Target("memory_ratio", "<=", 0.6))
    assert missed({"efficiency": 0.8, "memory_ratio": 0.6}, table) == []
    assert missed({"efficiency": 0.5, "memory_ratio": None}, table) == ["efficiency = 0.500, target >= 0.8"]
    assert missed({"memory_ratio": 0.75}, table) == ["memory_ratio = 0.750, target <= 0.6"]
    assert table["efficiency"].kind == "min" and table["memory_ratio"].kind == "max"


def test_a_report_names_the_accelerator_torch_sees():
    import torch

    from jobs.benchmarks.common import machine, machine_line

    m = machine()
    assert m["cpus"] and m["torch"] == torch.__version__
    if torch.cuda.is_available():
        assert m["gpus"] == torch.cuda.device_count() and m["accelerator"] == torch.cuda.get_device_name(0)
        assert m["accelerator"] in machine_line(m) and "no GPU" not in machine_line(m)
    else:
        assert m["gpus"] == 0 and m["accelerator"] is None
        assert machine_line(m).endswith("no GPU")
    fake = {**m, "gpus": 2, "accelerator": "NVIDIA H100 80GB HBM3"}
    assert machine_line(fake).endswith("2x NVIDIA H100 80GB HBM3")


def test_a_report_is_written_as_json_and_markdown(tmp_path):
    import json

    from jobs.benchmarks.common import write_report

    paths = write_report(str(tmp_path / "bench"), "stages", {"ratio": 0.9}, "| a |\n|---|")
    assert paths == (str(tmp_path / "bench" / "stages.json"), str(tmp_path / "bench" / "stages.md"))
    assert json.loads((tmp_path / "bench" / "stages.json").read_text()) == {"ratio": 0.9}
    assert (tmp_path / "bench" / "stages.md").read_text() == "| a |\n|---|\n"
