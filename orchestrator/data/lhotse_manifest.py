"""Lhotse cut manifests whose audio lives in files (`type: lhotse` with `cuts_path`, and `lhotse_as_conversation`
with a manifest as `cuts_path`), read without converting them to Shar.

`cuts_path` is a `cuts.jsonl.gz` (or `.jsonl`) manifest, a list of them, or NeMo's sharded notation
(`cuts._OP_0..7_CL_.jsonl.gz`); local or fsspec URLs. A directory (or a path without a manifest suffix) is a Shar
set and is read as one (`orchestrator.data.shar`). Each manifest file is one work item.

A cut's audio is its recording's source: a `file` (relative paths are relative to the manifest's directory, as
in NeMo) or a `url`, read when the cut's batch is formed, of which the cut's `[start, start + duration)` is used.
Custom fields that are recordings (an S2S cut's `target_audio`) are read the same way. Sources that run a shell
command (`type: command`), in-memory audio and Shar placeholders are not read here: such cuts are skipped and
counted as unreadable (convert them with `speechlm data shar --manifest`). Cuts other than `MonoCut` (mixtures,
padding) have no duration of their own and are skipped the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.data.nemo_manifest import expand_paths, resolve_audio_path
from orchestrator.data.records import SharCut, Shard
from orchestrator.data.shar import (
    CorruptShardError,
    SharLayoutError,
    is_manifest,
    read_manifest_cached,
    record_from_cut,
)
from orchestrator.storage.paths import absolute, is_url

MANIFEST_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".json.gz")
# Audio source types read by the pipeline; anything else makes the cut unreadable (skipped and counted).
READABLE_SOURCES = ("file", "url")


def is_cuts_manifest(path: str) -> bool:
    """A path that names manifest files (not a Shar directory)."""
    return any(suffix in path for suffix in MANIFEST_SUFFIXES)


def discover_lhotse(cuts_path: Any, source: str, input_index: int = 0) -> list[Shard]:
    """One shard per manifest file that `cuts_path` names."""
    if cuts_path is None:
        raise SharLayoutError(f"{source}: cuts_path is not set; point it at a Lhotse cuts manifest (cuts.jsonl.gz)")
    paths = [p if is_url(p) else absolute(p) for p in expand_paths(cuts_path)]
    if not paths:
        raise SharLayoutError(f"{source}: cuts_path {cuts_path!r} names no manifest file")
    return [Shard(cuts=p, fields={}, source=source, input_index=input_index, format="lhotse") for p in paths]


def _audio_path(recording: Mapping[str, Any], manifest: str) -> str | None:
    """The file or URL of a serialised Recording, or None when the pipeline cannot read it (see the docstring)."""
    sources = recording.get("sources") or []
    if len(sources) != 1 or sources[0].get("type") not in READABLE_SOURCES:
        return None
    source = str(sources[0].get("source") or "")
    return source if sources[0]["type"] == "url" else resolve_audio_path(source, manifest)


def read_lhotse_shard(
    shard: Shard,
    options: Mapping[str, Any],
    item: int,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    with_audio: bool = True,
) -> list[SharCut]:
    """Every cut of one manifest file as a record; audio is read later, from the files the cuts name."""
    try:
        cuts = read_manifest_cached(shard.cuts, storage_options, cache=shard.part is not None)
    except Exception as exc:
        raise CorruptShardError(f"{shard.cuts}: cannot read the cuts manifest ({type(exc).__name__}: {exc})") from exc
    records = []
    for cut in cuts:
        record = record_from_cut(cut, shard, item, audio={})
        duration, start = record.duration, float(cut.get("start", 0.0))
        fields = {"recording": cut.get("recording")} if cut.get("recording") else {}
        fields.update({k: v for k, v in (cut.get("custom") or {}).items() if is_manifest(v) and "sources" in v})
        for name, recording in fields.items():
            if (path := _audio_path(recording, shard.cuts)) is not None:
                record.files[name] = path
                record.spans[name] = (start, duration if duration == duration else None)
        if "recording" not in record.files:
            sources = [s.get("type") for s in (cut.get("recording") or {}).get("sources") or []]
            record.unreadable = (
                f"its recording's audio source {sources or 'is missing'} is not a single file or url; convert the "
                "manifest with `speechlm data shar --manifest` (which can also run `type: command` sources)"
            )
        records.append(record)
    return records
