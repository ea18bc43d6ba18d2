"""ASR-BLEU for duplex validation: transcribe the generated agent audio with `model.scoring_asr` in a separate
Ray actor, so the training process never holds the scoring model, then BLEU against the agent texts.

`scoring_asr` is one of:
- a checkpoint (`step=...` dir) or run dir of this project's SALM: rebuilt from its saved config and weights;
- a transformers ASR model (a local dir or a hub id), run through `transformers.pipeline`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ACTOR_NAME = "speechlm_scoring_asr:{}"


class _SalmTranscriber:
    """A SALM checkpoint of this project used as an ASR model (greedy, the prompt it was trained with)."""

    def __init__(self, checkpoint: Path) -> None:
        import yaml

        from orchestrator.checkpointing import CONFIG_FILE, load_model_weights
        from orchestrator.config import experiment_from_dict
        from speech_models.registry import build_collator, build_model

        cfg = experiment_from_dict(yaml.safe_load((checkpoint / CONFIG_FILE).read_text())).cfg
        if cfg.model.resolved_model_type() != "salm":
            raise ValueError(f"scoring_asr {checkpoint} is a {cfg.model.resolved_model_type()} checkpoint, not SALM")
        self.model = build_model(cfg.model, cfg.data).eval()
        load_model_weights(checkpoint, self.model)
        self.collator = build_collator(cfg.model, cfg.data, cfg.data.train_ds)
        self.sample_rate = cfg.data.train_ds.sample_rate

    def __call__(self, audios: list[np.ndarray]) -> list[str]:
        import torch

        examples = [
            {"id": str(i), "duration": len(a) / self.sample_rate, "audio": a, "text": "", "supervisions": []}
            for i, a in enumerate(audios)
        ]
        batch = self.collator(examples)
        with torch.no_grad():
            _, texts = self.model.generate(batch["prompt_ids"], batch["audios"], batch["audio_lens"])
        return texts


class _PipelineTranscriber:
    """Any transformers ASR model (Whisper, wav2vec2, Parakeet CTC, ...)."""

    def __init__(self, source: str) -> None:
        from transformers import pipeline

        self.pipe = pipeline("automatic-speech-recognition", model=source, device="cpu")
        self.sample_rate = int(self.pipe.feature_extractor.sampling_rate)

    def __call__(self, audios: list[np.ndarray]) -> list[str]:
        outputs = self.pipe([{"raw": a, "sampling_rate": self.sample_rate} for a in audios])
        return [o["text"] for o in outputs]


def _resolve_checkpoint(source: str) -> Path | None:
    """A SALM checkpoint dir for `source` (itself, or the latest in a run dir), or None if it is not ours."""
    from orchestrator import storage

    path = Path(source)
    if (path / "state.json").is_file():
        return path
    latest = storage.latest_checkpoint(str(path)) if path.is_dir() else None
    return Path(latest) if latest else None


class ScoringASR:
    """The Ray actor body: load once, transcribe many times."""

    def __init__(self, source: str) -> None:
        checkpoint = _resolve_checkpoint(source)
        self.transcriber = _SalmTranscriber(checkpoint) if checkpoint else _PipelineTranscriber(source)

    def transcribe(self, audios: list[np.ndarray], sample_rate: int) -> list[str]:
        import torch

        from speech_models.codec import resample

        target = self.transcriber.sample_rate
        if sample_rate != target:
            audios = [resample(torch.from_numpy(a)[None], sample_rate, target)[0].numpy() for a in audios]
        return self.transcriber([np.asarray(a, dtype=np.float32) for a in audios])


def scoring_actor(source: str) -> Any:
    """The named scoring actor for `source`, created on first use and shared by later validations."""
    import ray

    remote = ray.remote(num_cpus=0)(ScoringASR)  # validation pauses training, so it borrows the workers' CPUs
    # Owned by the calling worker (rank 0): it goes away with the run, and a restarted run makes a new one.
    return remote.options(name=ACTOR_NAME.format(abs(hash(source))), get_if_exists=True).remote(source)


def asr_bleu(source: str, audios: list[np.ndarray], sample_rate: int, references: list[str]) -> tuple[float, list[str]]:
    """BLEU of the scoring ASR's transcripts of `audios` against `references`, and the transcripts."""
    import ray

    from speech_models.metrics import corpus_bleu

    transcripts = ray.get(scoring_actor(source).transcribe.remote(audios, sample_rate))
    return corpus_bleu(transcripts, references), transcripts
