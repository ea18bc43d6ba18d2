"""`speechlm train`: one validated config -> a Ray Train TorchTrainer run, tracked in MLflow.

The driver's job: connect to Ray (local, or the cluster in RAY_ADDRESS), decide resources, decide whether
this is a fresh run or a resume, build the Ray Data pipelines, start the MLflow run, fit, and tell the
user where everything is. The per-worker loop lives in `orchestrator.loop`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import object_storage, storage, tracking
from orchestrator.config import ExperimentConfig, flatten, to_dict, to_yaml
from orchestrator.config.validate import ConfigError
from orchestrator.runs import mlflow_experiment_name, mlflow_tracking_uri, run_dir

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


# ---------------------------------------------------------------------------------------------- resources


@dataclass
class Resources:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    threads_per_worker: int


def plan_resources(cfg: ExperimentConfig, cluster: dict[str, float]) -> Resources:
    """workers = devices x num_nodes; GPU when asked (or available with accelerator auto); on CPU-only
    machines workers take fractional CPUs so Ray Data keeps CPUs to decode audio."""
    t = cfg.trainer
    gpus = int(cluster.get("GPU", 0))
    use_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise ConfigError(
            [
                "trainer.accelerator: 'gpu' but the Ray cluster has no GPUs; use trainer.accelerator=cpu "
                "or connect to a cluster with GPU nodes (RAY_ADDRESS)"
            ],
            "trainer",
        )
    num_workers = (gpus if use_gpu else 1) if t.devices == -1 else t.devices * t.num_nodes
    cpus = float(cluster.get("CPU", 1))
    if t.cpus_per_worker is not None:
        cpus_per_worker = t.cpus_per_worker
    elif use_gpu:
        cpus_per_worker = 1.0
    else:
        # Half the CPUs for training, half for Ray Data; at least a sliver so workers can be scheduled.
        cpus_per_worker = max(0.25, min(1.0, cpus / (2 * num_workers)))
    threads = max(1, round(cpus_per_worker) if use_gpu else int(max(1, cpus // (2 * num_workers))))
    return Resources(num_workers, use_gpu, cpus_per_worker, threads)


# ------------------------------------------------------------------------------------------------- resume


def absolute_local_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Relative paths that exist here become absolute, because Ray workers do not share the driver's cwd."""

    def fix(path: Any) -> Any:
        if isinstance(path, list):
            return [fix(p) for p in path]
        if isinstance(path, str) and "://" not in path and Path(path).exists():
            return str(Path(path).resolve())
        return path

    data = to_dict(cfg)
    model = data["model"]
    for key in ("pretrained_llm", "pretrained_asr", "pretrained_audio_codec", "scoring_asr"):
        model[key] = fix(model[key])
    datasets = [data["data"]["train_ds"]]
    validation = data["data"]["validation_ds"]
    if validation:
        datasets += [validation, *validation["datasets"].values()]
    for ds in datasets:
        ds["shar_path"] = fix(ds["shar_path"])
        for entry in ds["input_cfg"]:
            entry["shar_path"] = fix(entry["shar_path"])
            entry["cuts_path"] = fix(entry["cuts_path"])
    from orchestrator.config import experiment_from_dict

    return experiment_from_dict(data).cfg


def decide_resume(cfg: ExperimentConfig, directory: str) -> str | None:
    """The checkpoint this run continues from (None = fresh), following NeMo's exp_manager semantics."""
    exp = cfg.exp_manager
    if exp.resume_from_checkpoint:
        return exp.resume_from_checkpoint
    latest = storage.latest_checkpoint(directory)
    if latest is None:
        if exp.resume_if_exists and not exp.resume_ignore_no_checkpoint and storage.exists(directory):
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


# -------------------------------------------------------------------------------------------------- run


