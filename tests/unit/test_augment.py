"""Stage 2's augmentation against its definitions on small tensors, the losses of mixed batches
against their formulas, and a seeded run that replays the same views when resumed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pipeline.config import TrainConfig
from pipeline.config.augment import CutMix, Flip, Mixup, RandomResizedCrop, Shift
from pipeline.data.views import apply_views, draw_views, identity_views
from pipeline.student.augment import augment, mix
from pipeline.student.losses.classification import MIX_LAM, MIX_PERM, DistillationLoss
from pipeline.student.losses.divergence import kl_divergence, softened_log_probs
from tests.unit.test_golden_loss import _gap, digits_cache, run

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _ramp(n=2, h=6, w=8):
    """Each pixel holds its column's normalised x coordinate (bilinear sampling of a ramp is exact)."""
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    return xs.expand(n, 1, h, w).clone()


def test_the_identity_view_and_a_flip():
    x = torch.randn(3, 2, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(apply_views(x, identity_views(3)), x)
    flipped = identity_views(3)
    flipped[:, 4] = 1
    torch.testing.assert_close(apply_views(x, flipped), torch.flip(x, dims=[-1]))


def test_a_crop_box_samples_the_image_inside_it():
    x = _ramp()
    view = torch.tensor([[0.5, 0.5, 0.5, 1.0, 0.0], [0.6, 0.5, 0.25, 1.0, 0.0]], dtype=torch.float64)
    out = apply_views(x, view)
    for i, (cx, w) in enumerate([(0.5, 0.5), (0.6, 0.25)]):  # output column j samples x_in = w * x_out + (2 cx - 1)
        torch.testing.assert_close(out[i], w * x[i] + (2 * cx - 1))


def test_a_shift_moves_whole_pixels_and_fills_zeros():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 1, 6, 8, dtype=torch.float64)
    views = draw_views(16, 6, 8, [Shift(pixels=2)], gen).double()
    out = apply_views(x, views)
    for i in range(16):
        dx, dy = round(float((views[i, 0] - 0.5) * 8)), round(float((views[i, 1] - 0.5) * 6))
        assert abs(dx) <= 2 and abs(dy) <= 2
        expect = torch.zeros_like(x[i])
        src = x[i][:, max(dy, 0):6 + min(dy, 0), max(dx, 0):8 + min(dx, 0)]
        expect[:, max(-dy, 0):6 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)] = src
        torch.testing.assert_close(out[i], expect, atol=1e-5, rtol=0)  # views are float32


def test_random_resized_crops_stay_inside_the_image_at_their_scale():
    t = RandomResizedCrop(scale=(0.3, 0.6))
    v = draw_views(2000, 28, 28, [t], torch.Generator().manual_seed(0))
    cx, cy, w, h, flip = v.unbind(1)
    area = w * h
    assert ((area >= 0.3 - 1e-6) | (w == 1) | (h == 1)).all() and (area <= 0.6 + 1e-6).all()
    assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all() and (cy - h / 2 >= -1e-6).all()
    assert (flip == 0).all()
    flips = draw_views(4000, 28, 28, [Flip(p=0.25)], torch.Generator().manual_seed(0))[:, 4]
    assert abs(float(flips.mean()) - 0.25) < 0.03


def test_mixup_and_cutmix_mix_images_as_defined():
    x = torch.randn(8, 1, 10, 10)
    torch.manual_seed(0)
    out, perm, lam = mix(x, Mixup(alpha=0.4))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x[perm])
    torch.manual_seed(1)
    out, perm, lam = mix(x, CutMix(alpha=1.0))
    from_partner = (out == x[perm]) & (out != x)
    assert abs(float(from_partner[0].float().mean()) - float(1 - lam)) < 1e-6  # lam is the box's complement
    assert ((out == x) | (out == x[perm])).all()


