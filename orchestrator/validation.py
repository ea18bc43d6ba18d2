"""Validation on every rank, then one set of metrics: losses and counts summed, hypotheses gathered.

Each rank scores its own slice of every validation set (the pipeline gives each cut to exactly one rank),
so val_loss, val_acc and WER/BLEU are computed over the whole set once, whatever the worker count.
"""

from __future__ import annotations

from typing import Any

import ray.train
import torch
import torch.distributed as dist

from orchestrator.config import ExperimentConfig
from orchestrator.data.pipeline import iterate_batches
from orchestrator.scoring import asr_bleu
from orchestrator.worker_io import say, to_device
from speech_models.metrics import corpus_bleu, corpus_wer

DUPLEX_PART_SUMS = ("text_loss_sum", "audio_loss_sum", "num_audio_correct", "num_audio_tokens")
DUPLEX_PART_METRICS = ("text_loss", "audio_loss", "audio_acc")


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


def validate_dataset(model: torch.nn.Module, name: str, cfg: ExperimentConfig, world: int) -> dict[str, Any]:
    """Sums and texts for one validation set, combined over all ranks."""
    device = next(model.parameters()).device
    loss_sum = tokens = correct = 0.0
    # Duplex models also return their unweighted text and audio losses and codec accuracy: those compare
    # runs with different loss weights, where val_loss changes scale with the weights.
    parts = dict.fromkeys(DUPLEX_PART_SUMS, 0.0)
    hypotheses: list[str] = []
    references: list[str] = []
    generated_audio: list = []  # duplex models: the agent audio they spoke, for ASR-BLEU
    limit = cfg.trainer.limit_val_batches
    for index, (batch, _meta) in enumerate(iterate_batches(ray.train.get_dataset_shard(f"val_{name}"))):
        if limit is not None and index >= limit:
            break  # safe: the next validation pass starts a fresh run of this dataset
        out = model.validation_step(to_device(batch, device))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["num_tokens"])
        correct += float(out["num_correct"])
        for key in parts:
            parts[key] += float(out.get(key, 0.0))
        hypotheses.extend(out.get("hypotheses", []))
        references.extend(out.get("references", []))
        if cfg.model.scoring_asr:
            generated_audio.extend(out.get("generated_audio", []))
    loss_sum, tokens, correct, *part_sums = _sum([loss_sum, tokens, correct, *parts.values()], world)
    parts = dict(zip(parts, part_sums, strict=True))
    duplex_parts = {}
    if parts["num_audio_tokens"] > 0:
        duplex_parts = {
            "text_loss": parts["text_loss_sum"] / max(tokens, 1.0),
            "audio_loss": parts["audio_loss_sum"] / max(tokens, 1.0),
            "audio_acc": parts["num_audio_correct"] / parts["num_audio_tokens"],
        }
    return {
        "loss": loss_sum / max(tokens, 1.0),
        "acc": correct / max(tokens, 1.0),
        **duplex_parts,
        "hypotheses": _gather(hypotheses, world),
        "references": _gather(references, world),
        "generated_audio": _gather(generated_audio, world),
    }


def run_validation(
    model: torch.nn.Module, names: list[str], cfg: ExperimentConfig, rank: int, world: int
) -> dict[str, float]:
    """val_loss / val_acc / val_wer (SALM) or val_txt_bleu, val_text_loss, val_audio_loss, val_audio_acc
    (duplex), per set (`_<name>`) and averaged."""
    per_set = {name: validate_dataset(model, name, cfg, world) for name in names}
    text_metric = "wer" if cfg.model.resolved_model_type() == "salm" else "txt_bleu"
    metrics: dict[str, float] = {}
    for name, result in per_set.items():
        metrics[f"val_loss_{name}"] = result["loss"]
        metrics[f"val_acc_{name}"] = result["acc"]
        for key in DUPLEX_PART_METRICS:
            if key in result:
                metrics[f"val_{key}_{name}"] = result[key]
        if result["references"]:
            score = corpus_wer if text_metric == "wer" else corpus_bleu
            metrics[f"val_{text_metric}_{name}"] = score(result["hypotheses"], result["references"])
    if cfg.model.scoring_asr and rank == 0:
        for name, result in per_set.items():
            if result["generated_audio"]:
                metrics[f"val_asr_bleu_{name}"], result["asr_transcripts"] = asr_bleu(
                    cfg.model.scoring_asr, result["generated_audio"], cfg.data.target_sample_rate, result["references"]
                )
    for key in ("loss", "acc", *DUPLEX_PART_METRICS, text_metric, "asr_bleu"):
        values = [metrics[f"val_{key}_{n}"] for n in names if f"val_{key}_{n}" in metrics]
        if values:
            metrics[f"val_{key}"] = sum(values) / len(values)
    if rank == 0:
        for name, result in per_set.items():
            for hyp, ref in list(zip(result["hypotheses"], result["references"], strict=False))[:2]:
                say(f"  [{name}] ref: {ref}\n  [{name}] hyp: {hyp}")
    return metrics
