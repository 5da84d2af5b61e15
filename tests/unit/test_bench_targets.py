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


def test_the_scale_benchmark_names_each_ratio_that_misses():
    from jobs.benchmarks.scale import missed

    good = {"student_lm_efficiency": 0.95, "teacher_lm_efficiency": 0.85, "fsdp_memory_ratio": 0.5,
            "worker_rss_growth": 1.05, "actor_rss_growth": 1.1, "worker_throughput_growth": 0.98}
    assert missed(good) == []
    bad = {**good, "teacher_lm_efficiency": 0.49, "actor_rss_growth": 1.59}
    assert missed(bad) == ["teacher_lm_efficiency = 0.490, target >= 0.8", "actor_rss_growth = 1.590, target <= 1.2"]
