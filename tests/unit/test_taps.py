"""Taps on both sides: what the teacher stores equals its activation, the student wires hooks and
adapters from the manifest, and every mismatch is a clear error before training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.manifest import Manifest
from pipeline.cache.schema import LOGITS, X
from pipeline.config import LossConfig, ModelSpec, TapOutput
from pipeline.errors import DistillError
from pipeline.models.builtin import mnist_cnn
from pipeline.models.taps import attention_map, capture, embedding
from pipeline.student.losses.classification import DistillationLoss
from pipeline.student.tasks.tapped import Adapter, build_student, loss_inputs
from pipeline.teacher.predictor import TeacherPredictor
from tests.conftest import full_logits, make_manifest

TEACHER = {"factory": "pipeline.models.builtin:mnist_cnn", "kwargs": {"width": 8}, "weights": None}
TAPS = [
    TapOutput(name="feat", module="5", kind="feature"),
    TapOutput(name="feat_small", module="2", kind="feature", pool=[7, 7]),
    TapOutput(name="attn", module="2", kind="attention", pool=[7, 7]),
    TapOutput(name="emb", module="9", kind="embedding"),
]


def _predictor(taps=TAPS):
    torch.manual_seed(0)
    return TeacherPredictor({"teacher": TEACHER}, (1, 28, 28), 10, "float32", taps=[t.model_dump() for t in taps])


def test_stored_taps_equal_the_teachers_activations_recomputed():
    x = np.random.default_rng(0).random((6, 1, 28, 28), dtype=np.float32)
    out = _predictor()({X: x})
    model = _predictor().models["teacher"]  # same seed: same weights
    with torch.inference_mode():
        h = {}
        for i, layer in enumerate(model):  # walk the Sequential by hand, no hooks
            h[str(i)] = layer(h[str(i - 1)] if i else torch.from_numpy(x))
    assert np.allclose(out["tap_feat"], h["5"].numpy(), atol=2e-3)  # float16 storage
    assert out["tap_feat"].dtype == np.float16 and out["tap_feat"].shape == (6, 16, 7, 7)
    assert np.allclose(out["tap_feat_small"], F.adaptive_avg_pool2d(h["2"], 7).numpy(), atol=2e-3)
    q = h["2"].pow(2).mean(1, keepdim=True)
    q = F.avg_pool2d(q, 2).flatten(1)
    assert np.allclose(out["tap_attn"], (q / q.norm(dim=1, keepdim=True)).numpy(), atol=2e-3)
    assert np.allclose(out["tap_emb"], h["9"].numpy(), atol=2e-2)
    assert np.allclose(out[LOGITS], h["11"].numpy(), atol=1e-5)


def test_unknown_teacher_module_lists_the_available_names():
    with pytest.raises(DistillError) as e:
        _predictor([TapOutput(name="bad", module="layer9")])
    assert "layer9" in e.value.problem and "available: 0, 1, 2" in e.value.problem


def test_several_teachers_in_one_pass_have_their_own_columns():
    other = {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [16]}, "weights": None}
    p = TeacherPredictor({"teacher": TEACHER, "mlp": other}, (1, 28, 28), 10, "float32")
    out = p({X: np.zeros((3, 1, 28, 28), np.float32)})
    assert set(out) >= {"teacher_logits", "mlp_logits"} and out["mlp_logits"].shape == (3, 10)


def test_capture_removes_its_hooks_and_attention_map_is_unit_norm():
    model = mnist_cnn(width=4)
    with capture(model, ["2"]) as found:
        model(torch.zeros(1, 1, 28, 28))
    assert "2" in found and not model[2]._forward_hooks
    q = attention_map(torch.randn(3, 4, 6, 6), size=(3, 3))
    assert q.shape == (3, 9) and torch.allclose(q.norm(dim=1), torch.ones(3))
    assert embedding(torch.ones(2, 3, 4, 4)).shape == (2, 3)


def _manifest(taps: dict) -> Manifest:
    outputs = [full_logits(), full_logits("b", "b_logits")]
    outputs += [{"mode": "tap", "teacher": "teacher", "module": "0", "columns": [t.pop("column")], **t} for t in taps.values()]
    return make_manifest(outputs, input_shape=(1, 28, 28), teachers=["teacher", "b"])


MANIFEST = _manifest({
    "feat": {"name": "feat", "kind": "feature", "column": "tap_feat", "shape": [16, 7, 7], "pool": None, "p": 2.0},
    "attn": {"name": "attn", "kind": "attention", "column": "tap_attn", "shape": [49], "pool": [7, 7], "p": 2.0},
    "emb": {"name": "emb", "kind": "embedding", "column": "tap_emb", "shape": [32], "pool": None, "p": 2.0},
})
STUDENT = ModelSpec(factory="pipeline.models.builtin:cnn_student", kwargs={"width": 4})


def _loss(**kw):
    return LossConfig.model_validate({"temperature": 4.0, **kw})


def test_student_with_every_feature_term_trains_its_adapter():
    loss = _loss(terms={"kd": 0.5, "ce": 0.5, "hint": 1.0, "attention": 100.0, "rkd": 1.0},
                 hint=[{"student": "pool2", "tap": "feat"}], attention=[{"student": "pool1", "tap": "attn"}],
                 rkd={"student": "relu3", "tap": "emb"})
    inputs = loss_inputs(loss, MANIFEST)
    assert inputs.hint == (("pool2", "tap_feat"),) and inputs.attention == (("pool1", "tap_attn", (7, 7), 2.0),)
    torch.manual_seed(0)
    model = build_student(STUDENT, MANIFEST, loss, inputs)
    assert isinstance(model.adapters["tap_feat"], Adapter) and model.adapters["tap_feat"].conv
    batch = {X: torch.randn(8, 1, 28, 28), "label": torch.randint(0, 10, (8,)), LOGITS: torch.randn(8, 10),
             "tap_feat": torch.randn(8, 16, 7, 7), "tap_attn": F.normalize(torch.rand(8, 49), dim=1), "tap_emb": torch.randn(8, 32)}
    fn = DistillationLoss(loss.terms, loss.temperature, inputs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.adapters["tap_feat"].proj.weight.detach().clone()
    first = fn(model(batch[X]), batch)["hint"].item()
    for _ in range(30):
        parts = fn(model(batch[X]), batch)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
    assert not torch.equal(before, model.adapters["tap_feat"].proj.weight)
    assert fn(model(batch[X]), batch)["hint"].item() < first
    assert set(model.state_dict()) >= {"adapters.tap_feat.proj.weight", "net.conv1.weight"}


def test_plain_student_returns_logits():
    model = build_student(STUDENT, MANIFEST, _loss(), loss_inputs(_loss(), MANIFEST))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("kw, words", [
    ({"terms": {"hint": 1.0}, "hint": [{"student": "pool2", "tap": "nope"}]}, ["tap 'nope'", "lacks", "feat"]),
    ({"terms": {"attention": 1.0}, "attention": [{"student": "pool1", "tap": "feat"}]}, ["cannot use tap 'feat'", "attention"]),
    ({"terms": {"kd": 1.0}, "teachers": {"zzz": 1.0}}, ["zzz", "lacks"]),
])
def test_terms_the_cache_cannot_serve_are_rejected(kw, words):
    with pytest.raises(DistillError) as e:
        loss_inputs(_loss(**kw), MANIFEST)
    assert all(w in e.value.problem for w in words), e.value.problem


def test_unknown_student_module_and_non_spatial_attention_are_rejected():
    loss = _loss(terms={"hint": 1.0}, hint=[{"student": "conv9", "tap": "feat"}])
    with pytest.raises(DistillError, match="conv9.*available: conv1"):
        build_student(STUDENT, MANIFEST, loss, loss_inputs(loss, MANIFEST))
    loss = _loss(terms={"attention": 1.0}, attention=[{"student": "fc", "tap": "attn"}])
    with pytest.raises(DistillError, match="attention needs a \\(C, H, W\\)"):
        build_student(STUDENT, MANIFEST, loss, loss_inputs(loss, MANIFEST))


def test_feature_terms_need_their_pairs_in_the_config():
    with pytest.raises(ValueError, match="`hint` needs `loss.hint`"):
        _loss(terms={"hint": 1.0})


def test_multi_teacher_weights_resolve_to_columns():
    inputs = loss_inputs(_loss(terms={"kd": 1.0}, teachers={"teacher": 1.0, "b": 2.0}), MANIFEST)
    assert inputs.logits == {LOGITS: 1.0, "b_logits": 2.0}
    assert loss_inputs(_loss(), MANIFEST).logits == {LOGITS: 1.0}  # default: the primary teacher only


def test_linear_adapter_maps_any_shape():
    ad = Adapter((4, 7, 7), (32,))
    assert ad(torch.zeros(3, 4, 7, 7)).shape == (3, 32)
    ad = Adapter((4, 14, 14), (16, 7, 7))
    assert ad(torch.zeros(3, 4, 14, 14)).shape == (3, 16, 7, 7)
