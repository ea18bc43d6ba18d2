"""NeMo's schedule names give NeMo's shapes: linear warmup to lr, decay to min_lr, never below it."""

from __future__ import annotations

import pytest
import torch

from orchestrator.training.schedules import CosineAnnealing, InverseSquareRootAnnealing, WarmupAnnealing


def lrs(schedule_cls, steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = schedule_cls(optimizer, **kwargs)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_cosine_warms_up_then_decays_to_min_lr() -> None:
    values = lrs(CosineAnnealing, 12, max_steps=10, warmup_steps=2, min_lr=0.1)
    assert values[:2] == pytest.approx([0.5, 1.0])
    assert values[6] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 8 decay steps
    assert values[10] == pytest.approx(0.1) and values[11] == pytest.approx(0.1)


def test_linear_and_inverse_sqrt_shapes() -> None:
    assert lrs(WarmupAnnealing, 5, max_steps=4, warmup_steps=0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    values = lrs(InverseSquareRootAnnealing, 9, max_steps=100, warmup_steps=4, min_lr=0.0)
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[8] == pytest.approx((4 / 9) ** 0.5)


def test_warmup_steps_and_ratio_are_exclusive() -> None:
    with pytest.raises(ValueError, match="warmup_steps or warmup_ratio"):
        lrs(CosineAnnealing, 1, max_steps=10, warmup_steps=2, warmup_ratio=0.1)
