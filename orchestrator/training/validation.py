"""Validation on every rank, then one set of metrics: counts summed, hypotheses gathered, metrics as the model's
registry entry defines them.

Each rank scores its own slice of every validation set (the pipeline gives each cut to exactly one rank), so
every metric is computed over the whole set once, whatever the worker count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    model: torch.nn.Module, entry: ModelEntry, name: str, cfg: ExperimentConfig, world: int
) -> SetTotals:
    """This rank's batches of one validation set, summed, then combined over all ranks."""
    device = next(model.parameters()).device
    names = entry.count_names()  # the same on every rank: the all-reduce below needs one fixed vector
    totals = SetTotals(counts=dict.fromkeys(names, 0.0))
    keep_audio = bool(cfg.model.scoring_asr) and entry.speaks
    limit = cfg.trainer.limit_val_batches
    for index, (batch, _meta) in enumerate(iterate_batches(ray.train.get_dataset_shard(f"val_{name}"))):
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
    model: torch.nn.Module, entry: ModelEntry, names: list[str], cfg: ExperimentConfig, rank: int, world: int
) -> dict[str, float]:
    """Every metric of the model's entry per set (`val_<metric>_<set>`) and averaged over sets (`val_<metric>`);
    with `model.scoring_asr`, ASR-BLEU of the speech of models that speak."""
    per_set = {name: validate_dataset(model, entry, name, cfg, world) for name in names}
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
