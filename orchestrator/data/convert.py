"""`speechlm data shar`: convert a Lhotse cuts manifest or a folder of audio + transcripts to Shar.

Writing itself (shard naming, writers, cut-id rules) is `orchestrator.data.shar`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.data.shar import DEFAULT_SHARD_SIZE, safe_cut_id, write_shar

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


@dataclass
class ConversionSummary:
    """What a converter wrote, for the CLI to print."""

    out_dir: str
    num_cuts: int
    num_shards: int
    hours: float
    renamed_ids: int = 0

    def format(self) -> str:
        text = f"wrote {self.num_cuts} cuts ({self.hours:.3f} h) in {self.num_shards} shards to {self.out_dir}"
        if self.renamed_ids:
            text += f"; {self.renamed_ids} cut ids had dots/spaces replaced by '_'"
        return text


class _Counter:
    """Counts cuts and seconds while they stream through the writer."""

    def __init__(self) -> None:
        self.cuts = 0
        self.seconds = 0.0
        self.renamed = 0
        self.seen: set[str] = set()

    def track(self, cuts: Iterable, source: str) -> Iterator:
        from lhotse import fastcopy

        for cut in cuts:
            new_id = safe_cut_id(cut.id)
            if new_id != cut.id:
                cut = fastcopy(cut, id=new_id)
                self.renamed += 1
            if cut.id in self.seen:
                raise ValueError(
                    f"{source}: cut id {cut.id!r} occurs twice (after replacing dots); cut ids must be unique"
                )
            self.seen.add(cut.id)
            self.cuts += 1
            self.seconds += cut.duration
            yield cut


def _audio_fields(cut, audio_format: str) -> dict[str, str]:
    """Fields to write for a cut: its recording plus every custom Recording (e.g. target_audio)."""
    from lhotse import Recording

    fields = {"recording": audio_format} if cut.has_recording else {}
    for key, value in (cut.custom or {}).items():
        if isinstance(value, Recording):
            fields[key] = audio_format
    return fields


def convert_manifest_to_shar(
    manifest: str | Path,
    out_dir: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    sample_rate: int | None = None,
    audio_format: str = "flac",
) -> ConversionSummary:
    """Turn a Lhotse cuts manifest (jsonl/jsonl.gz) into Shar, resampling ``recording`` if asked.

    Custom Recording fields (e.g. ``target_audio``) are written at their own rate; fields are
    taken from the first cut, and later cuts lacking one get a placeholder (as lhotse does).
    """
    from lhotse import load_manifest_lazy

    if not Path(manifest).exists():
        raise FileNotFoundError(f"manifest {manifest} does not exist; pass a cuts .jsonl.gz file")
    cuts = load_manifest_lazy(manifest)
    try:
        first = next(iter(cuts))
    except StopIteration:
        raise ValueError(f"manifest {manifest} has no cuts; nothing to convert") from None
    if not hasattr(first, "has_recording"):
        raise ValueError(
            f"manifest {manifest} holds {type(first).__name__} items, not cuts; convert it with "
            "CutSet.from_manifests(recordings=..., supervisions=...) first"
        )
    fields = _audio_fields(first, audio_format)
    if not fields:
        raise ValueError(f"first cut {first.id!r} in {manifest} has no audio to write")
    if sample_rate is not None:
        cuts = cuts.resample(sample_rate)
    counter = _Counter()
    paths = write_shar(counter.track(cuts, str(manifest)), out_dir, fields, shard_size)
    return ConversionSummary(str(out_dir), counter.cuts, len(paths["cuts"]), counter.seconds / 3600, counter.renamed)


def convert_audio_dir_to_shar(
    audio_dir: str | Path,
    out_dir: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    sample_rate: int | None = None,
    audio_format: str = "flac",
    language: str | None = None,
) -> ConversionSummary:
    """Turn a folder of audio files with same-named ``.txt`` transcripts into ASR-style Shar.

    Cut ids are the relative paths without suffix, with '/' and dots replaced by '_'.
    Every audio file must have a transcript: a silently dropped file is worse than an error.
    """
    from lhotse import Recording, SupervisionSegment

    root = Path(audio_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"--wav-dir {root} is not a directory")
    audio_files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not audio_files:
        raise FileNotFoundError(f"{root} holds no audio files with suffix in {AUDIO_SUFFIXES}")
    missing = [p for p in audio_files if not p.with_suffix(".txt").exists()]
    if missing:
        listed = ", ".join(str(p.relative_to(root)) for p in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(audio_files)} audio files in {root} have no transcript "
            f"({listed}{', ...' if len(missing) > 5 else ''}); put a same-named .txt next to each"
        )

    def cuts() -> Iterator:
        for path in audio_files:
            cut_id = safe_cut_id(str(path.relative_to(root).with_suffix("")))
            recording = Recording.from_file(path, recording_id=cut_id)
            cut = recording.to_cut()
            text = " ".join(path.with_suffix(".txt").read_text(encoding="utf-8").split())
            cut.supervisions = [
                SupervisionSegment(
                    id=cut_id,
                    recording_id=cut_id,
                    start=0.0,
                    duration=recording.duration,
                    channel=cut.channel,
                    text=text,
                    language=language,
                )
            ]
            yield cut.resample(sample_rate) if sample_rate is not None else cut

    counter = _Counter()
    fields = {"recording": audio_format}
    paths = write_shar(counter.track(cuts(), str(root)), out_dir, fields, shard_size)
    return ConversionSummary(str(out_dir), counter.cuts, len(paths["cuts"]), counter.seconds / 3600, counter.renamed)
