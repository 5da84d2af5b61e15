"""View-consistent caches: each image's views drawn from the cache's seed and its id, the teacher run
on each view, and a student that replays a view with the teacher's logits for exactly that view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.cache.schema import LABEL, LOGITS, SAMPLE_ID, VIEWS, X
from pipeline.config import PrecomputeConfig
from pipeline.config.augment import Flip, RandomResizedCrop, Shift
from pipeline.data.views import apply_views, image_views
from pipeline.student.tasks.classification import replay_view
from pipeline.teacher.predictor import TeacherPredictor

TRANSFORMS = [RandomResizedCrop(scale=(0.5, 1.0)), Flip(), Shift(pixels=1)]


def test_views_depend_on_the_seed_and_the_id_only():
    ids = ["a", "b", "c"]
    v = image_views(ids, 4, 8, 8, TRANSFORMS, seed=0)
    assert v.shape == (3, 4, 5) and torch.equal(v[:, 0], torch.tensor([[0.5, 0.5, 1.0, 1.0, 0.0]]).repeat(3, 1))
    reordered = image_views(["c", "a"], 4, 8, 8, TRANSFORMS, seed=0)  # another batch, another order
    assert torch.equal(reordered[0], v[2]) and torch.equal(reordered[1], v[0])
    assert not torch.equal(v[0, 1:], v[1, 1:]) and not torch.equal(image_views(ids, 4, 8, 8, TRANSFORMS, seed=1), v)


def test_the_teacher_runs_on_every_view_of_every_image():
    from sklearn.datasets import load_digits

    d = load_digits()
    kwargs = dict(teachers={"teacher": {"factory": "pipeline.models.builtin:digits_cnn", "kwargs": {"width": 8}}},
                  input_shape=(1, 8, 8), num_classes=10, logits_spec={"mode": "full", "dtype": "float32"}, input_scale=1 / 16)
    torch.manual_seed(0)
    predictor = TeacherPredictor(**kwargs, views={"count": 3, "seed": 0, "transforms": [t.model_dump() for t in TRANSFORMS]})
    batch = {SAMPLE_ID: np.array([f"d-{i}" for i in range(5)], dtype=object),
             X: d.data[:5].astype(np.uint8).reshape(5, 1, 8, 8), LABEL: d.target[:5]}
    out = predictor(batch)
    assert out[VIEWS].shape == (5, 3, 5) and out[LOGITS].shape == (5, 3, 10)
    model = predictor.models["teacher"]
    x = torch.from_numpy(batch[X]).float() / 16
    with torch.no_grad():
        for r in range(3):
            expected = model(apply_views(x, torch.from_numpy(out[VIEWS][:, r]))).numpy()
            np.testing.assert_allclose(out[LOGITS][:, r], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[LOGITS][:, 0], model(x).numpy(), rtol=1e-4, atol=1e-5)  # view 0: the whole image


def test_a_student_replays_one_view_with_that_views_logits():
    x = torch.rand(6, 1, 8, 8)
    views = image_views([str(i) for i in range(6)], 4, 8, 8, TRANSFORMS, seed=0)
    logits = torch.eye(4)[None].repeat(6, 1, 1) * 10  # the logits of view r point at class r
    torch.manual_seed(0)
    out = replay_view({X: x, VIEWS: views, LOGITS: logits, LABEL: torch.zeros(6, dtype=torch.long)}, x, [LOGITS])
    picked = out[LOGITS].argmax(-1)
    assert out[LOGITS].shape == (6, 4) and len(set(picked.tolist())) > 1
    torch.testing.assert_close(out[X], apply_views(x, views[torch.arange(6), picked]))


def test_views_are_for_image_caches_without_taps():
    base = {"source": {"kind": "mnist"}, "teacher": {"factory": "pipeline.models.builtin:mnist_cnn"}}
    cfg = PrecomputeConfig.model_validate({**base, "outputs": {"views": {"count": 4}}})
    assert cfg.outputs.views.count == 4 and [t.kind for t in cfg.outputs.views.transforms] == ["random_resized_crop", "flip"]
    with pytest.raises(ValidationError, match="without taps"):
        PrecomputeConfig.model_validate({**base, "outputs": {"views": {}, "taps": [{"name": "f", "module": "features"}]}})
    with pytest.raises(ValidationError, match="count"):
        PrecomputeConfig.model_validate({**base, "outputs": {"views": {"count": 1}}})
