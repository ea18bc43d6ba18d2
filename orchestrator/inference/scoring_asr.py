"""ASR-BLEU for duplex validation: transcribe the generated agent audio with `model.scoring_asr` in a separate
Ray actor, so the training process never holds the scoring model, then BLEU against the agent texts.

`scoring_asr` is one of:
- a checkpoint (`step=...` dir) or run dir of this project's SALM (a model that transcribes): loaded as
  `speechlm infer` loads it, its latest checkpoint for a run dir;
- a transformers ASR model (a local dir or a hub id), run through `transformers.pipeline`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from speech_models.audio import resample_array
from speech_models.metrics import corpus_bleu

if TYPE_CHECKING:
    from orchestrator.inference.sources import ModelSource

logger = logging.getLogger(__name__)

ACTOR_NAME = "speechlm_scoring_asr:{}"


class _TranscriberCheckpoint:
    """A trained model of this project that transcribes (a SALM), prompted as it was validated, greedy."""

    def __init__(self, source: ModelSource) -> None:
        from orchestrator.inference.sources import input_sample_rate, load_model

        if not source.entry.transcribes:
            raise ValueError(f"scoring_asr {source.path} is a {source.entry.name} model, which does not transcribe")
        self.model, self.autocast = load_model(source)
        self.sample_rate = input_sample_rate(self.model)

    def __call__(self, audios: list[np.ndarray]) -> list[str]:
        import torch

        with torch.no_grad(), self.autocast():
            return self.model.transcribe(audios)


class _PipelineTranscriber:
    """Any transformers ASR model (Whisper, wav2vec2, Parakeet CTC, ...)."""

    def __init__(self, source: str) -> None:
        from transformers import pipeline

        self.pipe = pipeline("automatic-speech-recognition", model=source, device="cpu")
        self.sample_rate = int(self.pipe.feature_extractor.sampling_rate)

    def __call__(self, audios: list[np.ndarray]) -> list[str]:
        outputs = self.pipe([{"raw": a, "sampling_rate": self.sample_rate} for a in audios])
        return [o["text"] for o in outputs]


def _checkpoint_source(source: str) -> ModelSource | None:
    """`source` as a checkpoint of this project (itself, or a run dir's latest), or None if it is not ours."""
    from orchestrator.inference.sources import resolve_source
    from orchestrator.storage import checkpoints

    path = Path(source)
    if not (checkpoints.is_checkpoint(source) or (path.is_dir() and checkpoints.latest_checkpoint(source))):
        return None
    return resolve_source(source, "latest")


class ScoringASR:
    """The Ray actor body: load once, transcribe many times."""

    def __init__(self, source: str) -> None:
        checkpoint = _checkpoint_source(source)
        self.transcriber = _TranscriberCheckpoint(checkpoint) if checkpoint else _PipelineTranscriber(source)

    def transcribe(self, audios: list[np.ndarray], sample_rate: int) -> list[str]:
        target = self.transcriber.sample_rate
        audios = [resample_array(np.asarray(a, dtype=np.float32), sample_rate, target) for a in audios]
        return self.transcriber(audios)


def scoring_actor(source: str) -> Any:
    """The named scoring actor for `source`, created on first use and shared by later validations."""
    import ray

    remote = ray.remote(num_cpus=0)(ScoringASR)  # validation pauses training, so it borrows the workers' CPUs
    # Owned by the calling worker (rank 0): it goes away with the run, and a restarted run makes a new one.
    return remote.options(name=ACTOR_NAME.format(abs(hash(source))), get_if_exists=True).remote(source)


def asr_bleu(source: str, audios: list[np.ndarray], sample_rate: int, references: list[str]) -> tuple[float, list[str]]:
    """BLEU of the scoring ASR's transcripts of `audios` against `references`, and the transcripts."""
    import ray

    transcripts = ray.get(scoring_actor(source).transcribe.remote(audios, sample_rate))
    return corpus_bleu(transcripts, references), transcripts
