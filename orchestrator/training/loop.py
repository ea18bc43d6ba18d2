"""The per-worker training loop that Ray Train runs on every rank.

Read it top to bottom: set up (model, precision, DDP/FSDP2, optimizer, restore), then the step loop, then
the two things that happen on a schedule (log, validate + checkpoint). Every rank calls `ray.train.report`
at the same steps, because report is a barrier; the data pipeline guarantees equal batch counts per rank.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from orchestrator.config import ExperimentConfig, to_yaml
from orchestrator.config.targets import instantiate
from orchestrator.data.read_task import COUNTER_NAMES
from orchestrator.data.stream import BatchMeta, iterate_batches
from orchestrator.storage.checkpoints import (
    TrainingState,
    checkpoint_dir_name,
    load_checkpoint,
    newer_checkpoint,
    persist_checkpoint,
    save_checkpoint,
    unwrap,
)
from orchestrator.tracking.mlflow_runs import MetricsLogger
from orchestrator.training.progress import format_progress
from orchestrator.training.validation import run_validation
from orchestrator.training.worker_io import keep_freed_memory_in_heap, say, to_device
from speech_models.precision import setup_precision
from speech_models.registry import ModelEntry

logger = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """What the driver hands every worker (pickled once): the validated config and the model's registry entry,
    so workers neither re-validate the config nor need the registry of the driver's process."""

    cfg: ExperimentConfig
    model: ModelEntry
    tracking_uri: str | None
    mlflow_run_id: str | None
    threads_per_worker: int
    validation_sets: list[str] = field(default_factory=list)
    # The complete checkpoint the driver resumes from (its data position was read from it), as a Ray Checkpoint;
    # Ray Train's own latest checkpoint wins when newer (a worker group restarted within this run).
    resume_from: Any = None


# ----------------------------------------------------------------------------------------------- set-up


