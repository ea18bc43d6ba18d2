"""`speechlm data shar`: convert a Lhotse cuts manifest or a folder of audio + transcripts to Shar.

Writing itself (shard naming, writers, cut-id rules, atomic output) is `orchestrator.data.shar`. Every cut is
checked before it is written, and the first bad one stops the conversion with its id and file named (nothing
is left behind: the set only appears when complete):
- audio from a shell command (a Lhotse `type: command` source) is refused unless the caller allows it;
- audio that is missing, undecodable, empty, NaN/inf, or shorter than its manifest or WAV header says
  (a truncated file would otherwise keep the transcript of audio that is not there).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.data.audio import AudioFileError, check_samples, wav_truncation
from orchestrator.data.shar import DEFAULT_SHARD_SIZE, safe_cut_id, write_shar

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
ALLOW_COMMANDS_FLAG = "--allow-command-sources"
# Samples a decoded recording may lack against its manifest before it counts as truncated (lhotse's own slack).
_LENGTH_TOLERANCE_S = 0.025


@dataclass
class ConversionSummary:
    """What a converter wrote, for the CLI to print."""

    out_dir: str
    num_cuts: int
    num_shards: int
    hours: float
    renamed_ids: int = 0
    conversations: int = 0  # of the cuts (`data shar --type` of conversations or text)
    text_only: int = 0  # of the conversations

    def format(self) -> str:
        text = f"wrote {self.num_cuts} cuts ({self.hours:.3f} h) in {self.num_shards} shards to {self.out_dir}"
        if self.conversations:
            text += f"; {self.conversations} are conversations ({self.text_only} text-only)"
        if self.renamed_ids:
            text += f"; {self.renamed_ids} cut ids had dots/spaces replaced by '_'"
        return text


class CommandSourceError(ValueError):
    """A manifest whose audio would come from running a shell command, without the caller's consent."""


class _Counter:
    """Checks every cut, and counts cuts and seconds, while they stream through the writer."""

    def __init__(self, allow_commands: bool = False) -> None:
        self.cuts = 0
        self.seconds = 0.0
        self.renamed = 0
        self.seen: set[str] = set()
        self.allow_commands = allow_commands

    def track(self, cuts: Iterable, source: str) -> Iterator:
        from lhotse import fastcopy

        for cut in cuts:
            cut = check_cut(cut, source, self.allow_commands)
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


def _recordings(cut) -> list[tuple[str, object]]:
    """(field, Recording) of every audio field of a cut: its recording and custom Recordings (target_audio)."""
    from lhotse import Recording

    fields = [("recording", cut.recording)] if cut.has_recording else []
    return fields + [(k, v) for k, v in (cut.custom or {}).items() if isinstance(v, Recording)]


def check_cut(cut, source: str, allow_commands: bool = False):
    """`cut`, ready to write (command sources run once, into memory, when allowed), or an error naming the cut
    and its file, unless every audio field holds the audio it claims to."""
    from lhotse import fastcopy

    for field, recording in _recordings(cut):
        commands = [str(src.source) for src in recording.sources if src.type == "command"]
        if commands and not allow_commands:
            raise CommandSourceError(
                f"{source}: cut {cut.id!r} ({field}) takes its audio from a shell command ({commands[0][:80]!r}); "
                f"data shar does not run commands found in manifests. Pass {ALLOW_COMMANDS_FLAG} only for a "
                "manifest you trust, or point the recording at audio files"
            )
        if commands:  # lhotse's Shar writer cannot read command sources: run the command once, keep its audio
            in_memory = _in_memory(recording)
            if field == "recording":
                cut = fastcopy(cut, recording=in_memory)
            else:
                cut = fastcopy(cut, custom={**cut.custom, field: in_memory})
    for field, recording in _recordings(cut):
        where = f"{source}: cut {cut.id!r} ({field})"
        files = [str(src.source) for src in recording.sources if src.type == "file"]
        for path in files:
            _check_file(path, recording, where)
        try:
            audio = cut.load_audio() if field == "recording" else getattr(cut, f"load_{field}")()
        except Exception as exc:  # lhotse wraps decoder, IO and length errors alike
            reason = str(exc).splitlines()[0][:200]
            raise AudioFileError(
                f"{where}: its audio cannot be loaded ({type(exc).__name__}: {reason}); fix or remove the cut"
            ) from None
        check_samples(audio, f"{where} audio{' ' + files[0] if files else ''}")
    return cut


