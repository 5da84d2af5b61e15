"""The task seam: stage 2's trainer and worker loop know only `Task`; a task kind is one module."""

import math

import grimp
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.student.train.step import make_optimizer, train_epoch
from pipeline.student.tasks import TASKS, Task, task_for
from pipeline.student.tasks.classification import ClassificationTask
from pipeline.student.tasks.tokens import TokenTask
from tests.conftest import full_logits, make_manifest

CFG = TrainConfig.model_validate({"cache": "c", "student": {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [8]}},
                                  "loss": {"terms": {"kd": 0.5, "ce": 0.5}}})


class Regression(Task):
    """A task kind the pipeline does not ship: real-valued targets, mean squared error."""

    name = "regression"
    result_metrics = ("val_mse",)

    def check(self) -> None:
        pass

    def columns(self):
        return ["x", "y"]

    def dtypes(self):
        return {"x": torch.float32, "y": torch.float32}

    def build_model(self):
        return torch.nn.Linear(3, 1)

    def model_inputs(self, batch):
        return batch["x"]

    def losses(self, output, batch):
        mse = torch.nn.functional.mse_loss(output.squeeze(-1), batch["y"])
        return {"loss": mse, "mse": mse}

    def evaluate(self, model, batches):
        with torch.no_grad():
            return {"val_mse": float(sum(self.losses(model(b["x"]), b)["mse"] for b in batches))}


def test_a_new_task_kind_needs_one_class_and_one_registry_entry(monkeypatch):
    monkeypatch.setitem(TASKS, "regression", Regression)
    manifest = make_manifest([full_logits()], task="regression", input_shape=(3,))
    task = task_for(CFG, manifest)
    assert isinstance(task, Regression)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    batches = [{"x": x[i:i + 16], "y": x[i:i + 16] @ torch.tensor([1.0, -2.0, 0.5])} for i in range(0, 64, 16)]
    model = task.build_model()
    opt = make_optimizer(model.parameters(), "adam", 0.05)
    before = task.evaluate(model, batches)["val_mse"]
    for _ in range(30):
        stats = train_epoch(model, batches, task, opt)
    assert task.evaluate(model, batches)["val_mse"] < before / 10 and stats["train_mse"] > 0
    assert task.summary({"val_mse": 0.25}) == "mse 0.2500"


def test_the_trainer_and_worker_know_only_the_seam():
    graph = grimp.build_graph("pipeline")
    kinds = {"pipeline.student.tasks.classification", "pipeline.student.tasks.tokens"}
    for module in ("pipeline.student.train.driver", "pipeline.student.train.worker", "pipeline.student.train.step",
                   "pipeline.student.prelude", "pipeline.student.train.plan", "pipeline.student.sweep.driver",
                   "pipeline.student.sweep.trial"):
        assert not graph.find_modules_directly_imported_by(module) & kinds, module
    assert TASKS == {"classification": ClassificationTask, "tokens": TokenTask}


def test_a_cache_for_an_unknown_task_is_one_clear_error():
    with pytest.raises(DistillError, match="'ranking' student, which this distill does not know"):
        task_for(CFG, make_manifest([full_logits()], task="ranking"))


def test_classification_reads_only_the_columns_its_terms_use():
    manifest = make_manifest([full_logits(), full_logits("wide", "wide_logits")], teachers=["teacher", "wide"])
    hard = CFG.model_copy(update={"loss": CFG.loss.model_copy(update={"terms": {"ce": 1.0}})})
    assert task_for(hard, manifest).columns() == ["x", "label", "teacher_logits"]  # the teacher's logits for evaluation
    both = CFG.model_copy(update={"loss": CFG.loss.model_copy(update={"teachers": {"teacher": 1.0, "wide": 1.0}})})
    assert task_for(both, manifest).columns() == ["x", "label", "teacher_logits", "wide_logits"]
    assert task_for(CFG, manifest).dtypes()["label"] == torch.int64


@pytest.mark.parametrize("mode,agreement", [("topk", True), ("sampled", False), ("sequences", False), ("full", True)])
def test_token_tasks_report_agreement_only_where_the_cache_knows_the_teachers_argmax(mode, agreement):
    fields = {"topk": {"k": 4, "temperatures": [1.0], "values": "float16", "step": 0.0625, "bytes_per_token": 1.0},
              "sampled": {"k": 4, "temperatures": [1.0], "seed": 0, "bytes_per_token": 1.0},
              "sequences": {"prompt_tokens": 2, "new_tokens": 2, "strategy": "greedy", "temperatures": [1.0], "seed": 0,
                            "bytes_per_token": 1.0},
              "full": {"dtype": "float16"}}[mode]
    columns = {"topk": ["topk_indices", "topk_values", "topk_lse"], "sampled": ["sampled_indices", "sampled_weights"],
               "sequences": ["teacher_sequence"], "full": ["teacher_logits"]}[mode]
    manifest = make_manifest([{"mode": mode, "teacher": "teacher", "columns": columns, "shape": [8, 300], **fields}],
                             task="tokens", num_classes=300, input_shape=(8,))
    cfg = CFG.model_copy(update={"student": CFG.student.model_copy(update={"factory": "pipeline.models.lm:lm_tiny", "kwargs": {}}),
                                 "loss": CFG.loss.model_copy(update={"terms": {"ce": 1.0}, "temperature": 1.0})})
    task = task_for(cfg, manifest)
    task.check()
    assert task.columns() == ["input_ids", "length", *columns]
    ids = torch.randint(2, 300, (4, 9))
    batch = {"input_ids": ids, "length": torch.full((4,), 9), "teacher_sequence": ids[:, :4],
             "topk_indices": ids[:, 1:, None].expand(4, 8, 4), "teacher_logits": torch.randn(4, 8, 300)}
    metrics = task.evaluate(task.build_model(), [batch])
    assert ("val_agreement" in metrics) is agreement and ("val_agreement" in task.result_metrics) is agreement
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in metrics.values())  # no NaN placeholders
