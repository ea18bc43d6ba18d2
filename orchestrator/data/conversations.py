"""Conversations with any number of audio and text turns, in NeMo's two JSON-lines formats, read as they are.

`type: multimodal_conversation` (NeMo's NeMoMultimodalConversationJsonlAdapter), one conversation per line::

    {"id": "c1", "conversations": [
        {"from": "User", "type": "audio", "value": "q1.wav", "duration": 2.1, "offset": 0.0},
        {"from": "Assistant", "type": "text", "value": "yes"},
        {"from": "User", "type": "text", "value": "and this one?"},
        {"from": "User", "type": "audio", "value": "q2.wav", "duration": 1.7},
        {"from": "Assistant", "type": "text", "value": "no"}]}

`type: share_gpt` (NeMoMultimodalConversationShareGPTJsonlAdapter): `{"id", "sound": "a.wav", "conversations":
[{"from": "human", "value": "<sound>\\nWhat is said?"}, {"from": "gpt", "value": "..."}]}`; each
`audio_placeholders` mark (default `<sound>`, `<speech>`) in a turn becomes an audio turn of `sound`, with the text
around it as text turns of the same speaker. `audio_root` is where relative `sound` paths live.

Audio paths are relative to the manifest's directory (or URLs). With `tarred_audio_filepaths` (one tar per
manifest shard, paired by position as in NeMo) the audio turns' files are the tar's members, in order, each named
like the turn's `value`. `duration` on audio turns lets batches be formed from the manifest alone; a turn
without one is measured from its file's header (tarred: the shard is then always read with its tar).
Conversations without audio turns are text-only examples. Only assistant turns carry loss.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from orchestrator.data.nemo_manifest import expand_paths, resolve_audio_path
from orchestrator.data.records import SharCut, Shard, TarEntry, Turn, conversation_text
from orchestrator.data.shar import CorruptShardError, SharLayoutError, read_manifest_cached
from orchestrator.storage import filesystems
from orchestrator.storage.paths import absolute, is_url

DEFAULT_PLACEHOLDERS = ("<sound>", "<speech>")
_ASSISTANT_NAMES = ("assistant", "gpt", "agent", "model", "bot")
_USER_NAMES = ("user", "human")


def discover_conversations(
    fmt: str, manifest_filepath: Any, tarred_audio_filepaths: Any, source: str, input_index: int = 0
) -> list[Shard]:
    """One shard per JSONL manifest file (with its tar, when tarred)."""
    if manifest_filepath is None:
        raise SharLayoutError(f"{source}: manifest_filepath is not set; point it at a conversations JSONL file")
    manifests = [p if is_url(p) else absolute(p) for p in expand_paths(manifest_filepath)]
    if tarred_audio_filepaths is None:
        return [Shard(cuts=m, fields={}, source=source, input_index=input_index, format=fmt) for m in manifests]
    tars = [p if is_url(p) else absolute(p) for p in expand_paths(tarred_audio_filepaths)]
    if len(tars) != len(manifests):
        raise SharLayoutError(
            f"{source}: {len(manifests)} manifest files but {len(tars)} tarred_audio_filepaths; every manifest "
            "file needs the tar of its audio turns, in the same order"
        )
    return [
        Shard(cuts=m, fields={"tar": t}, source=source, input_index=input_index, format=fmt)
        for m, t in zip(manifests, tars, strict=True)
    ]


def role_of(name: str) -> str:
    """NeMo's speaker names (User/Assistant, human/gpt, ...) as prompt roles."""
    lowered = str(name).lower()
    if lowered == "system":
        return "system"
    if lowered in _ASSISTANT_NAMES:
        return "assistant"
    return "user"


def sharegpt_turns(data: Mapping[str, Any], placeholders: tuple[str, ...]) -> list[dict[str, Any]]:
    """A ShareGPT line as NeMo multimodal-conversation turns (NeMo's `_transform_sharegpt`)."""
    audio_path = data.get("sound") or data.get("ori_sound")
    turns: list[dict[str, Any]] = []
    for turn in data.get("conversations") or []:
        speaker = "User" if str(turn.get("from", "")).lower() in _USER_NAMES else "Assistant"
        value = str(turn.get("value", ""))
        found = next((p for p in placeholders if p in value), None)
        if found is None:
            turns.append({"type": "text", "from": speaker, "value": value})
            continue
        before, _, after = value.partition(found)
        if before.strip():
            turns.append({"type": "text", "from": speaker, "value": before.strip()})
        if not audio_path:
            raise ValueError(f"conversation {data.get('id')!r} has {found} in a turn but no 'sound' path")
        turns.append(
            {
                "type": "audio",
                "from": speaker,
                "value": audio_path,
                "duration": turn.get("duration"),
                "offset": turn.get("offset", 0.0),
            }
        )
        if after.strip():
            turns.append({"type": "text", "from": speaker, "value": after.strip()})
    return turns


