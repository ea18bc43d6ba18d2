"""Helpers for tests, benchmarks and examples that need a real training run at toy scale (shipped, like
lhotse.testing, so every consumer builds the same thing)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from orchestrator.config import ExperimentConfig


def tiny_training_overrides(demo_dir: str | Path, run_dir: str | Path, max_steps: int = 6) -> list[str]:
    """Overrides that shrink configs/demo/salm.yaml to a seconds-long run on `tiny_demo` assets."""
    return [
        f"model.pretrained_llm={demo_dir}/llm",
        "model.perception.encoder.n_layers=1",
        "model.perception.encoder.d_model=32",
        "model.perception.encoder.n_heads=2",
        "model.perception.encoder.subsampling_conv_channels=16",
        f"data.train_ds.input_cfg.0.shar_path={demo_dir}/asr/train",
        f"data.validation_ds.input_cfg.0.shar_path={demo_dir}/asr/val",
        "data.train_ds.batch_duration=12",
        "data.train_ds.bucket_buffer_size=40",
        "data.validation_ds.batch_size=8",
        f"trainer.max_steps={max_steps}",
        f"trainer.val_check_interval={min(3, max_steps)}",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "model.lr_scheduler.warmup_steps=1",
        f"exp_manager.explicit_log_dir={run_dir}",
    ]


def tiny_duplex_overrides(demo_dir: str | Path, run_dir: str | Path, max_steps: int = 4) -> list[str]:
    """Overrides that shrink configs/demo/s2s_duplex*.yaml to a seconds-long run on `tiny_demo` assets."""
    return [
        f"model.pretrained_llm={demo_dir}/llm",
        f"model.pretrained_audio_codec={demo_dir}/codec",
        "model.perception.encoder.n_layers=1",
        "model.perception.encoder.d_model=32",
        "model.perception.encoder.n_heads=2",
        "model.perception.encoder.subsampling_conv_channels=16",
        f"data.train_ds.input_cfg.0.shar_path={demo_dir}/s2s/train",
        f"data.validation_ds.datasets.demo_val.shar_path={demo_dir}/s2s/val",
        "data.train_ds.batch_duration=20",
        "data.train_ds.bucket_buffer_size=20",
        f"trainer.max_steps={max_steps}",
        f"trainer.val_check_interval={max(1, max_steps // 2)}",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "model.lr_scheduler.warmup_steps=1",
        f"exp_manager.explicit_log_dir={run_dir}",
    ]


def write_checkpoint(
    directory: str | Path, model: torch.nn.Module, cfg: ExperimentConfig, step: int = 0, metrics: dict | None = None
) -> Path:
    """Write `model` as a checkpoint exactly as the training loop's rank 0 does (`save_checkpoint`, with the
    optimizer `cfg` names): for tests, benchmarks, and bringing a model trained elsewhere into this format."""
    from orchestrator.config import to_yaml
    from orchestrator.storage.checkpoints import TrainingState, mark_complete, save_checkpoint
    from orchestrator.training.loop import setup_optimizer

    directory = Path(directory)
    optimizer, scheduler = setup_optimizer(model, cfg)
    state = TrainingState(step=step, metrics=dict(metrics or {}))
    save_checkpoint(directory, model, optimizer, scheduler, state, to_yaml(cfg), write_model=True, rank=0)
    mark_complete(str(directory))
    return directory


def pad_audio_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """A model-free collator: right-padded audio plus lengths, ids and texts (tests, benchmarks)."""
    lens = np.array([len(e["audio"]) for e in examples], dtype=np.int64)
    audio = np.zeros((len(examples), int(lens.max())), dtype=np.float32)  # (B, T)
    for row, e in enumerate(examples):
        audio[row, : len(e["audio"])] = e["audio"]
    batch: dict[str, Any] = {
        "audio": audio,
        "audio_lens": lens,
        "ids": [e["id"] for e in examples],
        "text": [e["text"] for e in examples],
    }
    if all("target_audio" in e for e in examples):
        tlens = np.array([len(e["target_audio"]) for e in examples], dtype=np.int64)
        target = np.zeros((len(examples), int(tlens.max())), dtype=np.float32)  # (B, T_target)
        for row, e in enumerate(examples):
            target[row, : len(e["target_audio"])] = e["target_audio"]
        batch["target_audio"], batch["target_audio_lens"] = target, tlens
    return batch