def _in_memory(recording):
    """The recording's audio (its command run once) as an in-memory FLAC source."""
    import io

    import soundfile as sf
    from lhotse import AudioSource, Recording

    audio = recording.load_audio()  # (channels, T)
    buf = io.BytesIO()
    sf.write(buf, audio.T, recording.sampling_rate, format="FLAC")
    channels = list(range(audio.shape[0]))
    return Recording(
        id=recording.id,
        sources=[AudioSource(type="memory", channels=channels, source=buf.getvalue())],
        sampling_rate=recording.sampling_rate,
        num_samples=audio.shape[1],
        duration=audio.shape[1] / recording.sampling_rate,
    )


def _check_file(path: str, recording, where: str) -> None:
    """A file source: it exists, decodes, and holds as many samples as its WAV header and the manifest say."""
    import soundfile as sf

    if not Path(path).is_file():
        raise AudioFileError(f"{where}: audio file {path} does not exist")
    try:
        info = sf.info(path)
    except Exception as exc:
        raise AudioFileError(f"{where}: {path} is not an audio file soundfile can read ({exc})") from None
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if cut_short := wav_truncation(head, Path(path).stat().st_size):
        declared, present = cut_short
        rate = info.samplerate
        raise AudioFileError(_truncated(where, path, declared / rate, present / rate, "its WAV header"))
    present_s = info.frames / info.samplerate
    if len(recording.sources) == 1 and recording.duration - present_s > _LENGTH_TOLERANCE_S:
        raise AudioFileError(_truncated(where, path, recording.duration, present_s, "the manifest"))


def _truncated(where: str, path: str, declared_s: float, present_s: float, by: str) -> str:
    return (
        f"{where}: audio file {path} holds {present_s:.2f} s of samples but {by} declares {declared_s:.2f} s; "
        "the file is truncated (an interrupted copy or download?): re-copy it, or fix its duration"
    )


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
    allow_commands: bool = False,
    overwrite: bool = False,
) -> ConversionSummary:
    """Turn a Lhotse cuts manifest (jsonl/jsonl.gz) into Shar, resampling ``recording`` if asked.

    Custom Recording fields (e.g. ``target_audio``) are written at their own rate; fields are
    taken from the first cut, and later cuts lacking one get a placeholder (as lhotse does).
    ``allow_commands``: run the shell commands of ``type: command`` audio sources (refused by default).
    ``overwrite``: replace the Shar files already in ``out_dir`` (once the new set is complete).
    """
    from lhotse import load_manifest_lazy

    if not Path(manifest).is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist or is not a file; pass a cuts .jsonl.gz file")
    try:
        cuts = load_manifest_lazy(manifest)
        first = next(iter(cuts))
    except StopIteration:
        raise ValueError(f"manifest {manifest} has no cuts; nothing to convert") from None
    except Exception as exc:  # gzip, JSON and lhotse's own schema errors
        raise ValueError(f"manifest {manifest} cannot be read as Lhotse cuts ({type(exc).__name__}: {exc})") from None
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
    counter = _Counter(allow_commands)
    paths = write_shar(counter.track(cuts, str(manifest)), out_dir, fields, shard_size, overwrite)
    return ConversionSummary(str(out_dir), counter.cuts, len(paths["cuts"]), counter.seconds / 3600, counter.renamed)


def convert_audio_dir_to_shar(
    audio_dir: str | Path,
    out_dir: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    sample_rate: int | None = None,
    audio_format: str = "flac",
    language: str | None = None,
    overwrite: bool = False,
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
            try:
                recording = Recording.from_file(path, recording_id=cut_id)
            except Exception as exc:
                raise AudioFileError(
                    f"{path} is not an audio file soundfile can read ({exc}); fix or remove it"
                ) from None
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
    paths = write_shar(counter.track(cuts(), str(root)), out_dir, fields, shard_size, overwrite)
    return ConversionSummary(str(out_dir), counter.cuts, len(paths["cuts"]), counter.seconds / 3600, counter.renamed)