def wrap_for_distribution(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """DDP (default) or FSDP2 across the Ray Train worker group; nothing with a single worker."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        # Shard each transformer block of the LLM, then the rest: the usual FSDP2 recipe.
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        return fully_shard(model)
    device_ids = [device.index] if device.type == "cuda" else None
    # No buffer broadcast: some buffers grow with the input length (relative positional tables), so their
    # sizes differ between ranks and a broadcast would crash gloo/NCCL. BatchNorm statistics stay per rank;
    # checkpoints take rank 0's. torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, which still
    # syncs buffers at init; its own warning says to keep broadcast_buffers=False until init_sync_buffers exists.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def setup_optimizer(model: torch.nn.Module, cfg: ExperimentConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "no trainable parameters: model.freeze_params froze everything; loosen it or add "
            "prevent_freeze_params for the parts that should train"
        )
    optimizer = instantiate(cfg.model.optimizer, params)
    scheduler = instantiate(cfg.model.lr_scheduler, optimizer) if cfg.model.lr_scheduler else None
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line (reduced across ranks when logged)."""

    loss: float = 0.0
    components: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    steps: int = 0
    audio_seconds: float = 0.0
    padded_seconds: float = 0.0
    target_tokens: float = 0.0
    data_wait: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report with its whole metrics dict at INFO; our own progress lines say it better.
    (Its logger is named after the module's file path, so it is not under the "ray.train" hierarchy.)"""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as ray_train_context
    except ImportError:  # a Ray without Train v2's internals: its reports stay visible, nothing breaks
        return
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


@dataclass
class WorkerRun:
    """Everything of one rank's run that validation and checkpointing need, in one named record."""

    model: torch.nn.Module  # as trained: wrapped by DDP / FSDP2 when there are several workers
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainingState
    settings: LoopSettings
    rank: int
    world: int
    metrics_logger: MetricsLogger | None
    autocast: Any  # the precision's autocast context factory

    @property
    def cfg(self) -> ExperimentConfig:
        return self.settings.cfg

    @property
    def unwrapped(self) -> torch.nn.Module:
        return unwrap(self.model)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    _quiet_ray_train_reports()
    logging.getLogger("orchestrator").setLevel(logging.INFO)
    settings: LoopSettings = config["settings"]
    cfg = settings.cfg
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(settings.threads_per_worker)
    torch.manual_seed(cfg.trainer.seed)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        keep_freed_memory_in_heap()

    model = settings.model.build(cfg.model, cfg.data).to(device)
    autocast = setup_precision(model, cfg.trainer.precision, device)
    model = wrap_for_distribution(model, cfg.trainer.strategy, device)
    optimizer, scheduler = setup_optimizer(model, cfg)

    state = TrainingState()
    checkpoint = newer_checkpoint(ray.train.get_checkpoint(), settings.resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(Path(directory), model, optimizer, scheduler, rank)
        if rank == 0:
            say(f"resumed from checkpoint at step {state.step}")

    metrics_logger = (
        MetricsLogger(settings.tracking_uri, settings.mlflow_run_id)
        if rank == 0 and settings.tracking_uri and settings.mlflow_run_id
        else None
    )
    run = WorkerRun(model, optimizer, scheduler, state, settings, rank, world, metrics_logger, autocast)
    batches = iter(iterate_batches(ray.train.get_dataset_shard("train")))
    max_steps, accumulate = cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches
    stats = IntervalStats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    run_started = time.perf_counter()
    start_step = last_validated = state.step

    while state.step < max_steps:
        model.train()
        micro_batches = _next_micro_batches(batches, accumulate, stats)
        if micro_batches is None:  # trainer.max_epochs reached: the equal split ends every rank at this step
            say(f"data exhausted after {cfg.trainer.max_epochs} epoch(s) at step {state.step}")
            break
        for index, (batch, meta) in enumerate(micro_batches):
            sync = index == len(micro_batches) - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else model.no_sync(), autocast():
                out = model(to_device(batch, device))
            (out["loss"] / len(micro_batches)).backward()
            _accumulate(stats, out, meta, len(micro_batches))
        clip = cfg.trainer.gradient_clip_val
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip if clip else math.inf)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        stats.steps += 1
        stats.grad_norm += float(grad_norm)
        state.data_position = micro_batches[-1][1].position.to_dict()

        last_step = state.step >= max_steps
        validate_now = state.step % cfg.trainer.val_check_interval == 0 or last_step
        if state.step % cfg.trainer.log_every_n_steps == 0 or validate_now:
            metrics = _reduce_interval(stats, optimizer, world)
            if rank == 0:
                say(format_progress(state.step, max_steps, metrics, run_started, start_step))
            if metrics_logger:
                metrics_logger.log(metrics, state.step)
            stats = IntervalStats()
            if not validate_now:
                ray.train.report(metrics)
        if validate_now:
            report_validation_and_checkpoint(run)
            last_validated = state.step
            stats = IntervalStats()  # throughput figures exclude validation time
    if state.step > last_validated:  # stopped by the data, not by max_steps: keep the final weights too
        report_validation_and_checkpoint(run)
    if rank == 0:
        say(f"training finished at step {state.step}")


def _next_micro_batches(batches: Iterator, accumulate: int, stats: IntervalStats) -> list | None:
    waited = time.perf_counter()
    out = []
    for _ in range(accumulate):
        try:
            out.append(next(batches))
        except StopIteration:
            return None
    stats.data_wait += time.perf_counter() - waited
    return out


def _accumulate(stats: IntervalStats, out: dict[str, torch.Tensor], meta: BatchMeta, parts: int) -> None:
    stats.loss += float(out["loss"].detach()) / parts
    for key, value in out.items():
        if key.endswith("_loss"):
            stats.components[key] = stats.components.get(key, 0.0) + float(value.detach()) / parts
    stats.target_tokens += float(out.get("num_target_tokens", 0))
    stats.audio_seconds += meta.audio_seconds
    stats.padded_seconds += meta.padded_seconds
    for key, value in meta.counters.items():
        stats.counters[key] = stats.counters.get(key, 0.0) + float(value)


def _reduce_interval(stats: IntervalStats, optimizer, world: int) -> dict[str, float]:
    """Loss and grad norm averaged over ranks; throughput and counters summed over ranks."""
    elapsed = max(time.perf_counter() - stats.started, 1e-9)
    # Every rank must all-reduce a tensor of the same length: the key sets are fixed, never data-dependent.
    component_keys = sorted(stats.components)  # the model's loss components: the same on every rank
    counter_keys = COUNTER_NAMES
    averaged = [stats.loss, stats.grad_norm, stats.data_wait] + [stats.components[k] for k in component_keys]
    summed = [stats.audio_seconds, stats.padded_seconds, stats.target_tokens] + [
        stats.counters.get(k, 0.0) for k in counter_keys
    ]
    values = torch.tensor(averaged + summed, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(values)  # gloo/nccl sum; averaged entries are divided by world below
    values = values.tolist()
    steps = max(stats.steps, 1)
    n_avg = len(averaged)
    loss, grad_norm, data_wait = (v / world for v in values[:3])
    metrics = {
        "loss": loss / steps,
        "step_time_ms": 1000.0 * elapsed / steps,  # wall time per optimizer step, data wait included
        "lr": float(optimizer.param_groups[0]["lr"]),
        "grad_norm": grad_norm / steps,
        "data_wait_fraction": min(1.0, (data_wait / world) / elapsed),
    }
    for key, value in zip(component_keys, values[3:n_avg], strict=True):
        metrics[key] = value / world / steps
    audio, padded, tokens = values[n_avg : n_avg + 3]
    metrics["audio_seconds_per_sec"] = audio / elapsed
    metrics["tokens_per_sec"] = tokens / elapsed
    metrics["padding_fraction"] = 1.0 - audio / padded if padded > 0 else 0.0
    for key, value in zip(counter_keys, values[n_avg + 3 :], strict=True):
        metrics[f"data/{key}"] = value
    return metrics


def average_buffers(model: torch.nn.Module, world: int) -> None:
    """Average floating-point persistent buffers (BatchNorm running statistics) over ranks.

    DDP runs with broadcast_buffers=False (some buffers differ in size per rank), so each rank's statistics
    drift apart; non-persistent buffers (positional tables) are left alone.
    """
    if world == 1:
        return
    persistent = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        if name in persistent and buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)


def report_validation_and_checkpoint(run: WorkerRun) -> None:
    """Validate every set, log the metrics, and report them to Ray Train together with a checkpoint."""
    cfg, state = run.cfg, run.state
    metrics: dict[str, float] = {"step": float(state.step)}
    average_buffers(run.unwrapped, run.world)  # every rank validates, and rank 0 saves, the same BatchNorm statistics
    if run.settings.validation_sets:
        run.unwrapped.eval()
        with torch.no_grad(), run.autocast():
            metrics.update(
                run_validation(
                    run.unwrapped, run.settings.model, run.settings.validation_sets, cfg, run.rank, run.world
                )
            )
        if run.rank == 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("val_") and k.count("_") <= 2)
            say(f"validation at step {state.step}: {shown}")
        if run.metrics_logger:
            run.metrics_logger.log(metrics, state.step)
    state.metrics = metrics
    if not cfg.exp_manager.create_checkpoint_callback:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(
            Path(tmp), run.model, run.optimizer, run.scheduler, state, to_yaml(cfg), run.rank == 0, run.rank
        )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_dir_name(state.step, cfg.exp_manager.checkpoint_callback_params.filename),
            # uploads, then marks the checkpoint complete once every rank's files are in place
            checkpoint_upload_fn=functools.partial(persist_checkpoint, rank=run.rank, world=run.world),
        )
