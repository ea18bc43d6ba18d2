"""Learning-rate schedules that NeMo configs name (`nemo.core.optim.lr_scheduler.*`), as LambdaLR factories.

Each is called as `Schedule(optimizer, **config_kwargs)` and stepped once per optimizer step. All share NeMo's
shape: linear warmup to the optimizer's lr, then a decay that never goes below `min_lr`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup_steps(max_steps: int, warmup_steps: int | None, warmup_ratio: float | None) -> int:
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError("lr_scheduler: give warmup_steps or warmup_ratio, not both")
    if warmup_ratio is not None:
        return int(warmup_ratio * max_steps)
    return warmup_steps or 0


def _warmup_then(
    optimizer: Optimizer, warmup: int, min_lr: float, decay: Callable[[int], float], last_epoch: int
) -> LambdaLR:
    """LambdaLR: (step+1)/warmup during warmup, then `decay(step)` in [0, 1] mapped onto [min_lr, lr]."""

    def factor_for(base_lr: float) -> Callable[[int], float]:
        floor = min_lr / base_lr if base_lr > 0 else 0.0

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            return floor + (1.0 - floor) * decay(step)

        return factor

    return LambdaLR(optimizer, [factor_for(group["lr"]) for group in optimizer.param_groups], last_epoch=last_epoch)


def CosineAnnealing(  # named after NeMo's class so configs read the same
    optimizer: Optimizer,
    max_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    min_lr: float = 0.0,
    constant_steps: int = 0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup, then cosine decay to `min_lr` at `max_steps` (NeMo semantics)."""
    warmup = _warmup_steps(max_steps, warmup_steps, warmup_ratio)
    decay_steps = max(1, max_steps - warmup - constant_steps)

    def cosine(step: int) -> float:
        progress = min(1.0, max(0.0, (step - warmup - constant_steps) / decay_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return _warmup_then(optimizer, warmup, min_lr, cosine, last_epoch)


def WarmupAnnealing(
    optimizer: Optimizer,
    max_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    min_lr: float = 0.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup, then linear decay to `min_lr` at `max_steps`."""
    warmup = _warmup_steps(max_steps, warmup_steps, warmup_ratio)
    return _warmup_then(
        optimizer, warmup, min_lr, lambda step: 1.0 - min(1.0, (step - warmup) / max(1, max_steps - warmup)), last_epoch
    )


def InverseSquareRootAnnealing(
    optimizer: Optimizer,
    max_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    min_lr: float = 0.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup, then lr * sqrt(warmup / step), never below `min_lr`."""
    warmup = max(1, _warmup_steps(max_steps, warmup_steps, warmup_ratio))
    return _warmup_then(optimizer, warmup, min_lr, lambda step: math.sqrt(warmup / (step + 1)), last_epoch)
