"""Tiny synthetic Lhotse Shar datasets for tests and benchmarks (tones and noise, no speech engine needed).

The demo data generator (`orchestrator.demo.assets`) makes real synthetic speech; this module only needs
lhotse, numpy and soundfile, runs in well under a second for a few hundred cuts, and can produce the awkward
cases the data pipeline must survive: uneven shard sizes, empty texts, out-of-range durations, S2S pairs with a
`target_audio` field at another sample rate, and corrupt shards.
"""

from __future__ import annotations

import gzip
import io
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def _tone(rng: random.Random, duration: float, sample_rate: int) -> np.ndarray:
    """A quiet tone plus noise, float32 mono in [-1, 1]."""
    n = max(1, round(duration * sample_rate))
    t = np.arange(n, dtype=np.float32) / sample_rate
    freq = rng.uniform(110.0, 880.0)
    noise = np.random.default_rng(rng.randrange(2**31)).standard_normal(n).astype(np.float32)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * noise).astype(np.float32)


def _recording(recording_id: str, audio: np.ndarray, sample_rate: int):
    from lhotse import Recording

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="FLAC")
    return Recording.from_bytes(buf.getvalue(), recording_id=recording_id)


def write_synthetic_shar(
    out_dir: str | Path,
    n_cuts: int = 40,
    n_shards: int = 4,
    durations: tuple[float, float] | Sequence[float] = (0.5, 4.0),
    *,
    shard_sizes: Sequence[int] | None = None,
    sample_rate: int = 16000,
    with_target_audio: bool = False,
    target_sample_rate: int = 22050,
    empty_text_every: int = 0,
    seed: int = 0,
    id_prefix: str = "cut",
) -> Path:
    """Write `n_cuts` tone cuts as Lhotse Shar (`cuts.NNNNNN.jsonl.gz` + `recording.NNNNNN.tar` [+ target_audio]).

    durations: a (min, max) range sampled uniformly, or one duration per cut (cycled).
    shard_sizes: cuts per shard (uneven sizes on purpose); default splits `n_cuts` evenly over `n_shards`.
    with_target_audio: add an S2S `target_audio` Recording field at `target_sample_rate`, and user/agent
        supervisions, as in NeMo duplex data.
    empty_text_every: every k-th cut gets an empty text (the pipeline must drop and count it); 0 = never.
    Returns the output directory.
    """
    from lhotse import MonoCut, SupervisionSegment
    from lhotse.shar import SharWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if shard_sizes is None:
        per = math.ceil(n_cuts / n_shards)
        shard_sizes = [min(per, n_cuts - i * per) for i in range(n_shards) if n_cuts - i * per > 0]
    if sum(shard_sizes) != n_cuts or min(shard_sizes) < 1:
        raise ValueError(f"shard_sizes {list(shard_sizes)} must be >= 1 and sum to n_cuts={n_cuts}")
    rng = random.Random(seed)
    fields = {"recording": "flac"}
    if with_target_audio:
        fields["target_audio"] = "flac"

    index = 0
    for shard_idx, size in enumerate(shard_sizes):
        # One writer per shard: SharWriter numbers shards from shard_offset, so uneven sizes are easy.
        with SharWriter(out, fields=fields, shard_size=size, shard_offset=shard_idx) as writer:
            for _ in range(size):
                if isinstance(durations, tuple) and len(durations) == 2:
                    duration = round(rng.uniform(*durations), 3)
                else:
                    duration = float(durations[index % len(durations)])
                cut_id = f"{id_prefix}-{index:06d}"
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
                if empty_text_every and index % empty_text_every == empty_text_every - 1:
                    text = ""
                rec = _recording(cut_id, _tone(rng, duration, sample_rate), sample_rate)
                if with_target_audio:
                    half = round(duration / 2, 3)
                    sups = [
                        SupervisionSegment(f"{cut_id}-u", cut_id, 0.0, half, text=text, speaker="user"),
                        SupervisionSegment(f"{cut_id}-a", cut_id, half, duration - half, text=text, speaker="agent"),
                    ]
                else:
                    sups = [SupervisionSegment(f"{cut_id}-s", cut_id, 0.0, duration, text=text, speaker="spk")]
                cut = MonoCut(cut_id, start=0.0, duration=duration, channel=0, recording=rec, supervisions=sups)
                if with_target_audio:
                    target = _tone(rng, duration, target_sample_rate)
                    cut.target_audio = _recording(f"{cut_id}-target", target, target_sample_rate)
                writer.write(cut)
                index += 1
    return out


def corrupt_shard(shar_dir: str | Path, shard_index: int, field: str = "recording") -> Path:
    """Damage one shard on purpose: truncate a field tar to half its size, or garble a cuts jsonl.gz.

    field "cuts" replaces the manifest with gzip-compressed garbage that is not JSON; any other field's tar
    is cut in half (a truncated upload or copy). Returns the damaged path.
    """
    shar = Path(shar_dir)
    if field == "cuts":
        path = shar / f"cuts.{shard_index:06d}.jsonl.gz"
        path.write_bytes(gzip.compress(b'{"id": "broken", "duration": \n not json at all\n'))
        return path
    path = shar / f"{field}.{shard_index:06d}.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
