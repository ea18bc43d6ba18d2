"""`speechlm train`: one validated config -> a Ray Train TorchTrainer run, tracked in MLflow.

The driver's job: connect to Ray (local, or the cluster in RAY_ADDRESS), decide resources, decide whether
this is a fresh run or a resume, build the Ray Data pipelines, start the MLflow run, fit, and tell the
user where everything is. The per-worker loop lives in `orchestrator.training.loop`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from orchestrator.config import ExperimentConfig, flatten, to_dict, to_yaml
from orchestrator.config.errors import ConfigError
from orchestrator.redaction import redact
from orchestrator.storage import checkpoints, filesystems
from orchestrator.storage.paths import absolute_if_exists
from orchestrator.storage.run_dirs import run_dir, split_run_dir
from orchestrator.tracking import mlflow_runs
from orchestrator.training.resources import plan_resources
from speech_models.registry import ModelEntry, entry_for

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    ok: bool
    run_dir: str
    best_checkpoint: str | None
    last_checkpoint: str | None
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    tracking_uri: str | None
    error: str | None = None
    stopped: bool = False  # ended early because its caller asked (a sweep scheduler), not by an error


# ------------------------------------------------------------------------------------------------- resume


def absolute_local_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Relative paths that exist here become absolute, because Ray workers do not share the driver's cwd."""

    def fix_dataset(ds):
        inputs = [
            dataclasses.replace(e, shar_path=absolute_if_exists(e.shar_path), cuts_path=absolute_if_exists(e.cuts_path))
            for e in ds.input_cfg
        ]
        return dataclasses.replace(ds, shar_path=absolute_if_exists(ds.shar_path), input_cfg=inputs)

    m = cfg.model
    model = dataclasses.replace(
        m,
        pretrained_llm=absolute_if_exists(m.pretrained_llm),
        pretrained_asr=absolute_if_exists(m.pretrained_asr),
        pretrained_audio_codec=absolute_if_exists(m.pretrained_audio_codec),
        scoring_asr=absolute_if_exists(m.scoring_asr),
    )
    data = dataclasses.replace(cfg.data, train_ds=fix_dataset(cfg.data.train_ds))
    validation = cfg.data.validation_ds
    if validation is not None:
        named = {name: fix_dataset(ds) for name, ds in validation.datasets.items()}
        data.validation_ds = dataclasses.replace(fix_dataset(validation), datasets=named)
    return dataclasses.replace(cfg, model=model, data=data)


def decide_resume(cfg: ExperimentConfig, directory: str) -> str | None:
    """The checkpoint this run continues from (None = fresh), following NeMo's exp_manager semantics."""
    exp = cfg.exp_manager
    if exp.resume_from_checkpoint:
        try:
            checkpoints.read_saved_state(exp.resume_from_checkpoint)
            checkpoints.require_complete(exp.resume_from_checkpoint)
        except checkpoints.CheckpointError as exc:
            raise ConfigError([f"exp_manager.resume_from_checkpoint: {exc}"], "exp_manager") from None
        return exp.resume_from_checkpoint
    for partial, problem in checkpoints.incomplete_checkpoints(directory).items():
        logger.warning("ignoring checkpoint %s: %s", partial, problem)
    latest = checkpoints.latest_checkpoint(directory)
    if latest is None:
        if exp.resume_if_exists and not exp.resume_ignore_no_checkpoint and filesystems.exists(directory):
            raise ConfigError(
                [
                    f"exp_manager.resume_if_exists: no checkpoint in {directory} to resume from; set "
                    "exp_manager.resume_ignore_no_checkpoint=true to start fresh"
                ],
                "exp_manager",
            )
        return None
    if not exp.resume_if_exists:
        raise ConfigError(
            [
                f"exp_manager.resume_if_exists is false but {directory} already holds checkpoints (latest: {latest}); "
                "set exp_manager.resume_if_exists=true to continue it, or pick a new exp_manager.name/version"
            ],
            "exp_manager",
        )
    return latest


def check_steps_left(cfg: ExperimentConfig, directory: str, resume_from: str, step: int) -> None:
    """Refuse a resume that would train nothing: its checkpoint (at `step`) is already at trainer.max_steps, e.g.
    a config copied with its `name` kept, whose run dir holds a finished run (NeMo silently "finishes" it)."""
    if step < cfg.trainer.max_steps:
        return
    explicit = cfg.exp_manager.explicit_log_dir
    new_run = (
        "another exp_manager.explicit_log_dir"
        if explicit
        else f"a new name (name=my_run; this one is name: {cfg.name!r})"
    )
    raise ConfigError(
        [
            f"nothing to train: {directory} already holds a checkpoint at step {step} ({resume_from}) and "
            f"trainer.max_steps is {cfg.trainer.max_steps}. To train further, raise trainer.max_steps (e.g. "
            f"trainer.max_steps={step + cfg.trainer.max_steps}); to start a new run, give it {new_run}"
        ],
        source="resume",
    )


