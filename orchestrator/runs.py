"""Where a run lives: its directory (local path or fsspec URL) and its MLflow tracking URI.

`exp_manager` keys resolve here, once, so the trainer, the CLI summary and sweeps agree on the paths.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestrator.config.schema import ExpManagerConfig

DEFAULT_EXP_DIR = "experiments"


def is_url(path: str) -> bool:
    """True for fsspec URLs such as s3://bucket/x (but not for file:// or plain paths)."""
    return "://" in path and not path.startswith("file://")


def run_dir(exp: ExpManagerConfig) -> str:
    """explicit_log_dir, else exp_dir/name[/version]; local paths are made absolute (Ray workers run elsewhere)."""
    if exp.explicit_log_dir:
        path = exp.explicit_log_dir
    else:
        path = f"{(exp.exp_dir or DEFAULT_EXP_DIR).rstrip('/')}/{exp.name}"
        version = exp.version or (time.strftime("%Y-%m-%d_%H-%M-%S") if exp.use_datetime_version else None)
        if version:
            path = f"{path}/{version}"
    if path.startswith("file://"):
        path = path[len("file://") :]
    return path if is_url(path) else str(Path(path).expanduser().resolve())


def mlflow_tracking_uri(exp: ExpManagerConfig, directory: str) -> str:
    """mlflow_logger_kwargs.tracking_uri, $MLFLOW_TRACKING_URI, else a SQLite file in the run directory.

    MLflow 3.13+ refuses the plain file store by default, so the default is SQLite. For a run directory on
    object storage the database goes to a local folder instead (SQLite cannot live on S3).
    """
    explicit = exp.mlflow_logger_kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return str(explicit)
    local = Path(directory) if not is_url(directory) else Path(DEFAULT_EXP_DIR).resolve() / "mlflow"
    return f"sqlite:///{local / 'mlflow.db'}"


def mlflow_experiment_name(exp: ExpManagerConfig) -> str:
    return str(exp.mlflow_logger_kwargs.get("experiment_name") or exp.name)
