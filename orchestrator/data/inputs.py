"""Every `input_cfg` type the pipeline reads, in one table: how its shards are found (on the driver) and how a
shard is read into records (in read tasks). Each format lives in its own module; this one only dispatches.

| type | keys | module |
| --- | --- | --- |
| `lhotse_shar` | `shar_path` (cuts, or conversations written by `data shar --type`) | `shar` |
| `lhotse`, `lhotse_as_conversation` | `cuts_path` (a manifest) or `shar_path` / a Shar dir | `lhotse_manifest`, `shar` |
| `nemo`, `nemo_tarred` | `manifest_filepath` (+ `tarred_audio_filepaths`) | `nemo_manifest` |
| `multimodal_conversation`, `share_gpt` | `manifest_filepath` (+ `tarred_audio_filepaths`) | `conversations` |
| `txt`, `txt_jsonl`, `nemo_sft_jsonl` | `paths` | `text_data` |
| `group` | `input_cfg` (nested entries; weights multiply, tags merge) | here |

As in NeMo, `weight` sets each entry's share of the examples: entries are mixed in proportion to their weights,
whatever their sizes (a small set is repeated within an epoch to keep its share). Inside one entry, the
directories or manifests of a list are mixed in proportion to their sizes unless given as `[path, weight]`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.data.records import SharCut, Shard, part_bounds

if TYPE_CHECKING:
    from orchestrator.config.schema import InputConfig

# Types whose examples are conversations or text (a model must say it reads them: ModelEntry.conversations).
CONVERSATION_TYPES = ("multimodal_conversation", "share_gpt", "txt", "txt_jsonl", "nemo_sft_jsonl")
TEXT_TYPES = ("txt", "txt_jsonl", "nemo_sft_jsonl")
# Reader options copied from an entry to its shards' InputPlan (the keys each format module reads).
_OPTION_KEYS = ("text_field", "lang_field", "language", "audio_placeholders", "audio_root")


@dataclass(frozen=True)
class InputEntry:
    """One leaf entry of `input_cfg` after groups are flattened: its config, share weight and merged tags."""

    config: InputConfig
    weight: float
    tags: Mapping[str, Any]
    path: str  # where it is in the config, for messages (data.train_ds.input_cfg[1].input_cfg[0])


@dataclass(frozen=True)
class ShardGroup:
    """Shards of one entry that mix as one input: a directory, a manifest list entry, or the whole entry."""

    shards: list[Shard]
    weight: float | None  # None: in proportion to its size within its entry
    entry: int  # index of its InputEntry
    options: Mapping[str, Any] = field(default_factory=dict)


def flatten_entries(entries: list[InputConfig], path: str, weight: float = 1.0, tags=None) -> list[InputEntry]:
    """Leaf entries of `input_cfg` with `group` entries expanded (NeMo: weights multiply, inner tags win)."""
    out: list[InputEntry] = []
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        merged = {**(tags or {}), **entry.tags}
        if entry.audio_locator_tag is not None:
            merged["audio_locator_tag"] = entry.audio_locator_tag
        if entry.type == "group":
            out += flatten_entries(entry.input_cfg, f"{where}.input_cfg", weight * entry.weight, merged)
        else:
            out.append(InputEntry(entry, weight * entry.weight, merged, where))
    return out


def discover_entry(entry: InputEntry, entry_index: int, first_input: int) -> list[ShardGroup]:
    """The shard groups of one leaf entry; `first_input` is the input index its first group gets."""
    from orchestrator.data import conversations, lhotse_manifest, nemo_manifest, shar, text_data

    cfg = entry.config
    options = {key: getattr(cfg, key) for key in _OPTION_KEYS}
    kind = cfg.type
    found: list[tuple[list[Shard], float | None]]
    if kind in ("lhotse_shar", "lhotse", "lhotse_as_conversation") and (
        cfg.shar_path is not None or not _names_manifests(cfg.cuts_path)
    ):
        spec = cfg.shar_path if cfg.shar_path is not None else cfg.cuts_path
        found = [(shards, None if plain else weight) for shards, weight, plain in _shar_groups(spec)]
    elif kind in ("lhotse", "lhotse_as_conversation"):
        found = [(lhotse_manifest.discover_lhotse(cfg.cuts_path, entry.path), None)]
    elif kind in ("nemo", "nemo_tarred"):
        if kind == "nemo_tarred" and cfg.tarred_audio_filepaths is None:
            raise shar.SharLayoutError(f"{entry.path}: type nemo_tarred needs tarred_audio_filepaths")
        found = nemo_manifest.discover_nemo(cfg.manifest_filepath, cfg.tarred_audio_filepaths, entry.path)
    elif kind in ("multimodal_conversation", "share_gpt"):
        shards = conversations.discover_conversations(
            kind, cfg.manifest_filepath, cfg.tarred_audio_filepaths, entry.path
        )
        found = [(shards, None)]
    elif kind in TEXT_TYPES:
        found = [(text_data.discover_text(kind, cfg.paths, entry.path), None)]
    else:
        raise ValueError(f"{entry.path}.type {kind!r} is not an input type this pipeline reads")
    groups = []
    for shards, weight in found:
        index = first_input + len(groups)
        shards = [_with_index(s, index) for s in shards]
        groups.append(ShardGroup(shards, weight, entry_index, options))
    return groups


def _names_manifests(cuts_path: Any) -> bool:
    from orchestrator.data.lhotse_manifest import is_cuts_manifest

    if cuts_path is None:
        return False
    first = cuts_path[0] if isinstance(cuts_path, list) and cuts_path else cuts_path
    return isinstance(first, str) and is_cuts_manifest(first)


def _shar_groups(spec: Any) -> list[tuple[list[Shard], float, bool]]:
    """Shar groups with whether their weight was left to the size (a plain directory in a list)."""
    from orchestrator.data.shar import discover_shards

    plain = not (isinstance(spec, list) and any(isinstance(e, list) and len(e) == 2 for e in spec))
    return [(shards, weight, plain) for shards, weight in discover_shards(spec)]


def _with_index(shard: Shard, index: int) -> Shard:
    from dataclasses import replace

    return replace(shard, input_index=index)


def read_records(
    shard: Shard,
    options: Mapping[str, Any],
    item: int,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    with_audio: bool = True,
) -> list[SharCut]:
    """Every record of one shard (CorruptShardError when it cannot be read), numbered in shard order."""
    from orchestrator.data import conversations, lhotse_manifest, nemo_manifest, shar, text_data

    if shard.format == "lhotse_shar":
        records = shar.read_shard(shard, item, storage_options, with_audio=with_audio)
    elif shard.format == "lhotse":
        records = lhotse_manifest.read_lhotse_shard(shard, options, item, storage_options, with_audio=with_audio)
    elif shard.format in ("nemo", "nemo_tarred"):
        records = nemo_manifest.read_nemo_shard(shard, options, item, storage_options, with_audio=with_audio)
    elif shard.format in ("multimodal_conversation", "share_gpt"):
        records = conversations.read_conversation_shard(shard, options, item, storage_options, with_audio=with_audio)
    elif shard.format in TEXT_TYPES:  # reads only its part's lines
        records = text_data.read_text_shard(shard, options, item, storage_options, with_audio=with_audio)
    else:
        raise ValueError(f"shard {shard.cuts} has format {shard.format!r}, which no reader handles")
    if shard.part is not None and shard.format not in TEXT_TYPES:
        first, last = part_bounds(len(records), shard.part)
        records = records[first:last]
    for index, record in enumerate(records):
        record.index = index
    return records


def split_into_parts(shards: list[Shard], records_per_shard: float, part_size: int) -> list[Shard]:
    """Shards of `records_per_shard` records (a sampled mean) as slices of about `part_size` records; shards
    whose audio is in tars are read whole (a slice would still read the whole tar)."""
    from dataclasses import replace

    count = math.ceil(records_per_shard / part_size) if records_per_shard > 0 else 1
    if count <= 1 or any(reads_audio_with_shard(s) for s in shards):
        return shards
    return [replace(s, part=(k, count)) for s in shards for k in range(count)]


def reads_audio_with_shard(shard: Shard) -> bool:
    """Its audio comes in tars read with the shard (else from files when batches are formed, or none)."""
    return bool(shard.fields)
