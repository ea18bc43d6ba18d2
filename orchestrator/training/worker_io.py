"""Small helpers shared by the worker loop and validation: moving batches to the device, talking to the user."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("orchestrator.worker")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Numpy arrays become tensors on `device`; lists (texts, ids) pass through."""
    return {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) if isinstance(v, np.ndarray) else v
        for k, v in batch.items()
    }


def say(message: str) -> None:
    """A progress line for the user. Ray Train patches `print` in workers and echoes it twice; logging once."""
    logger.info(message)


def keep_freed_memory_in_heap() -> bool:
    """Ask glibc to keep freed blocks for reuse instead of unmapping them (Linux; a no-op elsewhere).

    On CPU, glibc unmaps every block above 32 MiB when it is freed, so the large activations of the audio
    subsampling are page-faulted in again on every step; keeping them cut the SALM R1 step by ~10%
    (bench/README.md). Returns whether the setting took effect.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31))
