"""What every input format hands the pipeline: work items (shards) and records (examples whose audio is still
encoded), whatever the format on disk (Lhotse Shar, Lhotse manifests, NeMo manifests, conversations, text).

A *shard* is the unit a read task reads at once and the unit of the epoch's shuffle: a Shar shard, one manifest
file of a NeMo or Lhotse set (with its audio tar when the set is tarred), one JSONL or text file. A *record* is one
training example read from it. Everything that decides how records are filtered and batched (ids, durations,
texts, turns) comes from the shard's manifest alone, so a resumed read task can form its batches again without
reading or decoding any audio (`orchestrator.data.read_task`). Audio arrives in one of two ways:
- `audio`: bytes read with the shard (Shar field tars, NeMo audio tars: a tar is read front to back);
- `files`: a path or URL per audio, read when the record's batch is formed (manifests that point at files).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Roles of a conversation turn, as the prompt formats name them (speech_models.prompts).
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Shard:
    """One work item of an input: its manifest file and the audio files read with it, as paths or URLs.

    `cuts` is the manifest (a Shar cuts shard, a NeMo/Lhotse manifest, a JSONL or text file); `fields` maps a
    Shar field name (`recording`, `target_audio`, `target_codes`) or `tar` to the tar read along with it.
    """

    cuts: str
    fields: Mapping[str, str]
    source: str  # the config entry it came from (for messages)
    input_index: int = 0  # which input (for tags, decoding settings and mixing weights)
    format: str = "lhotse_shar"  # the input_cfg type that reads it (orchestrator.data.inputs)
    shard_id: int | None = None  # NeMo: the entries of an unsharded manifest that go with this shard's tar
    # (k, n): the k-th of n equal slices of the manifest's records. A large file without audio tars (text, or
    # manifests of audio files) is read in slices so that inputs mix at a finer grain than whole files.
    part: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """Short human-readable name used in warnings and errors."""
        return self.cuts if self.part is None else f"{self.cuts} (part {self.part[0] + 1} of {self.part[1]})"

    @property
    def has_target_audio(self) -> bool:
        return "target_audio" in self.fields


@dataclass(frozen=True)
class TarEntry:
    """One encoded audio read from a tar: the data and its Lhotse manifest (None for NeMo tars and `.nodata`)."""

    cut_id: str
    data: bytes | None
    manifest: bytes | None


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: text, or one audio (`audio` names the record's audio key)."""

    role: str  # system | user | assistant
    text: str = ""
    audio: str | None = None

    @property
    def is_audio(self) -> bool:
        return self.audio is not None


@dataclass
class SharCut:
    """One example as read from a shard: metadata, and its audio still encoded (decoded only when batched).

    A plain cut (`turns` None) is prompted by the model's collator (e.g. SALM's "context + audio -> transcript");
    a conversation (`turns`) says every turn itself, audio turns naming their audio by key. Text-only examples are
    conversations without audio turns (`duration` 0).
    """

    id: str
    duration: float  # seconds of audio the example uses (all its audio turns); 0.0 for text-only examples
    text: str  # the transcript (plain cut) or the last assistant answer (conversation)
    supervisions: list[dict[str, Any]]
    custom: dict[str, Any]
    audio: dict[str, TarEntry]  # key -> encoded audio read with the shard
    item: int  # the pipeline's work item this example was read for (see orchestrator.data.plan)
    input_index: int
    shard: str
    turns: tuple[Turn, ...] | None = None
    files: dict[str, str] = field(default_factory=dict)  # key -> path or URL of audio read at batch time
    # key -> (offset, duration) of the part of that audio the example uses (NeMo `offset`, Lhotse `start`)
    spans: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    # (input tokens, output tokens), audio counted in frames of token_equivalent_duration: set by read tasks that
    # batch by tokens (orchestrator.data.bucketing)
    lengths: tuple[int, int] | None = None
    encoded: Any = None  # the collator's tokenisation, kept from measuring `lengths` so it is done once
    index: int = 0  # its position in the shard (set by orchestrator.data.inputs.read_records)
    unreadable: str | None = None  # why its audio cannot be read (decoding it fails with this, counted and skipped)
    arrays: dict[str, TarEntry] = field(default_factory=dict)  # non-audio fields read with the shard (target_codes)

    @property
    def is_conversation(self) -> bool:
        return self.turns is not None

    @property
    def audio_keys(self) -> list[str]:
        """Every audio the example uses, in turn order (plain cuts: recording, then target_audio)."""
        if self.turns is not None:
            return [t.audio for t in self.turns if t.audio is not None]
        keys = [k for k in ("recording", "target_audio") if k in self.audio or k in self.files]
        return keys + [k for k in (*self.audio, *self.files) if k not in keys]

    @property
    def needs_files(self) -> bool:
        """Some of its audio is read from files when its batch is formed."""
        return bool(self.files)


def part_bounds(count: int, part: tuple[int, int] | None) -> tuple[int, int]:
    """[first, last) of the records of part (k, parts) of a shard of `count` records (the whole shard for None)."""
    if part is None:
        return 0, count
    k, parts = part
    return k * count // parts, (k + 1) * count // parts


def conversation_text(turns: tuple[Turn, ...]) -> str:
    """The last assistant answer of a conversation: what a model is scored on."""
    answers = [t.text for t in turns if t.role == "assistant" and not t.is_audio and t.text.strip()]
    return answers[-1].strip() if answers else ""
