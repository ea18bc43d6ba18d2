"""A sweep in MLflow: one parent run per sweep, one child run per trial, each tagged with the trial's status.

Every call goes through `orchestrator.tracking.mlflow_runs`; this module only decides what a sweep records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from orchestrator.config import flatten, to_yaml
from orchestrator.sweep.context import SweepContext
from orchestrator.sweep.spec import LoadedSweep, SweptParam
from orchestrator.tracking import mlflow_runs

logger = logging.getLogger(__name__)

TRIAL_ID_TAG = "speechlm.trial_id"
TRIAL_STATUS_TAG = "speechlm.trial_status"
SWEEP_TAG = "speechlm.sweep"
TERMINAL_STATUS = {"finished": "FINISHED", "early_stopped": "FINISHED", "failed": "FAILED"}


def sweep_tracking(loaded: LoadedSweep) -> tuple[str, str]:
    """(tracking URI, experiment name): the spec's, else the base config's URI / the sweep name."""
    exp = dataclasses.replace(loaded.base.cfg.exp_manager)
    if loaded.spec.mlflow.tracking_uri:
        exp.mlflow_logger_kwargs = {**exp.mlflow_logger_kwargs, "tracking_uri": loaded.spec.mlflow.tracking_uri}
    uri = mlflow_runs.tracking_uri_for(exp, loaded.sweep_dir)
    return uri, loaded.spec.mlflow.experiment_name or loaded.spec.name


def start_parent_run(loaded: LoadedSweep, tracking_uri: str, experiment: str) -> str:
    """The sweep's MLflow parent run (continued on --resume): spec params, spec and base config artifacts."""
    params = {
        f"sweep.{k}": v
        for k, v in flatten(dataclasses.asdict(loaded.spec)).items()
        if not k.startswith(("search_space.", "smoke."))
    }
    params.update({f"search_space.{p.key}": _describe_param(p) for p in loaded.params})
    params["sweep.fixed_overrides"] = " ".join(loaded.fixed_overrides)
    run_id = mlflow_runs.start_or_resume_run(
        tracking_uri,
        experiment,
        loaded.sweep_dir,
        run_name=loaded.spec.name + ("-smoke" if loaded.smoke else ""),
        params=params,
        tags={
            "speechlm.kind": "sweep",
            "speechlm.spec": loaded.source,
            "speechlm.base_config": loaded.base_path,
            "speechlm.metric": loaded.spec.metric,
        },
    )
    mlflow_runs.log_text_artifact(tracking_uri, run_id, Path(loaded.source).read_text(), "sweep_spec.yaml")
    mlflow_runs.log_text_artifact(tracking_uri, run_id, to_yaml(loaded.base.cfg), "base_config.yaml")
    return run_id


def _describe_param(p: SweptParam) -> str:
    if p.presets:
        return f"{p.kind} presets " + json.dumps(dict(p.presets))
    if p.discrete:
        return f"{p.kind} {json.dumps(list(p.options))}"
    return f"{p.kind} {list(p.bounds)}"


def child_runs(context: SweepContext, trial_id: str | None = None) -> list[mlflow_runs.RunRecord]:
    """The MLflow child runs of the sweep (of one trial when trial_id is given)."""
    tags = {mlflow_runs.PARENT_TAG: context.parent_run_id}
    if trial_id:
        tags[TRIAL_ID_TAG] = trial_id
    return mlflow_runs.find_runs(context.tracking_uri, tags, experiment_name=context.experiment_name)


def mark_trial_runs(context: SweepContext, trial_id: str, status: str, error: str | None, config: dict | None) -> None:
    """Tag the trial's child runs with its status (the runs are closed by the trial itself); a failure that
    never reached MLflow (before training started) becomes a failed child run of its own."""
    uri = context.tracking_uri
    run_ids = [run.run_id for run in child_runs(context, trial_id)]
    if not run_ids and status == "failed":
        params = {p.key: (config or {}).get(p.key) for p in context.loaded.params}
        tags = {TRIAL_ID_TAG: trial_id, SWEEP_TAG: context.loaded.spec.name}
        run_id = mlflow_runs.start_or_resume_run(
            uri, context.experiment_name, context.trial_dir(trial_id), trial_id, params, tags, context.parent_run_id
        )
        mlflow_runs.terminate(uri, run_id, "FAILED")
        run_ids = [run_id]
    tags = {TRIAL_STATUS_TAG: status, **({"speechlm.error": error[-4000:]} if error else {})}
    for run_id in run_ids:
        mlflow_runs.set_tags(uri, run_id, tags)


def settle_stopped_trial(context: SweepContext, trial_id: str) -> None:
    """After a stopped trial's Train run was aborted (`run_training` closes its MLflow run as KILLED):
    FINISHED when the scheduler stopped it (the driver tagged it early_stopped first), else it stays KILLED
    (the sweep was interrupted; --resume continues the run)."""
    try:
        for run in child_runs(context, trial_id):
            early = run.tags.get(TRIAL_STATUS_TAG) == "early_stopped"
            mlflow_runs.terminate(context.tracking_uri, run.run_id, "FINISHED" if early else "KILLED")
    except Exception as exc:  # tracking must never break a sweep
        logger.warning("could not settle the MLflow run of stopped trial %s: %s", trial_id, exc)


def reconcile_trial_runs(context: SweepContext, records: list[Any]) -> None:
    """At the end of a sweep: every ended trial's child runs carry its final status, tag and MLflow state."""
    for record in records:
        if record.status not in TERMINAL_STATUS:
            continue
        for run in child_runs(context, record.trial_id):
            if run.tags.get(TRIAL_STATUS_TAG) != record.status:
                mlflow_runs.set_tags(context.tracking_uri, run.run_id, {TRIAL_STATUS_TAG: record.status})
            if run.status != TERMINAL_STATUS[record.status]:
                mlflow_runs.terminate(context.tracking_uri, run.run_id, TERMINAL_STATUS[record.status])


def close_parent_run(
    context: SweepContext, records: list[Any], files: list[Path], best: Any, elapsed: float, interrupted: bool
) -> None:
    """The sweep's result files, trial counts and best value on the parent run, which ends KILLED when the sweep
    was interrupted, FAILED when every trial failed, else FINISHED."""
    loaded, uri, run_id = context.loaded, context.tracking_uri, context.parent_run_id
    reconcile_trial_runs(context, records)
    mlflow_runs.log_files(uri, run_id, files)
    counts = {s: sum(r.status == s for r in records) for s in ("finished", "early_stopped", "failed")}
    metrics: dict[str, float] = {f"trials_{status}": n for status, n in counts.items()}
    tags = {"speechlm.sweep_seconds": f"{elapsed:.0f}"}
    if best is not None:
        metrics[f"best_{loaded.spec.metric}"] = best.best(loaded.spec.mode)[1]
        tags["speechlm.best_trial"] = best.trial_id
    mlflow_runs.log_metrics(uri, run_id, metrics)
    mlflow_runs.set_tags(uri, run_id, tags)
    all_failed = bool(records) and all(r.status == "failed" for r in records)
    mlflow_runs.terminate(uri, run_id, "KILLED" if interrupted else ("FAILED" if all_failed else "FINISHED"))
