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


class WordTokenCollator:
    """A model-free collator for every kind of example (plain cuts, conversations, text only): right-pads whatever
    audio the examples have and counts a text's tokens as its words, so that conversations, text-only data and
    token-aware batching are tested and benchmarked without a tokenizer. Picklable, like a model's collator."""

    def token_lengths(self, example: dict[str, Any], token_equivalent_duration: float | None):
        import math

        if "turns" in example:
            texts = [(t["role"], t.get("text", "")) for t in example["turns"] if "audio" not in t]
            answer = len(texts[-1][1].split()) if texts and texts[-1][0] == "assistant" else 0
            prompt = sum(len(text.split()) for _, text in texts) - answer + sum("audio" in t for t in example["turns"])
        else:
            prompt, answer = 1, len(example["text"].split())  # the audio's placeholder, then the transcript
        frames = sum(max(1, math.ceil(d / token_equivalent_duration)) - 1 for d in example.get("audio_durations", []))
        return (prompt + frames, answer, prompt + answer), None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        audios = [a for e in examples for a in (e["audios"] if "turns" in e else [e["audio"]])]
        lens = np.array([len(a) for a in audios], dtype=np.int64)
        audio = np.zeros((len(audios), int(lens.max(initial=0))), dtype=np.float32)  # (N_audio, T)
        for row, a in enumerate(audios):
            audio[row, : len(a)] = a
        return {
            "audio": audio,
            "audio_lens": lens,
            "ids": [e["id"] for e in examples],
            "text": [e["text"] for e in examples],
        }


def cut_counter_entry(control_dir: str | Path, slots: int = 4096):
    """A toy model entry (`model_type: cut_counter`) that counts how often each cut was trained on, for
    exactly-once checks of the data pipeline through real runs, restarts and resumes.

    The counts live in a float64 buffer, `times_trained[<number at the end of the cut id> % slots]`, so they are
    saved with every checkpoint and rolled back with the weights when a run resumes from one: the last
    checkpoint's buffer is exactly what the surviving training history consumed. Checkpoints average floating
    buffers over DDP ranks, so each rank counts a cut `world size` times: the average is the sum over ranks,
    also across resumes with another number of workers.

    Pausing: training forward number N (counted per process) of a rank that finds `<control_dir>/pause_at_<N>`
    renames it to `paused_<pid>` (one rank wins) and sleeps, so a test can kill that worker or its driver at a
    chosen step. The classes are defined here, per call, so Ray pickles them by value with `control_dir`.
    """
    import os
    import time

    import torch
    from torch import nn

    from speech_models.config import PromptDefaults
    from speech_models.registry import LOSS, ModelEntry

    control = Path(control_dir)

    class CutIdCollator:
        def __init__(self, model_cfg, data_cfg, dataset_cfg):
            pass

        def __call__(self, examples):
            return {"x": np.ones((len(examples), 1), np.float32), "ids": [e["id"] for e in examples]}

        def prompt_defaults(self):
            return PromptDefaults()

    class CutCounter(nn.Module):
        def __init__(self, cfg, data_cfg=None):
            super().__init__()
            self.cfg, self.head, self.forwards = cfg, nn.Linear(1, 1), 0
            self.register_buffer("times_trained", torch.zeros(slots, dtype=torch.float64))

        def forward(self, batch):
            self.forwards += 1
            pause = control / f"pause_at_{self.forwards}"
            if pause.exists():
                try:
                    pause.rename(control / f"paused_{os.getpid()}")
                except FileNotFoundError:  # another rank took it
                    pass
                else:
                    time.sleep(3600)
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            for cut_id in batch["ids"]:
                self.times_trained[int(cut_id.rsplit("-", 1)[1]) % slots] += world
            loss = self.head(batch["x"]).pow(2).mean()
            return {"loss": loss, "num_target_tokens": torch.tensor(len(batch["ids"]))}

        def validation_step(self, batch):
            loss = self.head(batch["x"]).pow(2).sum()
            return {"loss_sum": float(loss), "num_tokens": len(batch["ids"])}

    return ModelEntry("cut_counter", model=CutCounter, collator=CutIdCollator, metrics=(LOSS,))