def test_mixed_batches_mix_the_targets_linearly():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    perm, lam = torch.randperm(6), torch.tensor(0.3, dtype=torch.float64)
    batch = {"teacher_logits": t, "label": y, MIX_PERM: perm, MIX_LAM: lam}
    parts = DistillationLoss({"kd": 0.5, "ce": 0.5, "deit_hard": 1.0}, temperature=2.0)(s, batch)
    p = F.softmax(t / 2, dim=-1)
    target = lam * p + (1 - lam) * p[perm]
    kd = 4 * kl_divergence(torch.log(target), softened_log_probs(s, 2.0)).mean()
    onehot = F.one_hot(y, 5).double()
    ce = -((lam * onehot + (1 - lam) * onehot[perm]) * F.log_softmax(s, -1)).sum(-1).mean()
    hard = F.one_hot(t.argmax(-1), 5).double()
    deit = -((lam * hard + (1 - lam) * hard[perm]) * F.log_softmax(s, -1)).sum(-1).mean()
    for name, expected in (("kd", kd), ("ce", ce), ("deit_hard", deit)):  # losses are computed in float32
        torch.testing.assert_close(parts[name].double(), expected, atol=1e-6, rtol=1e-5)


def test_augment_draws_from_the_seeded_generator():
    x = torch.rand(4, 1, 8, 8)
    transforms = [RandomResizedCrop(), Flip(), Shift(pixels=1), CutMix()]
    torch.manual_seed(5)
    a, (perm_a, lam_a) = augment(x, transforms)
    torch.manual_seed(5)
    b, (perm_b, lam_b) = augment(x, transforms)
    torch.manual_seed(6)
    c, _ = augment(x, transforms)
    assert torch.equal(a, b) and torch.equal(perm_a, perm_b) and float(lam_a) == float(lam_b) and not torch.equal(a, c)


def test_the_config_refuses_what_cannot_work():
    base = {"cache": "c", "student": {"factory": "pipeline.models.builtin:mlp"}}
    ok = TrainConfig.model_validate({**base, "augment": [{"kind": "random_resized_crop", "scale": [0.5, 1]}, {"kind": "mixup"}]})
    assert [t.kind for t in ok.augment] == ["random_resized_crop", "mixup"]
    for bad, needle in (([{"kind": "mixup"}, {"kind": "cutmix"}], "not both"),
                        ([{"kind": "mixup"}, {"kind": "flip"}], "last"),
                        ([{"kind": "random_resized_crop", "scale": [0.9, 0.2]}], "scale"),
                        ([{"kind": "rotate"}], "rotate")):
        with pytest.raises(ValidationError, match=needle):
            TrainConfig.model_validate({**base, "augment": bad})
    with pytest.raises(ValidationError, match="feature terms"):
        TrainConfig.model_validate({**base, "augment": [{"kind": "flip"}],
                                    "loss": {"terms": {"hint": 1.0}, "hint": [{"student": "a", "tap": "b"}]}})


def test_spatial_transforms_need_image_inputs():
    from pipeline.errors import DistillError
    from tests.conftest import in_memory_task

    task = in_memory_task({"kd": 1.0}, input_shape=(64,))
    task.cfg = task.cfg.model_copy(update={"augment": [Flip()]})
    with pytest.raises(DistillError, match=r"needs image inputs .* \[64\]"):
        task.check()


def test_an_augmented_run_is_reproducible_and_replays_its_views_when_resumed(tmp_path):
    cache = digits_cache(tmp_path)
    views = [{"kind": "random_resized_crop", "scale": [0.5, 1.0]}, {"kind": "flip"}, {"kind": "mixup", "alpha": 0.4}]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "plain").mkdir()
    first = run(cache, tmp_path / "a", augment=views)
    resumed = run(cache, tmp_path / "b", restore_from=tmp_path / "a" / "step-10", augment=views)
    assert [r["train_loss"] for r in resumed] == pytest.approx([r["train_loss"] for r in first[10:]], abs=1e-6, rel=0)
    plain = run(cache, tmp_path / "plain")
    assert _gap(first, plain) > 1e-2  # the views changed what was trained on
