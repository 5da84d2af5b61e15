import sys

import pytest
import torch

from pipeline.cache.schema import LABEL, LOGITS, X
from pipeline.config import ModelSpec
from pipeline.models.builtin import digits_cnn, mlp
from pipeline.models.factory import BUILT_IN_THIS_PROCESS, build_model, output_width
from pipeline.student.train.step import make_optimizer, train_epoch
from pipeline.student.train.worker import teacher_evidence
from pipeline.teacher.encode import encode_full_logits
from tests.conftest import in_memory_task


def _batches(n=256, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = digits_cnn().eval()
    x = torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        logits = teacher(x)
    y = logits.argmax(1)
    return [{X: x[i:i + bs], LOGITS: logits[i:i + bs].half().float(), LABEL: y[i:i + bs]} for i in range(0, n, bs)]


def test_train_epoch_reduces_loss_and_eval_reports_metrics():
    torch.manual_seed(0)
    data = _batches()
    student = mlp((1, 8, 8), 10, hidden=(32,))
    opt = make_optimizer(student.parameters(), "adam", 3e-3)
    task = in_memory_task({"kd": 0.7, "ce": 0.3}, 4.0)
    first = train_epoch(student, data, task, opt)
    for _ in range(15):
        last = train_epoch(student, data, task, opt)
    assert last["train_loss"] < first["train_loss"]
    assert first["train_samples"] == 256 and {"train_kd", "train_ce"} <= set(first)
    ev = task.evaluate(student, data)
    assert ev["val_rows"] == 256 and ev["teacher_val_accuracy"] == 1.0  # labels are the teacher's argmax here
    assert ev["val_accuracy"] == ev["val_agreement"]
    assert ev["val_kl"] >= 0


def test_eval_metrics_on_known_logits():
    batch = {X: torch.eye(3), LOGITS: torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]), LABEL: torch.tensor([0, 1, 1])}
    identity = torch.nn.Identity()
    ev = in_memory_task({"kd": 1.0}, 1.0, num_classes=3, input_shape=(3,)).evaluate(identity, [batch])
    assert ev["val_accuracy"] == pytest.approx(2 / 3)
    assert ev["teacher_val_accuracy"] == pytest.approx(2 / 3)
    assert ev["val_agreement"] == 1.0
    assert ev["val_kl"] > 0  # the student's logits (one-hot) are softer than the teacher's


def test_encode_full_logits_dtypes():
    z = torch.tensor([[1.0, -2.5, 3.25]])
    assert encode_full_logits(z, "float16").dtype.name == "float16"
    assert encode_full_logits(z, "float32").tolist() == [[1.0, -2.5, 3.25]]
    with pytest.raises(ValueError):
        encode_full_logits(z[0], "float16")


def test_builders_fill_shape_and_classes():
    model = build_model(ModelSpec(factory="pipeline.models.builtin:mlp", kwargs={"hidden": [16]}), input_shape=(1, 8, 8), num_classes=4)
    assert output_width(model, (1, 8, 8)) == 4
    assert BUILT_IN_THIS_PROCESS[-1] == "pipeline.models.builtin:mlp"


def test_teacher_evidence_detects_a_built_teacher_and_stage1_imports(monkeypatch):
    monkeypatch.setattr("pipeline.student.train.worker.BUILT_IN_THIS_PROCESS", ["pipeline.models.builtin:mlp"])
    monkeypatch.setattr(sys, "modules", {k: v for k, v in sys.modules.items() if not k.startswith("pipeline.teacher")})
    assert teacher_evidence("pipeline.models.builtin:digits_cnn") == []
    monkeypatch.setattr("pipeline.student.train.worker.BUILT_IN_THIS_PROCESS", ["pipeline.models.builtin:digits_cnn"])
    assert teacher_evidence("pipeline.models.builtin:digits_cnn") == ["built pipeline.models.builtin:digits_cnn"]
    monkeypatch.setitem(sys.modules, "pipeline.teacher.predictor", object())
    assert "imported pipeline.teacher.predictor" in teacher_evidence(None)
    # A teacher with weights: reading them is the evidence, building the same architecture is not (born-again).
    monkeypatch.setattr("pipeline.student.train.worker.LOADED_IN_THIS_PROCESS", ["/w/student.pt"])
    monkeypatch.delitem(sys.modules, "pipeline.teacher.predictor")
    assert teacher_evidence("pipeline.models.builtin:digits_cnn", "/w/teacher.pt") == []
    monkeypatch.setattr("pipeline.student.train.worker.LOADED_IN_THIS_PROCESS", ["/w/teacher.pt"])
    assert teacher_evidence("pipeline.models.builtin:digits_cnn", "/w/teacher.pt") == ["loaded /w/teacher.pt"]


def test_student_package_never_imports_teacher():
    import pathlib
    import re

    for path in pathlib.Path("pipeline/student").rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+pipeline\.teacher", path.read_text(), re.M), path


def test_weights_round_trip_through_any_fsspec_uri():
    from pipeline.models.factory import load_state, save_state, weights_digest

    torch.manual_seed(0)
    a = mlp((1, 8, 8), 10, hidden=(8,))
    save_state(a, "memory://weights/student.pt")
    b = mlp((1, 8, 8), 10, hidden=(8,))
    load_state(b, "memory://weights/student.pt")
    for pa_, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa_, pb)
    assert len(weights_digest("memory://weights/student.pt")) == 16
    from pipeline.errors import DistillError

    with pytest.raises(DistillError, match="do not fit the model"):
        load_state(mlp((1, 8, 8), 10, hidden=(9,)), "memory://weights/student.pt")


def _summed_with(other):
    """A stand-in for the all-reduce: this worker's sums plus another's."""
    return lambda sums: {k: sums.get(k, 0.0) + other.get(k, 0.0) for k in {**sums, **other}}


def _sums(task, model, batches):
    """One worker's additive evaluation sums, as it hands them to the all-reduce."""
    out = {}

    def keep(sums):
        out.update(sums)
        return sums

    task.evaluate(model, batches, reduce=keep)
    return out


def test_evaluation_split_over_workers_equals_one_workers():
    """Each worker evaluates its val shards; the sums, calibration bins included, are added before
    dividing: the metrics of two workers (or of one with no rows) equal one worker's of the split."""
    torch.manual_seed(0)
    data = _batches()
    student = mlp((1, 8, 8), 10, hidden=(32,))
    task = in_memory_task({"kd": 0.7, "ce": 0.3}, 4.0)
    alone = task.evaluate(student, data)
    split = task.evaluate(student, data[3:], reduce=_summed_with(_sums(task, student, data[:3])))
    empty = task.evaluate(student, [], reduce=_summed_with(_sums(task, student, data)))
    for metrics in (split, empty):
        assert metrics["val_rows"] == alone["val_rows"] == 256
        for k in ("val_accuracy", "val_agreement", "val_kl", "val_nll", "teacher_val_accuracy"):
            assert metrics[k] == pytest.approx(alone[k], rel=1e-12), k
        for who in ("student", "teacher"):
            assert metrics["calibration"][who]["count"] == alone["calibration"][who]["count"]
            for k, v in alone["calibration"][who].items():
                assert metrics["calibration"][who][k] == pytest.approx(v, rel=1e-12), (who, k)
    assert task.evaluate(student, data[3:])["val_rows"] == 256 - 96  # without the reduce: its share only
