"""Resampling, in one place: the same windowed-sinc idea on the two kinds of audio the project holds, and
reading an audio file the way the data pipeline reads a Shar recording (`load_audio`, for the Python API).

- `resample(waveform, orig, new)`: torch tensors (B, T) on the model's device, inside forward passes (the
  codec's input and output). Same construction as torchaudio's default "sinc_interp_hann".
- `resample_array(audio, orig, new)`: numpy waveforms on CPU in data tasks (decoding, demo synthesis, the
  scoring ASR's input): scipy's polyphase filter, designed once per rate pair. A tensor round trip there would
  cost a conversion per cut for no gain.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, width_zeros: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase kernels (new, 1, taps) for reduced rates orig -> new, and the left padding they need."""
    base_freq = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base_freq)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig  # (1, 1, taps)
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx  # (new, 1, taps)
    t = (t * base_freq).clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return (sinc * window * (base_freq / orig)).to(torch.float32), width


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample (B, T) float audio from `orig_sr` to `new_sr`; output has ceil(T * new_sr / orig_sr) samples."""
    if orig_sr == new_sr:
        return waveform
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    kernel, width = _sinc_kernel(orig, new, 6, 0.99)
    B, T = waveform.shape
    x = F.pad(waveform.float()[:, None], (width, width + orig))  # (B, 1, T + pads)
    y = F.conv1d(x, kernel.to(waveform.device), stride=orig)  # (B, new, n_steps)
    y = y.transpose(1, 2).reshape(B, -1)  # (B, n_steps * new)
    return y[:, : math.ceil(new * T / orig)]


@functools.lru_cache(maxsize=16)
def _polyphase_filter(up: int, down: int) -> np.ndarray:
    """scipy's default resample_poly filter (Kaiser, beta 5, 10 zero crossings), designed once per rate pair:
    designing it per call doubles the cost for short clips."""
    from scipy.signal import firwin

    factor = max(up, down)
    return firwin(2 * 10 * factor + 1, 1.0 / factor, window=("kaiser", 5.0)).astype(np.float32)


def resample_array(audio: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample float mono audio (T,) with scipy's polyphase filter; a no-op at equal rates."""
    if orig_sr == new_sr:
        return audio
    from scipy.signal import resample_poly

    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    return resample_poly(audio, up, down, window=_polyphase_filter(up, down)).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Audio files for the Python API (`SALM.transcribe`, `DuplexS2SModel.respond`)
# ----------------------------------------------------------------------------------------------

AudioInput = str | os.PathLike | np.ndarray


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """An audio file as float32 mono at `sample_rate`, as the data pipeline decodes a Shar recording: soundfile,
    channels averaged, `resample_array` to the model's rate."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    mono = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)  # (T,)
    if mono.size == 0 or not np.isfinite(mono).all():
        raise ValueError(f"audio file {path} holds no samples or NaN/inf samples")
    return np.ascontiguousarray(resample_array(mono, int(rate), sample_rate), dtype=np.float32)


def as_waveforms(audios: AudioInput | Sequence[AudioInput], sample_rate: int) -> tuple[list[np.ndarray], bool]:
    """(waveforms at `sample_rate`, whether one item was given rather than a list). Paths are read with
    `load_audio`; arrays are taken to be float mono at `sample_rate` already."""
    single = isinstance(audios, (str, os.PathLike)) or (isinstance(audios, np.ndarray) and audios.ndim == 1)
    items = [audios] if single else list(audios)
    waves = [
        load_audio(item, sample_rate) if isinstance(item, (str, os.PathLike)) else np.asarray(item, np.float32)
        for item in items
    ]
    return waves, single
