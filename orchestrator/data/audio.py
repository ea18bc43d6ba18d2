"""Encoded audio bytes (from a Shar tar or a file) -> float32 mono at the rate a model wants, and the checks that
tell usable audio from damaged audio (`data shar`, `data inspect`, `infer`)."""

from __future__ import annotations

import io

import numpy as np

from speech_models.audio import resample_array


def decode_audio(
    data: bytes, manifest: bytes | None, sample_rate: int, offset: float = 0.0, duration: float | None = None
) -> np.ndarray:
    """Encoded audio -> float32 mono at `sample_rate`. soundfile first; lhotse (with the cut's manifest) for
    formats soundfile cannot read (e.g. opus via ffmpeg). `offset` / `duration` (seconds) keep only that part of
    the file (NeMo manifests' `offset`, a Lhotse cut's `start`)."""
    import soundfile as sf

    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        audio = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)
    except Exception:
        if manifest is None:
            raise
        from lhotse.serialization import decode_json_line, deserialize_item
        from lhotse.shar.utils import fill_shar_placeholder

        recording = deserialize_item(decode_json_line(manifest.decode("utf-8")))
        fill_shar_placeholder(manifest=recording, data=data, tarpath="audio")
        audio = recording.load_audio().astype(np.float32)
        audio = audio[0] if audio.shape[0] == 1 else audio.mean(axis=0)
        rate = recording.sampling_rate
    if offset or duration is not None:
        first = round(offset * rate)
        last = len(audio) if duration is None else first + round(duration * rate)
        if first >= len(audio):
            raise ValueError(f"offset {offset:g} s is past the end of its {len(audio) / rate:g} s audio file")
        audio = audio[first:last]
    return np.ascontiguousarray(resample_array(audio, int(rate), sample_rate), dtype=np.float32)


class AudioFileError(ValueError):
    """Audio that cannot be used as it is (unreadable, empty, truncated, NaN/inf samples); names the file."""


def samples_problem(audio: np.ndarray) -> str | None:
    """What is wrong with decoded samples that no model can use (none at all, NaN/inf values), or None."""
    if audio.size == 0:
        return "holds no audio samples (0 s)"
    finite = np.isfinite(audio)
    if not finite.all():
        return f"has {int(audio.size - np.count_nonzero(finite))} NaN or infinite sample(s) of {audio.size}"
    return None


def check_samples(audio: np.ndarray, what: str) -> None:
    """Raise AudioFileError naming `what` when its decoded samples are empty or hold NaN/inf values."""
    if problem := samples_problem(audio):
        raise AudioFileError(
            f"{what} {problem}; the file is damaged or was written from a broken float array: re-export it "
            "(e.g. as 16-bit PCM) or remove it"
        )


def wav_truncation(data: bytes, total_size: int | None = None) -> tuple[int, int] | None:
    """(frames the WAV header declares, frames actually present) when a RIFF/WAVE file's data chunk is cut short;
    None for a complete WAV or anything else. soundfile reads a truncated WAV without complaint, so a
    2 s transcript would silently be paired with the 0.67 s of audio that survived.

    `data`: the file, or its first bytes when `total_size` (the file's size) is given."""
    total = len(data) if total_size is None else total_size
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset, block_align = 12, 0
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        body = offset + 8
        if chunk == b"fmt " and body + 14 <= len(data):
            block_align = int.from_bytes(data[body + 12 : body + 14], "little")
        if chunk == b"data":
            if size in (0, 0xFFFFFFFF) or block_align <= 0:  # streamed WAVs leave the size unset
                return None
            present = total - body
            return (size // block_align, present // block_align) if present < size else None
        offset = body + size + (size & 1)
    return None
