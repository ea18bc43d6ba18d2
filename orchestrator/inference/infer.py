"""`speechlm infer`: run a trained model on audio files.

Models that transcribe (SALM) print the generated text per file (a transcript, or an answer to `--prompt`);
models that speak (duplex) print the agent's text and write its speech to `<out-dir>/<stem>.agent.wav`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orchestrator.data.audio import decode_audio
from orchestrator.inference.sources import ModelSource, SourceError, input_sample_rate, load_model


@dataclass
class InferResult:
    audio_path: str
    text: str
    output_audio: str | None = None  # duplex: the agent's speech as a WAV file
    seconds: float = 0.0  # processing time of the batch this file was in, shared out by audio length
    audio_seconds: float = 0.0


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """An audio file as float32 mono at `sample_rate`, decoded and resampled as the data pipeline does."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    return decode_audio(path.read_bytes(), None, sample_rate)


def _unique_wav_path(out_dir: Path, stem: str, taken: set[Path]) -> Path:
    path, n = out_dir / f"{stem}.agent.wav", 1
    while path in taken:
        n += 1
        path = out_dir / f"{stem}.agent{n}.wav"
    taken.add(path)
    return path


def infer(
    source: ModelSource,
    audio_paths: Sequence[str | Path],
    *,
    prompt: str | None = None,
    system_prompt: str | None = None,
    out_dir: str | Path = ".",
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    loaded: tuple[torch.nn.Module, Callable] | None = None,
) -> list[InferResult]:
    """Models that transcribe: the generated text per file (a transcript, or an answer to `prompt`). Models that
    speak: the agent's text and its speech, written to `out_dir/<stem>.agent.wav` at data.target_sample_rate."""
    import soundfile as sf

    entry = source.entry
    if not entry.transcribes and (prompt or system_prompt):
        raise SourceError(
            f"--prompt / --system-prompt only apply to models that take a text prompt; a {entry.name} model "
            "listens, it does not read"
        )
    model, autocast = loaded or load_model(source, device)
    rate = input_sample_rate(model)
    audios = [read_audio(p, rate) for p in audio_paths]
    out = Path(out_dir)
    taken: set[Path] = set()
    results: list[InferResult] = []
    for start in range(0, len(audios), batch_size):
        chunk, paths = audios[start : start + batch_size], list(audio_paths[start : start + batch_size])
        began = time.perf_counter()
        with torch.no_grad(), autocast():
            if entry.speaks:
                texts, speech = model.respond(chunk)
            else:
                texts, speech = model.transcribe(chunk, prompt, system_prompt, max_new_tokens), None
        seconds = time.perf_counter() - began
        total = sum(len(a) for a in chunk) / rate
        for i, (path, text) in enumerate(zip(paths, texts, strict=True)):
            audio_seconds = len(chunk[i]) / rate
            result = InferResult(str(path), text, None, seconds * audio_seconds / max(total, 1e-9), audio_seconds)
            if speech is not None:
                out.mkdir(parents=True, exist_ok=True)
                wav_path = _unique_wav_path(out, Path(path).stem, taken)
                wav = np.clip(speech[i], -1.0, 1.0)
                sf.write(str(wav_path), wav, int(model.target_sample_rate), subtype="PCM_16")
                result.output_audio = str(wav_path)
            results.append(result)
    return results
