"""`speechlm data shar --type ...` and `speechlm data inspect --type ...`: any input type the pipeline reads
(NeMo manifests plain and tarred, Lhotse cut manifests, conversations, text), written as Shar or checked where it is.

Both read the source with the pipeline's own readers (`orchestrator.data.inputs`: the same discovery, the same
records), so a set converted to Shar holds exactly the examples training would read from the source. What the
Shar holds:
- an example with one audio (NeMo, Lhotse): a cut whose recording is the part of the file the example uses
  (NeMo `offset`, a Lhotse cut's `start`), its supervision, and its other manifest keys as custom attributes;
- a conversation: one cut whose recording is its audio turns one after another, and whose custom attribute
  `conversation` lists the turns: `{"role", "type": "text", "value"}` or `{"role", "type": "audio", "offset",
  "duration"}` (seconds into the recording). One recording per cut keeps the Shar fields fixed however many audio
  turns a conversation has, and lhotse reads the set as it reads any other;
- a text-only example: a cut of duration 0 with a `conversation` and no recording (lhotse's no-data placeholder).
`type: lhotse_shar` reads such a set back, conversations as conversations (`orchestrator.data.shar.read_shard`).

Every audio is decoded before it is written: missing, undecodable, empty, NaN/inf or shorter than its manifest says
stops the conversion, naming the example, its manifest and the fix; nothing is left in `--out` (it is written
atomically, `orchestrator.storage.atomic`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator.data.audio import AudioFileError, decode_audio, samples_problem
from orchestrator.data.convert import ConversionSummary
from orchestrator.data.records import SharCut
from orchestrator.data.shar import (
    CONVERSATION_KEY,
    DEFAULT_SHARD_SIZE,
    CorruptShardError,
    EncodedSharWriter,
    encode_audio,
    safe_cut_id,
    shar_recording,
)

# Input types `data shar --type` converts (every leaf type of input_cfg).
SOURCE_TYPES = (
    "nemo",
    "nemo_tarred",
    "lhotse",
    "lhotse_as_conversation",
    "lhotse_shar",
    "multimodal_conversation",
    "share_gpt",
    "txt",
    "txt_jsonl",
    "nemo_sft_jsonl",
)
# input_cfg keys a source is given by, as command-line flags (`manifest_filepath` -> --manifest-filepath).
SOURCE_KEYS = (
    "manifest_filepath",
    "tarred_audio_filepaths",
    "cuts_path",
    "shar_path",
    "paths",
    "text_field",
    "lang_field",
    "audio_placeholders",
    "audio_root",
)
# Seconds an audio may lack against its manifest before it counts as truncated (lhotse's own slack).
_LENGTH_TOLERANCE_S = 0.025


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def source_entry(kind: str, **keys: Any):
    """The input_cfg entry `--type kind` and the key flags describe, or ValueError naming the flag to fix."""
    from orchestrator.config.checks import _INPUT_KEYS, _REQUIRED_INPUT_KEYS
    from orchestrator.config.schema import InputConfig

    if kind not in SOURCE_TYPES:
        raise ValueError(f"--type {kind!r} is not an input type; choose one of {', '.join(SOURCE_TYPES)}")
    given = {k: v for k, v in keys.items() if v is not None}
    required, what = _REQUIRED_INPUT_KEYS[kind]
    if not any(k in given for k in required):
        raise ValueError(f"--type {kind} needs {' or '.join(map(flag, required))}: {what}")
    if kind == "nemo_tarred" and "tarred_audio_filepaths" not in given:
        raise ValueError("--type nemo_tarred needs --tarred-audio-filepaths (or use --type nemo for audio files)")
    unused = [k for k in given if k not in _INPUT_KEYS[kind] and k != "language"]
    if unused:
        readers = [t for t, ks in _INPUT_KEYS.items() if unused[0] in ks and t in SOURCE_TYPES]
        raise ValueError(
            f"--type {kind} does not read {flag(unused[0])} (it is for {', '.join(readers)}); remove it or change --type"
        )
    return InputConfig(type=kind, **given)


def source_records(entry) -> Iterator[SharCut]:
    """Every record of the source, shard by shard in order, with its audio (read with its shard or named as a
    file). Unreadable shards are input errors: a converter must not drop them silently."""
    from orchestrator.data.inputs import InputEntry, discover_entry, read_records

    where = f"--type {entry.type}"
    for group in discover_entry(InputEntry(entry, 1.0, {}, where), 0, 0):
        for shard in group.shards:
            try:
                yield from read_records(shard, group.options, 0)
            except CorruptShardError as exc:
                raise ValueError(f"{exc}; fix or remove the file") from None


# ----------------------------------------------------------------------------------------------
# Decoding (shared by conversion and inspection)
# ----------------------------------------------------------------------------------------------


def _native_rate(data: bytes, manifest: bytes | None) -> int:
    import json

    import soundfile as sf

    try:
        return int(sf.info(io.BytesIO(data)).samplerate)
    except Exception:
        if manifest is not None:
            return int(json.loads(manifest)["sampling_rate"])
        raise


def decode_record_audio(
    record: SharCut, key: str, sample_rate: int | None, storage_options=None
) -> tuple[np.ndarray, int]:
    """One audio of a record as float32 mono (at `sample_rate`, or its own rate) and that rate, checked: present,
    decodable, finite, and as long as its manifest says. Errors name the example, the file and the fix."""
    from orchestrator.data.examples import _encoded_audio

    name = record.files.get(key) or (record.audio[key].cut_id if key in record.audio else key)
    where = f"{record.shard}: example {record.id!r}"
    if record.unreadable:
        raise AudioFileError(f"{where}: {record.unreadable}; fix or remove the example")
    try:
        data, manifest = _encoded_audio(record, key, storage_options)
    except FileNotFoundError:
        raise AudioFileError(
            f"{where}: audio file {name} does not exist; fix its path (relative paths are relative to the "
            "manifest's directory) or remove the example"
        ) from None
    except ValueError as exc:  # no such audio in its tar
        raise AudioFileError(f"{where}: {exc}; the manifest and its audio tar are out of step") from None
    offset, duration = record.spans.get(key, (0.0, None))
    try:
        rate = sample_rate or _native_rate(data, manifest)
        audio = decode_audio(data, manifest, rate, offset=offset, duration=duration)
    except Exception as exc:  # soundfile's and lhotse's decoder errors alike
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise AudioFileError(f"{where}: audio {name} cannot be decoded ({reason}); fix or remove it") from None
    if problem := samples_problem(audio):
        raise AudioFileError(f"{where}: audio {name} {problem}; re-export it or remove the example")
    if duration is not None and duration - len(audio) / rate > _LENGTH_TOLERANCE_S:
        raise AudioFileError(
            f"{where}: audio {name} holds {len(audio) / rate:.2f} s from offset {offset:g} s but the manifest "
            f"declares {duration:.2f} s; the file is truncated or the duration is wrong: re-copy it or fix the manifest"
        )
    return audio, rate


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


def _supervisions(record: SharCut, cut_id: str, duration: float, language: str | None):
    from lhotse import SupervisionSegment

    out = []
    for i, sup in enumerate(record.supervisions or [{"text": record.text}]):
        length = sup.get("duration")
        length = duration if length is None or not math.isfinite(length) or length <= 0 else min(length, duration)
        out.append(
            SupervisionSegment(
                id=cut_id if i == 0 else f"{cut_id}-{i}",
                recording_id=cut_id,
                start=float(sup.get("start") or 0.0),
                duration=length,
                channel=0,
                text=sup.get("text") or "",
                speaker=sup.get("speaker"),
                language=sup.get("language") or language,
            )
        )
    return out


def to_shar_cut(record: SharCut, cut_id: str, sample_rate: int | None, audio_format: str, language: str | None):
    """(a Lhotse cut, {field: encoded audio}) for one record (see the module docstring)."""
    from lhotse import MonoCut

    encoded: dict[str, bytes] = {}
    custom = dict(record.custom)
    if record.is_conversation:
        turns: list[dict[str, Any]] = []
        audios: list[np.ndarray] = []
        rate = sample_rate
        samples = 0
        for turn in record.turns:
            if turn.audio is None:
                turns.append({"role": turn.role, "type": "text", "value": turn.text})
                continue
            audio, rate = decode_record_audio(record, turn.audio, rate)  # later turns at the first one's rate
            # Offsets and durations are whole samples, so that a reader slicing at round(offset * rate) gets the
            # very samples written here.
            turns.append({"role": turn.role, "type": "audio", "offset": samples / rate, "duration": len(audio) / rate})
            audios.append(audio)
            samples += len(audio)
        custom[CONVERSATION_KEY] = turns
        recording = None
        if audios:
            recording = shar_recording(cut_id, rate, samples)
            encoded["recording"] = encode_audio(np.concatenate(audios), rate, audio_format)
        cut = MonoCut(cut_id, start=0.0, duration=samples / rate if audios else 0.0, channel=0, recording=recording)
        cut.custom = custom
        return cut, encoded
    audio, rate = decode_record_audio(record, "recording", sample_rate)
    duration = len(audio) / rate
    encoded["recording"] = encode_audio(audio, rate, audio_format)
    if "target_audio" in record.audio or "target_audio" in record.files:
        target, target_rate = decode_record_audio(record, "target_audio", None)  # kept at its own rate
        custom["target_audio"] = shar_recording(cut_id, target_rate, len(target))
        encoded["target_audio"] = encode_audio(target, target_rate, audio_format)
    cut = MonoCut(
        cut_id,
        start=0.0,
        duration=duration,
        channel=0,
        recording=shar_recording(cut_id, rate, len(audio)),
        supervisions=_supervisions(record, cut_id, duration, language),
    )
    cut.custom = custom or None
    return cut, encoded


def convert_source_to_shar(
    entry,
    out_dir: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    sample_rate: int | None = None,
    audio_format: str = "flac",
    overwrite: bool = False,
) -> ConversionSummary:
    """Write every example of the input `entry` (an InputConfig, `source_entry`) as Shar into `out_dir`."""
    converted = _converted(entry, sample_rate, audio_format)
    first = next(converted, None)
    if first is None:
        raise ValueError(f"--type {entry.type}: the source holds no examples; nothing to convert")
    fields = {"recording": audio_format}
    if "target_audio" in first[1]:  # fields are fixed per set: taken from the first example, as lhotse does
        fields["target_audio"] = audio_format
    summary = ConversionSummary(str(out_dir), 0, 0, 0.0)
    seconds = 0.0
    with EncodedSharWriter(out_dir, fields, shard_size, overwrite) as writer:
        for cut, encoded, renamed in _chain(first, converted):
            if extra := set(encoded) - set(fields):
                raise ValueError(
                    f"example {cut.id!r} has {sorted(extra)} audio but the first example has none; a Shar set has the "
                    "same fields for every cut: convert such examples into a set of their own"
                )
            writer.write(cut, encoded)
            summary.num_cuts += 1
            summary.renamed_ids += renamed
            seconds += cut.duration
            conversation = (cut.custom or {}).get(CONVERSATION_KEY)
            summary.conversations += conversation is not None
            summary.text_only += conversation is not None and "recording" not in encoded
    summary.num_shards = len(writer.output_paths["cuts"])
    summary.hours = seconds / 3600
    return summary


def _chain(first, rest):
    yield first
    yield from rest


def _converted(entry, sample_rate: int | None, audio_format: str):
    seen: dict[str, str] = {}
    for record in source_records(entry):
        cut_id = safe_cut_id(record.id)
        if cut_id in seen:
            raise ValueError(
                f"{record.shard}: example id {record.id!r} occurs twice (also in {seen[cut_id]}; after replacing "
                "dots, spaces and slashes by '_'); ids must be unique: rename one"
            )
        seen[cut_id] = record.shard
        cut, encoded = to_shar_cut(record, cut_id, sample_rate, audio_format, entry.language)
        yield cut, encoded, int(cut_id != record.id)


# ----------------------------------------------------------------------------------------------
# Inspection of a source where it is
# ----------------------------------------------------------------------------------------------

_SHOWN_PROBLEMS = 10


@dataclass
class SourceReport:
    """What `inspect_source` found in a source read as training reads it."""

    kind: str
    shards: int = 0
    examples: int = 0
    conversations: int = 0
    text_only: int = 0
    audio_turns: int = 0
    durations: list[float] = field(default_factory=list)  # seconds of audio per example with audio
    problems: list[str] = field(default_factory=list)
    decoded: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        hours = sum(self.durations) / 3600
        lines = [f"--type {self.kind}: {self.shards} files, {self.examples} examples, {hours:.3f} h of audio"]
        if self.conversations:
            lines.append(
                f"  conversations: {self.conversations} ({self.text_only} text-only, {self.audio_turns} audio turns)"
            )
        if self.durations:
            d = np.asarray(self.durations)
            lines.append(f"  audio per example min/mean/max: {d.min():.2f} / {d.mean():.2f} / {d.max():.2f} s")
        if self.problems:
            lines.append(f"  BROKEN: {len(self.problems)} problem(s)")
            lines += [f"    - {p}" for p in self.problems[:_SHOWN_PROBLEMS]]
            if len(self.problems) > _SHOWN_PROBLEMS:
                lines.append(f"    - ... and {len(self.problems) - _SHOWN_PROBLEMS} more")
        else:
            lines.append("  consistency: OK (every file read" + (", audio decodes)" if self.decoded else ")"))
        return "\n".join(lines)

    __str__ = format


def inspect_source(entry, decode: bool = True) -> SourceReport:
    """Read every example of a source as training does and, with `decode`, decode all its audio; every problem
    found is named (the example, its file, the fix), unlike conversion, which stops at the first."""
    from orchestrator.data.inputs import InputEntry, discover_entry, read_records

    report = SourceReport(entry.type, decoded=decode)
    for group in discover_entry(InputEntry(entry, 1.0, {}, f"--type {entry.type}"), 0, 0):
        for shard in group.shards:
            report.shards += 1
            try:
                records = read_records(shard, group.options, 0)
            except CorruptShardError as exc:
                report.problems.append(f"{exc}; fix or remove the file")
                continue
            for record in records:
                report.examples += 1
                keys = record.audio_keys
                if not record.is_conversation and "recording" not in keys:
                    keys = ["recording", *keys]  # missing from its tar: decoding it names the problem
                if record.is_conversation:
                    report.conversations += 1
                    report.text_only += not keys
                    report.audio_turns += len(keys)
                if keys and math.isfinite(record.duration):
                    report.durations.append(record.duration)
                if record.unreadable:
                    report.problems.append(f"{record.shard}: example {record.id!r}: {record.unreadable}")
                    continue
                for key in keys if decode else ():
                    try:
                        decode_record_audio(record, key, None)
                    except AudioFileError as exc:
                        report.problems.append(str(exc))
                        break
    return report
