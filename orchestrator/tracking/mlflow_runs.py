"""MLflow, in one place: every call the project makes to a tracking store goes through this module.

A training run is one MLflow run, found again by its run directory (tag `speechlm.run_dir`) so a resumed run
continues it. The driver creates the run (params, tags, config artifact) before training and closes it after
(curves, checkpoint locations, status); rank 0 of the workers logs step metrics in between. A sweep is a parent
run with one child run per trial (tag `mlflow.parentRunId`); `speechlm eval` and `export` log into the training
run they evaluate. Experiments are created as "custom model development" ones, so MLflow 3's UI opens them on
their runs rather than on its GenAI traces view.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import __version__
from orchestrator.redaction import REDACTED, is_redacted, is_secret_key, redact
from orchestrator.storage.paths import is_url
from orchestrator.storage.run_dirs import DEFAULT_EXP_DIR

if TYPE_CHECKING:
    from orchestrator.config.schema import ExpManagerConfig

logger = logging.getLogger(__name__)

RUN_DIR_TAG = "speechlm.run_dir"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value
# MLflow 3's UI opens an experiment on its GenAI (traces) view unless the experiment says it holds model runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


@dataclass(frozen=True)
class RunRecord:
    """What callers need of an MLflow run found by a search."""

    run_id: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED
    tags: Mapping[str, str]


# ------------------------------------------------------------------------------------------ where runs go


def tracking_uri_for(exp: ExpManagerConfig, run_dir: str) -> str:
    """mlflow_logger_kwargs.tracking_uri, $MLFLOW_TRACKING_URI, else a SQLite file in the run directory.

    MLflow 3.13+ refuses the plain file store by default, so the default is SQLite. For a run directory on
    object storage the database goes to a local folder instead (SQLite cannot live on S3).
    """
    explicit = exp.mlflow_logger_kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if is_redacted(explicit):  # a saved config: its credentials were masked when it was written
        explicit = os.environ.get("MLFLOW_TRACKING_URI")
        if not explicit:
            from orchestrator.config.errors import ConfigError

            raise ConfigError(
                [
                    f"exp_manager.mlflow_logger_kwargs.tracking_uri: {exp.mlflow_logger_kwargs['tracking_uri']!r} "
                    "had its credentials removed when the config was saved; set MLFLOW_TRACKING_URI (or pass "
                    "--tracking-uri), with the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
                ],
                "saved config",
            )
    if explicit:
        return str(explicit)
    return default_tracking_uri(None if is_url(run_dir) else run_dir)


def default_tracking_uri(directory: str | None = None) -> str:
    """`sqlite:///<directory>/mlflow.db`; without a directory, the shared experiments/mlflow store."""
    local = Path(directory) if directory else Path(DEFAULT_EXP_DIR).resolve() / "mlflow"
    return f"sqlite:///{local / 'mlflow.db'}"


def experiment_name_for(exp: ExpManagerConfig) -> str:
    return str(exp.mlflow_logger_kwargs.get("experiment_name") or exp.name)


def _client(tracking_uri: str):
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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


def _experiment_id(client, tracking_uri: str, name: str) -> str:
    """The experiment called `name`, created (artifacts beside a SQLite store, not in ./mlruns) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_root = None
        if tracking_uri.startswith("sqlite:///"):
            artifact_root = Path(tracking_uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").as_uri()
        experiment_id = client.create_experiment(
            name, artifact_location=artifact_root, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
        return experiment_id
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version, or by hand
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def start_or_resume_run(
    tracking_uri: str,
    experiment_name: str,
    run_dir: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
    resumed_at: int | None = None,
) -> str:
    """The MLflow run id for `run_dir`: the existing run when resuming, else a new one with params logged.

    resumed_at: the step a resumed run continues from. MLflow params are write-once, so a key whose value
    changed since the run started (`trainer.max_steps` raised to train further) is logged again as
    `resumed_at_step_<N>/<key>`, and keys the run did not have yet are logged as they are.
    """
    from mlflow.entities import Param, RunTag

    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, tracking_uri, experiment_name)
    run_dir = redact(run_dir)  # tags are stored as written: never with a credential in them
    existing = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
        max_results=1,
        order_by=["start_time DESC"],
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        changed = log_changed_params(client, run_id, existing[0].data.params, params, resumed_at)
        logger.info(
            "continuing MLflow run %s%s",
            run_id,
            f"; changed since it started: {', '.join(changed)}" if changed else "",
        )
        return run_id
    all_tags = {
        RUN_DIR_TAG: run_dir,
        "speechlm.version": __version__,
        "git.commit": git_commit(),
        "mlflow.runName": run_name,
        **{k: redact(str(v)) for k, v in tags.items()},
    }
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    items = [
        Param(k, REDACTED if is_secret_key(k.rsplit(".", 1)[-1]) else _param_value(v))
        for k, v in sorted(params.items())
    ]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items() if k == "mlflow.runName"])
    return run_id


