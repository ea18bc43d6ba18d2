"""Find the shards of a Lhotse Shar dataset and check that they belong together.

A Shar directory holds `cuts.NNNNNN.jsonl.gz` manifests and one file per field and shard, e.g.
`recording.NNNNNN.tar` or `target_audio.NNNNNN.tar`. A shard is one cuts file plus the matching file of every
field. Listing happens once on the driver; Ray Data tasks then read whole shards by path (local or fsspec URL).

`shar_path` may be:
- a directory (local, or an fsspec URL such as `s3://bucket/train` when the filesystem can list it),
- a list of directories (or of `[directory, weight]` pairs, NeMo style),
- a dict of explicit field lists `{"cuts": [...], "recording": [...], ...}`, for stores that cannot list
  (plain HTTP) or to read a subset of fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `<field>.<6 digits>.<extension>`; field names never contain dots (lhotse's own rule).
_SHARD_NAME = re.compile(r"^(?P<field>[^./]+)\.(?P<index>\d{6})\.(?P<ext>[A-Za-z0-9.]+)$")
# Fields the pipeline decodes. Other fields (features, custom arrays) are left unread.
AUDIO_FIELDS = ("recording", "target_audio")


class SharLayoutError(ValueError):
    """The files of a Shar dataset do not form complete shards."""


@dataclass(frozen=True)
class Shard:
    """One Shar shard: its cuts manifest and the file of every audio field, as paths or URLs."""

    cuts: str
    fields: Mapping[str, str]
    source: str  # the shar_path entry it came from (for messages)
    input_index: int = 0  # which input_cfg entry (for tags and mixing weights)

    @property
    def name(self) -> str:
        """Short human-readable name used in warnings and errors."""
        return self.cuts

    @property
    def has_target_audio(self) -> bool:
        return "target_audio" in self.fields


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _list_dir(path: str) -> list[str]:
    """File names directly inside a local directory or an fsspec URL."""
    if not _is_url(path):
        local = Path(path.removeprefix("file://"))
        if not local.is_dir():
            raise SharLayoutError(
                f"shar_path {path!r} is not a directory; give a Shar directory or a dict of field lists"
            )
        return sorted(p.name for p in local.iterdir() if p.is_file())
    import fsspec

    from orchestrator.object_storage import fsspec_options, protocol

    try:
        # Explicit endpoint/credentials, as the read tasks get them (see DatasetPlan.storage_options).
        fs, root = fsspec.core.url_to_fs(path, **fsspec_options().get(protocol(path), {}))
        entries = fs.ls(root, detail=False)
    except Exception as exc:
        raise SharLayoutError(
            f"cannot list shar_path {path!r} ({type(exc).__name__}: {exc}); for stores that cannot list "
            "(e.g. plain HTTP), pass explicit field lists: shar_path: {cuts: [...], recording: [...]}"
        ) from exc
    return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if _is_url(base) else str(Path(base.removeprefix("file://")) / name)


def discover_dir(path: str, input_index: int = 0) -> list[Shard]:
    """The shards of one Shar directory, in shard-number order, checked for completeness.

    Every field present must have exactly one file per cuts shard, with the same shard numbers; only the
    audio fields (`recording`, `target_audio`) are kept for reading.
    """
    by_field: dict[str, dict[int, str]] = {}
    for name in _list_dir(path):
        m = _SHARD_NAME.match(name)
        if m is None:
            continue
        ext = m["ext"]
        if m["field"] == "cuts" and not ext.startswith("jsonl"):
            continue
        by_field.setdefault(m["field"], {})[int(m["index"])] = _join(path, name)
    if "cuts" not in by_field:
        raise SharLayoutError(
            f"shar_path {path!r} has no cuts.NNNNNN.jsonl.gz files; is it a Lhotse Shar directory "
            "(written by CutSet.to_shar)?"
        )
    cuts = by_field.pop("cuts")
    _check_consistent(path, cuts, by_field)
    if "recording" not in by_field:
        raise SharLayoutError(
            f"shar_path {path!r} has no recording.NNNNNN.tar files; the audio must be written into the Shar "
            "dataset (CutSet.to_shar(..., fields={'recording': 'flac'}))"
        )
    audio = {f: files for f, files in by_field.items() if f in AUDIO_FIELDS}
    return [
        Shard(cuts=cuts[i], fields={f: files[i] for f, files in audio.items()}, source=path, input_index=input_index)
        for i in sorted(cuts)
    ]


def _check_consistent(source: str, cuts: dict[int, str], fields: dict[str, dict[int, str]]) -> None:
    """Raise one error listing every field whose shards do not match the cuts shards one to one."""
    problems = []
    for name, files in sorted(fields.items()):
        if set(files) == set(cuts):
            continue
        missing = sorted(set(cuts) - set(files))
        extra = sorted(set(files) - set(cuts))
        detail = []
        if missing:
            detail.append(f"missing {name} for shard(s) {_fmt_indices(missing)}")
        if extra:
            detail.append(f"{name} shard(s) {_fmt_indices(extra)} have no cuts file")
        problems.append(f"{len(cuts)} cuts shards but {len(files)} {name} shards ({'; '.join(detail)})")
    if problems:
        raise SharLayoutError(
            f"shar_path {source!r} has " + " and ".join(problems) + "; every field needs one shard per cuts shard "
            "(re-export the dataset or remove the incomplete field files)"
        )


def _fmt_indices(indices: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(f"{i:06d}" for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def discover_field_lists(fields: Mapping[str, Sequence[str]], input_index: int = 0) -> list[Shard]:
    """Shards from explicit per-field lists (lhotse's `CutSet.from_shar(fields=...)` convention)."""
    if "cuts" not in fields:
        raise SharLayoutError(f"shar_path field lists {sorted(fields)} have no 'cuts' list; add cuts: [...]")
    cuts = list(fields["cuts"])
    problems = [
        f"{len(cuts)} cuts shards but {len(paths)} {name} shards"
        for name, paths in sorted(fields.items())
        if name != "cuts" and len(paths) != len(cuts)
    ]
    if problems:
        raise SharLayoutError(
            "shar_path field lists have " + " and ".join(problems) + "; every field needs one shard per cuts shard, "
            "listed in the same order"
        )
    if "recording" not in fields:
        raise SharLayoutError(f"shar_path field lists {sorted(fields)} have no 'recording' list; add recording: [...]")
    audio = {f: list(p) for f, p in fields.items() if f in AUDIO_FIELDS}
    source = f"{{cuts: [{cuts[0]}, ...]}}" if cuts else "{cuts: []}"
    return [
        Shard(cuts=str(c), fields={f: str(p[i]) for f, p in audio.items()}, source=source, input_index=input_index)
        for i, c in enumerate(cuts)
    ]


def discover_shards(shar_path: Any, input_index: int = 0) -> list[tuple[list[Shard], float]]:
    """Every shard that `shar_path` names, grouped per directory with its mixing weight.

    Returns a list of `(shards, weight)`: one entry per directory (weight 1.0 unless given as a NeMo-style
    `[dir, weight]` pair) or per dict of field lists.
    """
    if shar_path is None:
        raise SharLayoutError("shar_path is not set; give a Shar directory, a list of them, or field lists")
    if isinstance(shar_path, Mapping):
        return [(discover_field_lists(shar_path, input_index), 1.0)]
    if isinstance(shar_path, (str, Path)):
        shards = discover_dir(str(shar_path), input_index)
        return [(shards, 1.0)]
    if isinstance(shar_path, Sequence):
        groups: list[tuple[list[Shard], float]] = []
        for entry in shar_path:
            if isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
                path, weight = entry
                groups.append((discover_dir(str(path), input_index), float(weight)))
            else:
                groups.extend(discover_shards(entry, input_index))
        if not groups:
            raise SharLayoutError("shar_path is an empty list; give at least one Shar directory")
        return groups
    raise SharLayoutError(
        f"shar_path {shar_path!r} has type {type(shar_path).__name__}; expected a directory, a list of them, "
        "or a dict of field lists"
    )