def connect_ray(runtime_env: dict[str, Any] | None = None) -> None:
    """Join RAY_ADDRESS (e.g. under `ray job submit`) or start a local Ray instance; a no-op when connected."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, runtime_env=runtime_env)


def run_training(
    cfg: ExperimentConfig,
    source: str = "config",
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
    stop_requested: threading.Event | None = None,
) -> TrainingResult:
    """Train `cfg` to trainer.max_steps (resuming when the run dir has checkpoints) and report where it all is.

    stop_requested: set by a caller that aborts the run on purpose (a sweep trial stopped by its scheduler),
    so that the abort is reported as a stop, not as a failure.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.checkpointing import resume_data_position
    from orchestrator.data.pipeline import build_datasets, ray_data_config, validation_sets
    from orchestrator.loop import LoopSettings, train_loop_per_worker
    from speech_models.registry import build_collator

    connect_ray()
    # The per-operator progress bars of Ray Data would bury the training progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = absolute_local_paths(cfg)
    directory = run_dir(cfg.exp_manager)
    resume_from = decide_resume(cfg, directory)
    resources = plan_resources(cfg, ray.cluster_resources())
    print(
        f"run dir: {directory}\nworkers: {resources.num_workers} x "
        f"({'1 GPU, ' if resources.use_gpu else ''}{resources.cpus_per_worker:g} CPU)"
        + (f"\nresuming from {resume_from}" if resume_from else ""),
        flush=True,
    )

    train_collator = build_collator(cfg.model, cfg.data, cfg.data.train_ds)
    val_collators = {n: build_collator(cfg.model, cfg.data, ds) for n, ds in validation_sets(cfg.data).items()}
    start = resume_data_position(resume_from) if resume_from else None
    datasets = build_datasets(
        cfg.data, train_collator, val_collators, start_position=start, max_epochs=cfg.trainer.max_epochs
    )

    tracking_uri = run_id = None
    exp = cfg.exp_manager
    if exp.create_mlflow_logger:
        tracking_uri = mlflow_tracking_uri(exp, directory)
        run_id = tracking.start_or_resume_run(
            tracking_uri,
            mlflow_experiment_name(exp),
            directory,
            run_name=str(exp.mlflow_logger_kwargs.get("run_name") or cfg.name),
            params=flatten(to_dict(cfg)),
            tags={
                "speechlm.model_type": cfg.model.resolved_model_type(),
                "speechlm.config": source,
                **(extra_tags or {}),
            },
            parent_run_id=parent_run_id,
        )
        tracking.log_text_artifact(tracking_uri, run_id, to_yaml(cfg), "config.yaml")

    has_validation = bool(val_collators)
    params = exp.checkpoint_callback_params
    checkpoint_config = ray.train.CheckpointConfig(
        num_to_keep=params.save_top_k if params.save_top_k > 0 else None,
        checkpoint_score_attribute=params.monitor if has_validation else None,
        checkpoint_score_order=params.mode,
    )
    storage_path, name = storage.split_run_dir(directory)
    # An explicit filesystem for URLs: it carries a custom S3 endpoint/credentials to every Ray process.
    storage_fs, storage_path = object_storage.storage_filesystem(storage_path)
    settings = LoopSettings(
        experiment=to_dict(cfg),
        config_yaml=to_yaml(cfg),
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        threads_per_worker=resources.threads_per_worker,
        validation_sets=list(val_collators),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(settings),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
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
        resume_from_checkpoint=_checkpoint_at(resume_from) if exp.resume_from_checkpoint else None,
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
    best, last = object_storage.to_url(best, directory), object_storage.to_url(last, directory)
    metrics = dict(result.metrics or {}) if result else {}
    if tracking_uri and run_id:
        tracking.finish_run(
            tracking_uri,
            run_id,
            "FINISHED" if ok else ("KILLED" if stopped else "FAILED"),
            tags={
                "speechlm.best_checkpoint": best or "",
                "speechlm.last_checkpoint": last or "",
                "speechlm.run_dir": directory,
            },
            curve_keys=[
                "loss",
                "val_loss",
                "val_wer",
                "val_txt_bleu",
                "val_text_loss",
                "val_audio_loss",
                "val_asr_bleu",
            ],
        )
    outcome = TrainingResult(ok, directory, best, last, metrics, run_id, tracking_uri, error, stopped)
    print_summary(outcome)
    return outcome


def _checkpoint_at(path: str):
    """A Ray Checkpoint for a local path or URL, with the filesystem that knows a custom S3 endpoint."""
    import ray.train

    fs, inner = object_storage.pyarrow_filesystem(path)
    return ray.train.Checkpoint(inner, filesystem=fs)


def _best_checkpoint(result, monitor: str, mode: str) -> str | None:
    scored = [(m.get(monitor), c.path) for c, m in (result.best_checkpoints or []) if m.get(monitor) is not None]
    if not scored:
        return None
    return (min(scored) if mode == "min" else max(scored))[1]


def print_summary(result: TrainingResult) -> None:
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
        lines.append(f"MLflow UI:        {tracking.ui_command(result.tracking_uri)}")
        for key in ("val_wer", "val_txt_bleu"):
            history = tracking.metric_history(result.tracking_uri, result.mlflow_run_id, key)
            if history:
                (first_step, first), (last_step, last) = history[0], history[-1]
                lines.append(f"{key}:          {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}")
    lines.append("=" * 80)
    print("\n".join(lines), flush=True)
