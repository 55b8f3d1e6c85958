"""The learning-rate schedule: warm-up, then constant / linear / cosine decay to lr × min_lr_ratio."""
import math

import pytest
import torch

from bridgerl.config import OptimConfig
from bridgerl.train.optim import build_optimizer, lr_lambda_for


def rates(o: OptimConfig, total: int, beyond: int = 0) -> list[float]:
    """The lr a real AdamW + scheduler planned for `total` steps uses at each step, run `beyond` more."""
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer, scheduler = build_optimizer([p], o, total)
    out = []
    for _ in range(total + beyond):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_ramps_to_the_peak():
    lr = rates(OptimConfig(lr=1.0, warmup_steps=4), 10)
    assert lr[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lr[-1] == 1.0  # constant after warm-up


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_decay_ends_at_the_floor(schedule, floor):
    total, warm = 50, 5
    o = OptimConfig(lr=2.0, warmup_steps=warm, schedule=schedule, min_lr_ratio=floor)
    lr = rates(o, total, beyond=5)
    assert lr[warm] == pytest.approx(2.0)  # the peak right after warm-up
    assert lr[total] == pytest.approx(2.0 * floor)  # the end of the decay ...
    assert lr[-1] == pytest.approx(2.0 * floor)  # ... and it stays there past the planned steps
    decay = lr[warm:total + 1]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # never rises
    mid = 27  # partway through the decay
    half = (mid - warm) / (total - warm)
    expected = 1 - half if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * half))
    assert lr[mid] == pytest.approx(2.0 * (floor + (1 - floor) * expected))


def test_the_floor_does_not_touch_a_constant_schedule():
    f = lr_lambda_for(OptimConfig(lr=1.0, min_lr_ratio=0.5), 10)
    assert [f(s) for s in range(12)] == [1.0] * 12


def test_floor_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(lr=1.0, min_lr_ratio=1.5)
