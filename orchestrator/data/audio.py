"""Encoded audio bytes (from a Shar tar or a file) -> float32 mono at the rate a model wants."""

from __future__ import annotations

import io

import numpy as np

from speech_models.audio import resample_array


def decode_audio(data: bytes, manifest: bytes | None, sample_rate: int) -> np.ndarray:
    """Encoded audio -> float32 mono at `sample_rate`. soundfile first; lhotse (with the cut's manifest) for
    formats soundfile cannot read (e.g. opus via ffmpeg)."""
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
    return np.ascontiguousarray(resample_array(audio, int(rate), sample_rate), dtype=np.float32)
