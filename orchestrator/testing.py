"""Helpers for tests, benchmarks and examples that need a real training run at toy scale (shipped, like
lhotse.testing, so every consumer builds the same thing)."""

from __future__ import annotations

from pathlib import Path


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
