"""Where a run lives: its directory (a local path or a storage URL), resolved once from `exp_manager`, so the
trainer, the CLI summary, eval and sweeps agree on it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from orchestrator.storage.paths import absolute

if TYPE_CHECKING:
    from orchestrator.config.schema import ExpManagerConfig

DEFAULT_EXP_DIR = "experiments"


def run_dir(exp: ExpManagerConfig) -> str:
    """explicit_log_dir, else exp_dir/name[/version]; local paths are made absolute (Ray workers run elsewhere)."""
    if exp.explicit_log_dir:
        path = exp.explicit_log_dir
    else:
        path = f"{(exp.exp_dir or DEFAULT_EXP_DIR).rstrip('/')}/{exp.name}"
        version = exp.version or (time.strftime("%Y-%m-%d_%H-%M-%S") if exp.use_datetime_version else None)
        if version:
            path = f"{path}/{version}"
    return absolute(path)


def split_run_dir(run_dir: str) -> tuple[str, str]:
    """(storage_path, name) for ray.train.RunConfig, so that Ray writes into exactly `run_dir`."""
    parent, _, name = run_dir.rstrip("/").rpartition("/")
    return parent or ".", name