def _header_duration(data: bytes) -> float:
    import soundfile as sf

    return float(sf.info(io.BytesIO(data)).duration)


def read_conversation_shard(
    shard: Shard,
    options: Mapping[str, Any],
    item: int,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    with_audio: bool = True,
) -> list[SharCut]:
    """Every conversation of one manifest file as a record (see the module docstring)."""
    try:
        lines = read_manifest_cached(shard.cuts, storage_options, cache=shard.part is not None)
    except Exception as exc:
        raise CorruptShardError(f"{shard.cuts}: cannot read the conversations ({type(exc).__name__}: {exc})") from exc
    placeholders = options.get("audio_placeholders") or DEFAULT_PLACEHOLDERS
    placeholders = (placeholders,) if isinstance(placeholders, str) else tuple(placeholders)
    audio_root = options.get("audio_root")
    stem = PurePosixPath(shard.cuts).name.split(".")[0]
    parsed: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = []
    for index, data in enumerate(lines):
        if (data.get("custom") or {}).get("_skipme"):
            continue
        try:
            turns = sharegpt_turns(data, placeholders) if shard.format == "share_gpt" else data["conversations"]
        except (KeyError, ValueError) as exc:
            raise CorruptShardError(f"{shard.cuts}: line {index + 1} is not a conversation ({exc})") from exc
        parsed.append((str(data.get("id") or f"{stem}-{index:08d}"), list(turns), dict(data.get("custom") or {})))
    tar = shard.fields.get("tar")
    members: list[TarEntry] | None = None
    needs_tar = tar is not None and (
        with_audio
        or any(t.get("type") == "audio" and t.get("duration") is None for _, turns, _ in parsed for t in turns)
    )
    if needs_tar:
        try:
            members = tar_audio_files(filesystems.read_bytes(tar, storage_options))
        except Exception as exc:
            raise CorruptShardError(f"{tar}: cannot read the audio tar ({type(exc).__name__}: {exc})") from exc
    next_member = 0
    records = []
    for conv_id, raw_turns, custom in parsed:
        turns: list[Turn] = []
        record = SharCut(
            id=conv_id, duration=0.0, text="", supervisions=[], custom=custom, audio={}, item=item,
            input_index=shard.input_index, shard=shard.cuts,
        )  # fmt: skip
        for raw in raw_turns:
            role = role_of(raw.get("from", "User"))
            if raw.get("type", "text") != "audio":
                turns.append(Turn(role, text=str(raw.get("value", ""))))
                continue
            key = f"audio{sum(t.is_audio for t in turns)}"
            value = str(raw.get("value", ""))
            offset = float(raw.get("offset") or 0.0)
            duration = raw.get("duration")
            if members is not None:
                if next_member >= len(members):
                    raise CorruptShardError(
                        f"{tar}: has {len(members)} audio files but {shard.cuts} needs more; the tar and the "
                        "manifest are out of step"
                    )
                member = members[next_member]
                next_member += 1
                if PurePosixPath(member.cut_id).stem != PurePosixPath(value).stem:
                    raise CorruptShardError(
                        f"{tar}: member {next_member} is {member.cut_id!r} but conversation {conv_id!r} of "
                        f"{shard.cuts} needs {value!r}; the tar and the manifest are out of step"
                    )
                if with_audio:
                    record.audio[key] = member
                if duration is None:
                    duration = _header_duration(member.data) - offset
            elif tar is None:
                path = value if is_url(value) else (
                    resolve_audio_path(value, audio_root.rstrip("/") + "/x") if audio_root and shard.format == "share_gpt"
                    else resolve_audio_path(value, shard.cuts)
                )  # fmt: skip
                record.files[key] = path
                if duration is None:
                    try:
                        duration = _header_duration(filesystems.read_bytes(path, storage_options)) - offset
                    except Exception:
                        record.unreadable = f"its audio {path!r} cannot be read"
                        duration = 0.0
            duration = float(duration or 0.0)
            record.spans[key] = (offset, duration)
            record.duration += duration
            turns.append(Turn(role, text=value, audio=key))
        record.turns = tuple(turns)
        record.text = conversation_text(record.turns)
        records.append(record)
    return records


def tar_audio_files(raw: bytes) -> list[TarEntry]:
    """The audio files of a tar in archive order. NeMo's conversation tars are written by lhotse's
    AudioTarWriter: each `<name>.flac` is followed by its `<name>.json` Recording, kept as the entry's manifest."""
    import tarfile

    out: list[TarEntry] = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            handle = tar.extractfile(info)
            data = handle.read() if handle else None
            name = PurePosixPath(info.name)
            if name.suffix == ".json" and out and PurePosixPath(out[-1].cut_id).stem == name.stem:
                out[-1] = TarEntry(out[-1].cut_id, out[-1].data, data)
                continue
            out.append(TarEntry(info.name, data, None))
    return out
