"""MLflow: one run per training run, found again by its run directory so a resumed run continues it.

The driver creates the run (params, tags, config artifact) before training and closes it after (curves,
checkpoint locations, status); rank 0 of the workers logs step metrics in between. Sweeps pass a parent
run id so each trial's run is nested under the sweep's run.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from orchestrator import __version__

logger = logging.getLogger(__name__)

RUN_DIR_TAG = "speechlm.run_dir"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value


def _client(tracking_uri: str):
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def git_commit() -> str:
    """The working copy's commit (marked -dirty when modified), or 'unknown' outside git."""
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _experiment_id(client, name: str, artifact_root: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


def start_or_resume_run(
    tracking_uri: str,
    experiment_name: str,
    run_dir: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    """The MLflow run id for `run_dir`: the existing run when resuming, else a new one with params logged."""
    from mlflow.entities import Param, RunTag

    client = _client(tracking_uri)
    artifact_root = None
    if tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in ./mlruns
        artifact_root = Path(tracking_uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").as_uri()
    experiment_id = _experiment_id(client, experiment_name, artifact_root)
    existing = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
        max_results=1,
        order_by=["start_time DESC"],
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logger.info("continuing MLflow run %s", run_id)
        return run_id
    all_tags = {
        RUN_DIR_TAG: run_dir,
        "speechlm.version": __version__,
        "git.commit": git_commit(),
        "mlflow.runName": run_name,
        **tags,
    }
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items() if k == "mlflow.runName"])
    return run_id


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


class MetricsLogger:
    """Step metrics from rank 0 of the workers into an existing MLflow run (non-finite values are skipped)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self._client = _client(tracking_uri)
        self._run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(float(value))
        ]
        for start in range(0, len(batch), 1000):
            try:
                self._client.log_batch(self._run_id, metrics=batch[start : start + 1000])
            except Exception as exc:  # tracking must never kill a training run
                logger.warning("MLflow metric logging failed at step %d: %s", step, exc)


def log_text_artifact(tracking_uri: str, run_id: str, text: str, file_name: str) -> None:
    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file_name
        path.write_text(text)
        client.log_artifact(run_id, str(path))


def plot_curves(tracking_uri: str, run_id: str, keys: list[str], out_file: Path) -> Path | None:
    """A PNG with one panel per metric key (step on x) from the run's metric history; None if nothing logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = _client(tracking_uri)
    histories = {k: client.get_metric_history(run_id, k) for k in keys}
    histories = {k: sorted(h, key=lambda m: m.step) for k, h in histories.items() if h}
    if not histories:
        return None
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (key, history) in zip(axes[0], histories.items(), strict=True):
        ax.plot([m.step for m in history], [m.value for m in history], marker="." if len(history) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


def finish_run(tracking_uri: str, run_id: str, status: str, tags: dict[str, str], curve_keys: list[str]) -> None:
    """Curves PNG, final tags and the terminal status (FINISHED / FAILED / KILLED)."""
    client = _client(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_curves(tracking_uri, run_id, curve_keys, Path(tmp) / "curves.png")
        if png is not None:
            client.log_artifact(run_id, str(png))
    client.set_terminated(run_id, status=status)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [
        (m.step, m.value) for m in sorted(_client(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)
    ]


def ui_command(tracking_uri: str) -> str:
    """The command a user runs to browse this tracking store."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000   # then open http://127.0.0.1:5000"


os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a user-chosen ./mlruns store keeps working on 3.13+
