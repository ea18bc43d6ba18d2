"""Trainer precisions (`trainer.precision`, Lightning's names) applied to a model, for training and inference alike."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

TRUE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def setup_precision(
    model: torch.nn.Module, precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """Cast for *-true precisions; return the autocast context factory for *-mixed ones (else a no-op).

    Modules that must stay in fp32 (e.g. a frozen audio codec) say so with `keep_fp32 = True`.
    """
    if precision in TRUE_DTYPES:
        model.to(TRUE_DTYPES[precision])
        for module in model.modules():
            if getattr(module, "keep_fp32", False):
                module.float()
    if precision in MIXED_DTYPES:
        dtype = MIXED_DTYPES[precision]
        return lambda: torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext
