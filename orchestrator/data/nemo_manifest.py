"""NeMo speech manifests, plain and tarred (`type: nemo`, `type: nemo_tarred`), read without a conversion step.

A NeMo manifest is JSON lines, one utterance per line::

    {"audio_filepath": "a/b.wav", "duration": 3.48, "text": "hello", "offset": 0.0, "lang": "en", ...}

`type: nemo` reads `audio_filepath` from its own file (relative paths are relative to the manifest's directory);
`type: nemo_tarred` reads it from `tarred_audio_filepaths`, where the member named like `audio_filepath` holds it.
Both paths take NeMo's sharded notation: `manifest__OP_0..127_CL_.json` (also `{0..127}`, `[..]`, `(..)`,
`<..>`), a list of such paths, or a list of `[path, weight]` pairs (tarred: `[[tar path]]` per manifest).
Manifest and tar shards pair by the shard number in their names (`manifest_12.json` with `audio_12.tar`), as in
NeMo, or by position; one unsharded manifest serves every tar through its entries' `shard_id`. An entry whose
`audio_filepath` ends in `-subN` (NeMo's tarred offsets) reads the member without that suffix.

One manifest shard (with its tar) is one work item. Records come in manifest order, so a batch's composition
depends on the manifest alone; the tar is read whole when the shard is read with its audio.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from orchestrator.data.records import SharCut, Shard, TarEntry
from orchestrator.data.shar import CorruptShardError, SharLayoutError, read_manifest_cached
from orchestrator.storage import filesystems
from orchestrator.storage.paths import absolute, is_url, join, local_path

# NeMo's own patterns for the shard number of a manifest and of a tar (nemo_adapters.LazyNeMoTarredIterator).
_MANIFEST_SHARD = re.compile(r"manifest[^/]*_(\d+)[^/]*\.json")
_TAR_SHARD = re.compile(r"audio[^/]*_(\d+)[^/]*\.tar")
_OFFSET_SUFFIX = re.compile(r"^(?P<stem>.+)(?P<sub>-sub\d+)(?P<ext>\.\w+)?$")
_OPEN_BRACES = ("(", "[", "<", "_OP_")
_CLOSE_BRACES = (")", "]", ">", "_CL_")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# Manifest keys that are not custom fields of the example.
_RESERVED = ("audio_filepath", "duration", "offset")


# ----------------------------------------------------------------------------------------------
# Paths: NeMo's sharded notation
# ----------------------------------------------------------------------------------------------


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Every path a NeMo path spec names, in order: braces (`{0..3}`, `{a,b}`, NeMo's `_OP_`/`_CL_` and
    bracket spellings) expand like shell brace expansion; a list expands item by item."""
    if not isinstance(spec, str):
        return [path for item in spec for path in expand_paths(str(item))]
    text = spec
    for mark in _OPEN_BRACES:
        text = text.replace(mark, "{")
    for mark in _CLOSE_BRACES:
        text = text.replace(mark, "}")
    return _brace_expand(text)


def _brace_expand(text: str) -> list[str]:
    start = text.find("{")
    if start < 0:
        return [text]
    depth, end = 0, -1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise ValueError(f"path {text!r} has an unclosed brace; write ranges as {{0..9}} or _OP_0..9_CL_")
    head, body, tail = text[:start], text[start + 1 : end], text[end + 1 :]
    if match := _RANGE.match(body):
        lo, hi = match.groups()
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        options, depth, part = [], 0, ""
        for ch in body:
            if ch == "," and depth == 0:
                options.append(part)
                part = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            part += ch
        options.append(part)
    return [out for option in options for out in _brace_expand(head + option + tail)]


def resolve_audio_path(audio: str, manifest: str) -> str:
    """An audio path as a manifest names it: URLs and absolute paths as they are, others relative to the
    manifest's directory (local or URL)."""
    if is_url(audio) or audio.startswith("/") or audio.startswith("file://"):
        return audio
    parent = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    return join(parent, audio)


def _absolute(path: str) -> str:
    return path if is_url(path) else absolute(path)


# ----------------------------------------------------------------------------------------------
# Discovery (driver)
# ----------------------------------------------------------------------------------------------


def _groups(manifest_filepath: Any, tarred: Any) -> list[tuple[Any, Any, float | None]]:
    """(manifest spec, tar spec, weight) per NeMo bucket/list entry; weight None: proportional to its size."""
    if isinstance(manifest_filepath, (list, tuple)) and any(isinstance(m, (list, tuple)) for m in manifest_filepath):
        tars = list(tarred) if tarred is not None else [None] * len(manifest_filepath)
        if len(tars) != len(manifest_filepath):
            raise SharLayoutError(
                f"manifest_filepath has {len(manifest_filepath)} entries but tarred_audio_filepaths has {len(tars)}; "
                "give one [tar path] per [manifest path, weight]"
            )
        out = []
        for entry, tar in zip(manifest_filepath, tars, strict=True):
            entry = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            weight = float(entry[1]) if len(entry) == 2 else None
            tar = tar[0] if isinstance(tar, (list, tuple)) and len(tar) == 1 else tar
            out.append((entry[0], tar, weight))
        return out
    return [(manifest_filepath, tarred, None)]


def discover_nemo(
    manifest_filepath: Any, tarred_audio_filepaths: Any, source: str, input_index: int = 0
) -> list[tuple[list[Shard], float | None]]:
    """The shards of a NeMo manifest spec, grouped per `[path, weight]` entry; see the module docstring."""
    if manifest_filepath is None:
        raise SharLayoutError(f"{source}: manifest_filepath is not set; point it at a NeMo JSON-lines manifest")
    fmt = "nemo_tarred" if tarred_audio_filepaths is not None else "nemo"
    groups = []
    for manifests_spec, tars_spec, weight in _groups(manifest_filepath, tarred_audio_filepaths):
        manifests = [_absolute(p) for p in expand_paths(manifests_spec)]
        if tars_spec is None:
            shards = [Shard(cuts=m, fields={}, source=source, input_index=input_index, format=fmt) for m in manifests]
        else:
            shards = _pair_tars(manifests, [_absolute(p) for p in expand_paths(tars_spec)], source, input_index)
        groups.append((shards, weight))
    return groups


def _shard_ids(paths: list[str], pattern: re.Pattern) -> list[int] | None:
    ids = [int(m.group(1)) if (m := pattern.search(p)) else None for p in paths]
    return None if None in ids or len(set(ids)) != len(ids) else ids


def _pair_tars(manifests: list[str], tars: list[str], source: str, input_index: int) -> list[Shard]:
    def shard(manifest: str, tar: str, shard_id: int | None = None) -> Shard:
        return Shard(
            cuts=manifest,
            fields={"tar": tar},
            source=source if shard_id is None else f"{source} (shard_id {shard_id})",
            input_index=input_index,
            format="nemo_tarred",
            shard_id=shard_id,
        )

    tar_ids = _shard_ids(tars, _TAR_SHARD)
    if len(manifests) == 1 and len(tars) > 1:
        if tar_ids is None:
            raise SharLayoutError(
                f"{source}: one manifest for {len(tars)} tars, but the tar names carry no shard number "
                "(audio_<N>.tar); shard the manifest, or name the tars as NeMo's tarred datasets do"
            )
        return [shard(manifests[0], tar, sid) for sid, tar in sorted(zip(tar_ids, tars, strict=True))]
    if len(manifests) != len(tars):
        raise SharLayoutError(
            f"{source}: {len(manifests)} manifest shards but {len(tars)} tar shards; every manifest shard needs "
            "its tar (manifest_<N>.json with audio_<N>.tar)"
        )
    manifest_ids = _shard_ids(manifests, _MANIFEST_SHARD)
    if manifest_ids is not None and tar_ids is not None:
        if set(manifest_ids) != set(tar_ids):
            missing = sorted(set(manifest_ids) - set(tar_ids))[:5]
            extra = sorted(set(tar_ids) - set(manifest_ids))[:5]
            raise SharLayoutError(
                f"{source}: manifest and tar shard numbers differ (manifests without a tar: {missing}; tars without "
                f"a manifest: {extra}); every manifest_<N>.json needs its audio_<N>.tar"
            )
        by_id = dict(zip(tar_ids, tars, strict=True))
        return [shard(m, by_id[i]) for i, m in sorted(zip(manifest_ids, manifests, strict=True))]
    return [shard(m, t) for m, t in zip(manifests, tars, strict=True)]


# ----------------------------------------------------------------------------------------------
# Reading (read tasks)
# ----------------------------------------------------------------------------------------------


def _member_name(audio_filepath: str) -> str:
    """The tar member an entry reads: NeMo's `-subN` offset entries share their recording's member."""
    if match := _OFFSET_SUFFIX.match(audio_filepath):
        return match["stem"] + (match["ext"] or "")
    return audio_filepath


def _cut_id(audio_filepath: str, offset: float | None, duration: float) -> str:
    stem = PurePosixPath(audio_filepath).stem
    return f"{stem}-{round(offset * 1e2):06d}-{round(duration * 1e2):06d}" if offset else stem


def _tar_members(path: str, storage_options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, TarEntry]:
    import io
    import tarfile

    members: dict[str, TarEntry] = {}
    with tarfile.open(fileobj=io.BytesIO(filesystems.read_bytes(path, storage_options)), mode="r|*") as tar:
        for info in tar:
            if info.isfile():
                handle = tar.extractfile(info)
                members[info.name] = TarEntry(info.name, handle.read() if handle else None, None)
    return members


def read_nemo_shard(
    shard: Shard,
    options: Mapping[str, Any],
    item: int,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    with_audio: bool = True,
) -> list[SharCut]:
    """Every entry of one NeMo manifest shard as a record; a tarred shard's audio comes with it (with_audio)."""
    text_field, lang_field = options.get("text_field") or "text", options.get("lang_field") or "lang"
    try:
        entries = read_manifest_cached(shard.cuts, storage_options, cache=shard.part is not None)
    except Exception as exc:
        raise CorruptShardError(f"{shard.cuts}: cannot read the NeMo manifest ({type(exc).__name__}: {exc})") from exc
    if shard.shard_id is not None:
        entries = [e for e in entries if int(e.get("shard_id", -1)) == shard.shard_id]
    tar = shard.fields.get("tar")
    members: dict[str, TarEntry] = {}
    if tar is not None and with_audio:
        try:
            members = _tar_members(tar, storage_options)
        except Exception as exc:
            raise CorruptShardError(f"{tar}: cannot read the audio tar ({type(exc).__name__}: {exc})") from exc
    records = []
    for entry in entries:
        if entry.get("_skipme"):
            continue
        audio_filepath = str(entry.get("audio_filepath", ""))
        duration = float(entry["duration"]) if entry.get("duration") is not None else float("nan")
        offset = float(entry["offset"]) if entry.get("offset") is not None else None
        text = str(entry.get(text_field) or "").strip()
        record = SharCut(
            id=_cut_id(audio_filepath, offset, duration if duration == duration else 0.0),
            duration=duration,
            text=text,
            supervisions=[
                {"speaker": entry.get("speaker"), "start": 0.0, "duration": duration, "text": text}
                | ({"language": entry[lang_field]} if entry.get(lang_field) else {})
            ],
            custom={k: v for k, v in entry.items() if k not in _RESERVED},
            audio={},
            item=item,
            input_index=shard.input_index,
            shard=shard.cuts,
            spans={"recording": (offset or 0.0, duration if duration == duration else None)},
        )
        if tar is None:
            record.files["recording"] = resolve_audio_path(audio_filepath, shard.cuts)
        elif with_audio and (member := members.get(_member_name(audio_filepath))) is not None:
            record.audio["recording"] = member
        records.append(record)
    return records


def nemo_entry(record: SharCut, audio_filepath: str) -> dict[str, Any]:
    """A record as a NeMo manifest line (what `data shar` reads back and tests compare)."""
    return {"audio_filepath": audio_filepath, "duration": record.duration, "text": record.text, **record.custom}


def tar_member_of(path: str) -> str:
    """The member name a NeMo tarred dataset stores `audio_filepath` under (its base name)."""
    return PurePosixPath(local_path(path)).name
