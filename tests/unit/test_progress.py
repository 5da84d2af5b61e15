"""Progress lines: what a person reads during a long precompute or epoch."""

import torch

from pipeline.progress import Throttle, format_eta, progress_line
from pipeline.student.train.step import train_epoch
from tests.conftest import in_memory_task


def test_progress_line_rate_and_eta():
    assert progress_line("precompute", 250, 1000, 5.0) == "precompute: 250/1000 rows (25%), 50 rows/s, ETA 15s"
    assert progress_line("precompute", 0, 1000, 5.0).endswith("ETA ?")
    assert format_eta(3725) == "1h02m" and format_eta(125) == "2m05s"


def test_throttle_emits_at_most_once_per_interval():
    now = [0.0]
    lines = []
    t = Throttle(lines.append, every=10.0, clock=lambda: now[0])
    for step in range(30):
        now[0] = step
        t(lambda step=step: f"step {step}")
    assert lines == ["step 0", "step 10", "step 20"]
    assert t("last", force=True) and lines[-1] == "last"


def test_train_epoch_reports_every_step():
    model = torch.nn.Linear(3, 2)
    batches = [{"x": torch.randn(4, 3), "label": torch.tensor([0, 1, 0, 1])} for _ in range(3)]
    seen = []
    train_epoch(model, batches, in_memory_task({"ce": 1.0}, 1.0, num_classes=2, input_shape=(3,)), torch.optim.SGD(model.parameters(), lr=0.1),
                on_step=lambda step, samples: seen.append((step, samples)))
    assert seen == [(1, 4), (2, 8), (3, 12)]