def log_changed_params(
    client, run_id: str, logged: Mapping[str, str], params: dict[str, Any], resumed_at: int | None
) -> list[str]:
    """Log `params` that `logged` (the run's params) lacks or holds with another value; returns "key old -> new"
    for each changed one. Changed values go under `resumed_at_step_<N>/<key>` (MLflow refuses to change a param)."""
    from mlflow.entities import Param

    items, changed = [], []
    for key, value in sorted(params.items()):
        text = REDACTED if is_secret_key(key.rsplit(".", 1)[-1]) else _param_value(value)
        if key not in logged:
            items.append(Param(key, text))
        elif logged[key] != text:
            changed.append(f"{key} {logged[key]} -> {text}")
            prefix = f"resumed_at_step_{resumed_at}" if resumed_at is not None else "resumed"
            if logged.get(f"{prefix}/{key}", text) == text:  # the same resume step again: already logged
                items.append(Param(f"{prefix}/{key}", text))
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    return changed


def _param_value(value: Any) -> str:
    text = redact(str(value))
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


class MetricsLogger:
    """Step metrics from rank 0 of the workers into an existing MLflow run (non-finite values are skipped)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self._client = _client(tracking_uri)
        self._run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        try:
            _log_metric_batch(self._client, self._run_id, metrics, step)
        except Exception as exc:  # tracking must never kill a training run
            logger.warning("MLflow metric logging failed at step %d: %s", step, exc)


def _log_metric_batch(client, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Numeric, finite values only (MLflow rejects NaN in some stores), in batches of MLflow's maximum."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(key, float(value), now, step)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and math.isfinite(float(value))
    ]
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start : start + 1000])


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    _log_metric_batch(_client(tracking_uri), run_id, metrics, step)


def log_text_artifact(tracking_uri: str, run_id: str, text: str, file_name: str) -> None:
    """`text` (credentials masked) as the run's artifact `file_name`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file_name
        path.write_text(redact(text))
        log_files(tracking_uri, run_id, [path])


def log_files(tracking_uri: str, run_id: str, paths: Iterable[Path | str], artifact_path: str | None = None) -> None:
    client = _client(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def log_dir(tracking_uri: str, run_id: str, directory: Path | str, artifact_path: str | None = None) -> None:
    _client(tracking_uri).log_artifacts(run_id, str(directory), artifact_path)


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    client = _client(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, redact(str(value)))


def terminate(tracking_uri: str, run_id: str, status: str) -> None:
    """Close a run as FINISHED, FAILED or KILLED."""
    _client(tracking_uri).set_terminated(run_id, status=status)


def find_runs(
    tracking_uri: str, tags: Mapping[str, str], experiment_name: str | None = None, max_results: int = 10000
) -> list[RunRecord]:
    """Runs whose tags equal `tags` (newest first), in one experiment or in every experiment of the store."""
    client = _client(tracking_uri)
    if experiment_name is not None:
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_ids = [experiment.experiment_id] if experiment is not None else []
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    query = " and ".join(f"tags.`{key}` = '{redact(str(value))}'" for key, value in tags.items())
    runs = client.search_runs(
        experiment_ids, filter_string=query, max_results=max_results, order_by=["start_time DESC"]
    )
    return [RunRecord(r.info.run_id, r.info.status, dict(r.data.tags)) for r in runs]


def create_run(tracking_uri: str, experiment_name: str, run_name: str, tags: Mapping[str, str]) -> str:
    """A new run (no params) in `experiment_name`, e.g. an eval of a model without a training run."""
    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, tracking_uri, experiment_name)
    return client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id


def register_model_version(
    tracking_uri: str, name: str, run_id: str, artifact_path: str, tags: Mapping[str, str]
) -> str:
    """Register the run's artifacts at `artifact_path` as a new version of model `name`; returns the version."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    return str(client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags)).version)


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
        client.set_tag(run_id, key, redact(str(value)))
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
        return redact(f"open {tracking_uri}")
    return redact(
        f"{mlflow_program()} ui --backend-store-uri {tracking_uri} --port 5000   # then open http://127.0.0.1:5000"
    )


def mlflow_program() -> str:
    """`mlflow` when it is on PATH, else the full path of the one beside this Python (a venv not activated, as
    after `make demo`), so the printed command works when pasted."""
    import shutil
    import sys

    if shutil.which("mlflow"):
        return "mlflow"
    beside = Path(sys.executable).with_name("mlflow")
    return str(beside) if beside.is_file() else "mlflow"


os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a user-chosen ./mlruns store keeps working on 3.13+
