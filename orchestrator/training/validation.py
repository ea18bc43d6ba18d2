"""Validation on every rank, then one set of metrics: counts summed, hypotheses gathered, metrics as the model's
registry entry defines them.

Each rank scores its own slice of every validation set (the pipeline gives each cut to exactly one rank), so
every metric is computed over the whole set once, whatever the worker count.

With `trainer.async_validation`, the training ranks validate nothing: Ray Train runs `CheckpointValidator` as a
task of its own on each checkpoint (spare resources), which scores every set alone (a world of one) with the
same code, logs the metrics to the run's MLflow run and hands them to Ray Train for the checkpoint's ranking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from orchestrator.config import ExperimentConfig
from orchestrator.data.stream import iterate_batches
from orchestrator.training.worker_io import say, to_device
from speech_models.registry import ASR_BLEU, ModelEntry


@dataclass
class SetTotals:
    """One validation set, summed over its batches (and over ranks once `combine`d)."""

    counts: dict[str, float]  # the `validation_step` counts the entry's metrics need
    hypotheses: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    generated_audio: list[Any] = field(default_factory=list)  # models that speak: for ASR-BLEU


def _gather(items: list[Any], world: int) -> list[Any]:
    if world == 1:
        return items
    gathered: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def _sum(values: list[float], world: int) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def validate_dataset(
    model: torch.nn.Module, entry: ModelEntry, name: str, cfg: ExperimentConfig, world: int, shard: Any = None
) -> SetTotals:
    """This rank's batches of one validation set (its Ray Train dataset shard, or `shard`), summed, then
    combined over all ranks."""
    device = next(model.parameters()).device
    if shard is None:
        shard = ray.train.get_dataset_shard(f"val_{name}")
    names = entry.count_names()  # the same on every rank: the all-reduce below needs one fixed vector
    totals = SetTotals(counts=dict.fromkeys(names, 0.0))
    keep_audio = bool(cfg.model.scoring_asr) and entry.speaks
    limit = cfg.trainer.limit_val_batches
    for index, (batch, _meta) in enumerate(iterate_batches(shard)):
        if limit is not None and index >= limit:
            break  # safe: the next validation pass starts a fresh run of this dataset
        out = model.validation_step(to_device(batch, device))
        for key in names:
            totals.counts[key] += float(out.get(key, 0.0))
        totals.hypotheses.extend(out.get("hypotheses", []))
        totals.references.extend(out.get("references", []))
        if keep_audio:
            totals.generated_audio.extend(out.get("generated_audio", []))
    summed = _sum([totals.counts[key] for key in names], world)
    return SetTotals(
        counts=dict(zip(names, summed, strict=True)),
        hypotheses=_gather(totals.hypotheses, world),
        references=_gather(totals.references, world),
        generated_audio=_gather(totals.generated_audio, world),
    )


def set_metrics(entry: ModelEntry, per_set: Mapping[str, SetTotals]) -> dict[str, float]:
    """`val_<metric>_<set>` for every set and every metric of the model's entry."""
    metrics: dict[str, float] = {}
    for name, totals in per_set.items():
        for metric in entry.metrics:
            value = metric.value(totals.counts, totals.hypotheses, totals.references)
            if value is not None:
                metrics[f"val_{metric.name}_{name}"] = value
    return metrics


def average_over_sets(metrics: dict[str, float], entry: ModelEntry, names: list[str]) -> dict[str, float]:
    """Add `val_<metric>`: the mean of `val_<metric>_<set>` over the sets that report it."""
    for metric in (*entry.metrics, ASR_BLEU):
        values = [metrics[f"val_{metric.name}_{n}"] for n in names if f"val_{metric.name}_{n}" in metrics]
        if values:
            metrics[f"val_{metric.name}"] = sum(values) / len(values)
    return metrics


def run_validation(
    model: torch.nn.Module,
    entry: ModelEntry,
    names: list[str],
    cfg: ExperimentConfig,
    rank: int,
    world: int,
    shards: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Every metric of the model's entry per set (`val_<metric>_<set>`) and averaged over sets (`val_<metric>`);
    with `model.scoring_asr`, ASR-BLEU of the speech of models that speak. `shards`: the batches of each set
    (default: this rank's Ray Train dataset shards)."""
    shards = shards or {}
    per_set = {name: validate_dataset(model, entry, name, cfg, world, shards.get(name)) for name in names}
    metrics = set_metrics(entry, per_set)
    if cfg.model.scoring_asr and entry.speaks and rank == 0:
        from orchestrator.inference.scoring_asr import asr_bleu

        for name, totals in per_set.items():
            if totals.generated_audio:
                metrics[f"val_{ASR_BLEU.name}_{name}"], _ = asr_bleu(
                    cfg.model.scoring_asr, totals.generated_audio, cfg.data.target_sample_rate, totals.references
                )
    average_over_sets(metrics, entry, names)
    if rank == 0:
        for name, totals in per_set.items():
            for hyp, ref in list(zip(totals.hypotheses, totals.references, strict=False))[:2]:
                say(f"  [{name}] ref: {ref}\n  [{name}] hyp: {hyp}")
    return metrics


def format_validation(step: int, metrics: Mapping[str, float]) -> str:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("val_") and k.count("_") <= 2)
    return f"validation at step {step}: {shown}"


@dataclass(frozen=True)
class CheckpointValidator:
    """Ray Train's validation function (`trainer.async_validation`): validate one checkpoint in a Ray task of its
    own while the training ranks go on. Picklable (it travels to the task); everything heavy happens inside."""

    cfg: ExperimentConfig
    entry: ModelEntry
    validation_sets: list[str]
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None

    def __call__(self, checkpoint: Any, **_: Any) -> dict[str, float]:
        from orchestrator.data.datasets import build_dataset
        from orchestrator.data.plan import plan_dataset, validation_sets
        from orchestrator.storage.checkpoints import load_model_weights, read_saved_state, write_validation_metrics
        from orchestrator.tracking.mlflow_runs import MetricsLogger
        from speech_models.precision import setup_precision

        cfg = self.cfg
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with checkpoint.as_directory() as directory:
            step = int(read_saved_state(directory)["step"])
            model = self.entry.build(cfg.model, cfg.data)
            load_model_weights(Path(directory), model)
        model = model.to(device).eval()
        autocast = setup_precision(model, cfg.trainer.precision, device)
        configs = validation_sets(cfg.data)
        shards = {}
        for name in self.validation_sets:
            collate = self.entry.build_collator(cfg.model, cfg.data, configs[name])
            plan = plan_dataset(f"val_{name}", configs[name], cfg.data, collate, epochs=1, equal_split=False)
            shards[name] = build_dataset(plan, cpus_per_task=0).iterator()
        with torch.no_grad(), autocast():
            metrics = run_validation(model, self.entry, self.validation_sets, cfg, 0, 1, shards)
        metrics["step"] = float(step)
        say(format_validation(step, metrics) + " (validated beside training)")
        write_validation_metrics(checkpoint.path, checkpoint.filesystem, metrics)
        if self.tracking_uri and self.mlflow_run_id:
            MetricsLogger(self.tracking_uri, self.mlflow_run_id).log(metrics, step)
        return metrics