# -------------------------------------------------------------------------------------------------- run


def connect_ray(runtime_env: dict[str, Any] | None = None) -> str:
    """Join RAY_ADDRESS (e.g. under `ray job submit`) or start a local Ray instance; a no-op when connected.
    Returns where the run goes, for the user ("a local Ray instance (dashboard http://...)")."""
    import ray

    from orchestrator import console

    if ray.is_initialized():
        return "Ray"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    address = os.environ.get("RAY_ADDRESS")
    context = ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    console.filter_ray_worker_logs()
    dashboard = f" (dashboard http://{context.dashboard_url})" if getattr(context, "dashboard_url", None) else ""
    return (f"the Ray cluster at {address}" if address else "a local Ray instance") + dashboard


def run_training(
    cfg: ExperimentConfig,
    source: str = "config",
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
    stop_requested: threading.Event | None = None,
    allow_finished: bool = False,
) -> TrainingResult:
    """Train `cfg` to trainer.max_steps (resuming when the run dir has checkpoints) and report where it all is.

    stop_requested: set by a caller that aborts the run on purpose (a sweep trial stopped by its scheduler),
    so that the abort is reported as a stop, not as a failure. allow_finished: a run dir already at max_steps
    "finishes" at once (a restarted sweep trial) instead of being refused as a run with nothing to train.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.config.sources import source_problems
    from orchestrator.data.datasets import build_datasets, ray_data_config
    from orchestrator.data.plan import TRAIN, validation_sets
    from orchestrator.data.resume_board import new_board_name
    from orchestrator.training.loop import LoopSettings, train_loop_per_worker

    notes: list[str] = []
    if problems := source_problems(cfg, notes):  # before a cluster is joined: missing data, models, credentials
        raise ConfigError(problems, source)
    for note in notes:
        logger.warning(note)
    cfg = absolute_local_paths(cfg)
    directory = run_dir(cfg.exp_manager)
    resume_from = decide_resume(cfg, directory)
    resumed_step = int(checkpoints.read_saved_state(resume_from).get("step", 0)) if resume_from else None
    if resumed_step is not None and not allow_finished:
        check_steps_left(cfg, directory, resume_from, resumed_step)
    where = connect_ray()
    # The per-operator progress bars of Ray Data would bury the training progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = plan_resources(cfg, ray.cluster_resources())
    print(
        redact(
            f"run dir: {directory}" + (f" (resuming from {resume_from})" if resume_from else "") + "\n"
            f"workers: {resources.describe()} on {where}"
        ),
        flush=True,
    )

    entry = entry_for(cfg.model)
    train_collator = entry.build_collator(cfg.model, cfg.data, cfg.data.train_ds)
    val_collators = {n: entry.build_collator(cfg.model, cfg.data, ds) for n, ds in validation_sets(cfg.data).items()}
    start = checkpoints.resume_data_position(resume_from) if resume_from else None
    board = new_board_name(TRAIN)  # restarted worker groups tell the read tasks what their checkpoint consumed
    datasets = build_datasets(
        cfg.data,
        train_collator,
        val_collators,
        start_position=start,
        max_epochs=cfg.trainer.max_epochs,
        resume_board=board,
    )

    tracking_uri = run_id = None
    exp = cfg.exp_manager
    if exp.create_mlflow_logger:
        tracking_uri = mlflow_runs.tracking_uri_for(exp, directory)
        run_id = mlflow_runs.start_or_resume_run(
            tracking_uri,
            mlflow_runs.experiment_name_for(exp),
            directory,
            run_name=str(exp.mlflow_logger_kwargs.get("run_name") or cfg.name),
            params=flatten(to_dict(cfg)),
            tags={
                "speechlm.model_type": entry.name,
                "speechlm.config": source,
                **(extra_tags or {}),
            },
            parent_run_id=parent_run_id,
            resumed_at=resumed_step,
        )
        mlflow_runs.log_text_artifact(tracking_uri, run_id, to_yaml(cfg), "config.yaml")

    has_validation = bool(val_collators)
    params = exp.checkpoint_callback_params
    checkpoint_config = ray.train.CheckpointConfig(
        num_to_keep=params.save_top_k if params.save_top_k > 0 else None,
        checkpoint_score_attribute=params.monitor if has_validation else None,
        checkpoint_score_order=params.mode,
    )
    storage_path, name = split_run_dir(directory)
    # An explicit filesystem for URLs: it carries a custom S3 endpoint/credentials to every Ray process.
    storage_fs, storage_path = filesystems.storage_filesystem(storage_path)
    settings = LoopSettings(
        cfg=cfg,
        model=entry,
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        threads_per_worker=resources.threads_per_worker,
        validation_sets=list(val_collators),
        resume_from=_checkpoint_at(resume_from) if resume_from else None,
        data_resume_board=board,
    )
    validation_config = None
    if cfg.trainer.async_validation and has_validation:
        from orchestrator.training.validation import CheckpointValidator

        # the validation task asks for what a training worker has: where there is none spare, it waits for one
        task_resources = {"num_cpus": resources.cpus_per_worker, "num_gpus": 1 if resources.use_gpu else 0}
        validation_config = ray.train.ValidationConfig(
            fn=CheckpointValidator(cfg, entry, list(val_collators), tracking_uri, run_id),
            ray_remote_kwargs=task_resources,
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.ray_num_workers,
            elastic_resize_monitor_interval_s=cfg.trainer.elastic_resize_interval_s,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=checkpoint_config,
            failure_config=ray.train.FailureConfig(max_failures=exp.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray_data_config(list(datasets)),
        validation_config=validation_config,
    )
    error = None
    try:
        result = trainer.fit()
        ok = result.error is None
        error = None if ok else str(result.error)
    except Exception as exc:  # TrainingFailedError and friends: record it in MLflow, then report
        ok, result, error = False, None, f"{type(exc).__name__}: {exc}"
    stopped = not ok and stop_requested is not None and stop_requested.is_set()
    best = _best_checkpoint(result, params.monitor, params.mode) if result and has_validation else None
    last = result.checkpoint.path if result and result.checkpoint else None
    # With storage_filesystem, Ray reports paths inside it (bucket/run/step=...): give them their scheme back.
    best, last = filesystems.to_url(best, directory), filesystems.to_url(last, directory)
    metrics = dict(result.metrics or {}) if result else {}
    if tracking_uri and run_id:
        mlflow_runs.finish_run(
            tracking_uri,
            run_id,
            "FINISHED" if ok else ("KILLED" if stopped else "FAILED"),
            tags={
                "speechlm.best_checkpoint": best or "",
                "speechlm.last_checkpoint": last or "",
                "speechlm.run_dir": directory,
            },
            curve_keys=["loss", *(f"val_{m.name}" for m in entry.validation_metrics(bool(cfg.model.scoring_asr)))],
        )
    outcome = TrainingResult(ok, directory, best, last, metrics, run_id, tracking_uri, error, stopped)
    print_summary(outcome, entry)
    return outcome


def _checkpoint_at(path: str):
    """A Ray Checkpoint for a local path or URL, with the filesystem that knows a custom S3 endpoint."""
    import ray.train

    fs, inner = filesystems.pyarrow_filesystem(path)
    return ray.train.Checkpoint(inner, filesystem=fs)


def _best_checkpoint(result, monitor: str, mode: str) -> str | None:
    scored = [(m.get(monitor), c.path) for c, m in (result.best_checkpoints or []) if m.get(monitor) is not None]
    if not scored:
        return None
    return (min(scored) if mode == "min" else max(scored))[1]


def print_summary(result: TrainingResult, entry: ModelEntry) -> None:
    if result.ok:
        status = "finished"
    elif result.stopped:
        status = "stopped before max_steps (its sweep stopped the trial); the same command resumes it"
    else:
        status = f"FAILED: {result.error}"
    lines = ["", "=" * 80, f"training {status}"]
    lines.append(f"run dir:          {result.run_dir}")
    if result.last_checkpoint:
        lines.append(f"last checkpoint:  {result.last_checkpoint}")
    if result.best_checkpoint:
        lines.append(f"best checkpoint:  {result.best_checkpoint}")
    if result.tracking_uri:
        lines.append(f"MLflow run:       {result.mlflow_run_id} at {result.tracking_uri}")
        lines.append(f"MLflow UI:        {mlflow_runs.ui_command(result.tracking_uri)}")
        if entry.text_metric is not None:
            key = f"val_{entry.text_metric.name}"
            history = mlflow_runs.metric_history(result.tracking_uri, result.mlflow_run_id, key)
            label = f"{key}:".ljust(18)
            if len(history) == 1:  # one validation: nothing to compare it with
                lines.append(f"{label}{history[0][1]:.3f} at step {history[0][0]}")
            elif history:
                (first_step, first), (last_step, last) = history[0], history[-1]
                lines.append(f"{label}{first:.3f} at step {first_step} -> {last:.3f} at step {last_step}")
    lines.append("=" * 80)
    print(redact("\n".join(lines)), flush=True)
