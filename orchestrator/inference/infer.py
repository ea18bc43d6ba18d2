"""`speechlm infer`: run a trained model on audio files.

Models that transcribe (SALM) print the generated text per file (a transcript, or an answer to `--prompt`);
models that speak (duplex) print the agent's text and write its speech to `<out-dir>/<stem>.agent.wav`, never
over an existing file (the next free `<stem>.agent2.wav`, ... is taken). A file that is missing, empty, not
audio, truncated or NaN/inf gets an error naming it; the other files are still answered.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orchestrator.data.audio import AudioFileError, check_samples, decode_audio, wav_truncation
from orchestrator.inference.sources import ModelSource, SourceError, check_device, input_sample_rate, load_model
from orchestrator.storage import atomic


@dataclass
class InferResult:
    audio_path: str
    text: str
    output_audio: str | None = None  # duplex: the agent's speech as a WAV file
    seconds: float = 0.0  # processing time of the batch this file was in, shared out by audio length
    audio_seconds: float = 0.0
    error: str | None = None  # why this file was not processed (the others still were)


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """An audio file as float32 mono at `sample_rate`, decoded and resampled as the data pipeline does;
    AudioFileError naming the file when it is missing, empty, not audio, truncated, or holds NaN/inf."""
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    data = path.read_bytes()
    if not data:
        raise AudioFileError(f"audio file {path} is empty (0 bytes)")
    if cut_short := wav_truncation(data):
        raise AudioFileError(f"audio file {path} is a truncated WAV: {cut_short[1]} of its {cut_short[0]} samples")
    try:
        audio = decode_audio(data, None, sample_rate)
    except Exception as exc:  # soundfile's errors for anything that is not audio it can decode
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise AudioFileError(f"{path} is not an audio file soundfile can read ({reason})") from None
    check_samples(audio, f"audio file {path}")
    return audio


def _unique_wav_path(out_dir: Path, stem: str, taken: set[Path]) -> Path:
    """`<stem>.agent.wav`, or the first of `<stem>.agent2.wav`, ... that neither exists nor is taken by this run."""
    path, n = out_dir / f"{stem}.agent.wav", 1
    while path in taken or path.exists():
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
    if batch_size < 1:
        raise SourceError(f"--batch-size {batch_size} must be at least 1")
    check_device(device)
    model, autocast = loaded or load_model(source, device)
    rate = input_sample_rate(model)
    failed: dict[int, InferResult] = {}
    readable: list[tuple[int, str | Path, np.ndarray]] = []
    for index, path in enumerate(audio_paths):
        try:
            readable.append((index, path, read_audio(path, rate)))
        except AudioFileError as exc:
            failed[index] = InferResult(str(path), "", error=str(exc))
    out = Path(out_dir)
    taken: set[Path] = set()
    done: dict[int, InferResult] = {}
    for start in range(0, len(readable), batch_size):
        batch = readable[start : start + batch_size]
        chunk, paths = [a for _, _, a in batch], [p for _, p, _ in batch]
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
                buffer = io.BytesIO()
                sf.write(buffer, np.clip(speech[i], -1.0, 1.0), int(model.target_sample_rate), "PCM_16", format="WAV")
                atomic.write_bytes(wav_path, buffer.getvalue())
                result.output_audio = str(wav_path)
            done[batch[i][0]] = result
    return [done[i] if i in done else failed[i] for i in range(len(audio_paths))]
