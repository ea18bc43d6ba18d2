"""Lhotse Shar, in one place: naming, discovery, reading and writing of shards (pipeline, `data shar`, `data inspect`).

A Shar directory holds numbered shards: `cuts.NNNNNN.jsonl.gz` manifests and one `<field>.NNNNNN.tar` per field
and shard (`recording`, `target_audio`, ...). A field tar holds, per cut and in manifest order, the encoded data
(`<cut id>.<format>`) followed by its Lhotse manifest (`<cut id>.json`); a cut without that field has
`.nodata` / `.nometa` members instead. Readers pair shards by index and tar members by position, checking ids.
In the cuts manifest, data that lives in the tars is a *placeholder*: a manifest with a `shar` source.

`shar_path` may be:
- a directory (local, or an fsspec URL such as `s3://bucket/train` when the filesystem can list it),
- a list of directories (or of `[directory, weight]` pairs, NeMo style),
- a dict of explicit field lists `{"cuts": [...], "recording": [...], ...}`, for stores that cannot list
  (plain HTTP) or to read a subset of fields.

Listing happens once on the driver; Ray Data tasks then read whole shards by path (local or fsspec URL).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from orchestrator.data.codes import CODES_FIELD
from orchestrator.data.records import SharCut, Shard, TarEntry
from orchestrator.data.tar_members import TarFormatError, plain_tar_members
from orchestrator.storage import filesystems
from orchestrator.storage.atomic import atomic_dir
from orchestrator.storage.paths import is_url, join, local_path

# `<field>[.<index>].<extension>`, e.g. cuts.000000.jsonl.gz, recording.000012.tar (lhotse also writes the
# unsharded cuts.jsonl.gz / recording.tar). Field names never contain dots (lhotse's own rule).
SHARD_NAME = re.compile(r"^(?P<field>[^./]+)(?:\.(?P<index>\d+))?\.(?P<ext>jsonl\.gz|jsonl|tar)$")
# Fields the pipeline decodes: audio, and the codec codes cached by `speechlm data add-codes`
# (orchestrator.data.codes). Other fields (features, other custom arrays) are left unread.
AUDIO_FIELDS = ("recording", "target_audio")
ARRAY_FIELDS = (CODES_FIELD,)
READ_FIELDS = AUDIO_FIELDS + ARRAY_FIELDS
# Custom cut attribute holding a conversation's turns in Shar written by `data shar --type` (text turns, and audio
# turns as [offset, offset + duration) spans of the cut's recording); read back as a conversation by `read_shard`.
CONVERSATION_KEY = "conversation"
DEFAULT_SHARD_SIZE = 200


class SharLayoutError(ValueError):
    """The files of a Shar dataset do not form complete shards."""


# ----------------------------------------------------------------------------------------------
# Naming and discovery
# ----------------------------------------------------------------------------------------------


def shard_index(file_name: str) -> int | None:
    """The shard number in a Shar file name (-1 for an unsharded file), or None for other files."""
    match = SHARD_NAME.match(file_name)
    if match is None:
        return None
    return int(match["index"]) if match["index"] is not None else -1


def list_fields(path: str) -> dict[str, dict[int, str]]:
    """`{field: {shard index: path}}` of one Shar directory (local or fsspec URL); other files are ignored."""
    if not is_url(path):
        local = Path(local_path(path))
        if not local.is_dir():
            raise SharLayoutError(
                f"shar_path {path!r} is not a directory; give a Shar directory or a dict of field lists"
            )
        names = sorted(p.name for p in local.iterdir() if p.is_file())
    else:
        try:
            # Explicit endpoint/credentials, as the read tasks get them (see DatasetPlan.storage_options).
            fs, root = filesystems.fsspec_filesystem(path)
            names = sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=False))
        except Exception as exc:
            raise SharLayoutError(
                f"cannot list shar_path {path!r} ({type(exc).__name__}: {exc}); for stores that cannot list "
                "(e.g. plain HTTP), pass explicit field lists: shar_path: {cuts: [...], recording: [...]}"
            ) from exc
    fields: dict[str, dict[int, str]] = {}
    for name in names:
        match = SHARD_NAME.match(name)
        if match is None or (match["field"] == "cuts") != match["ext"].startswith("jsonl"):
            continue
        fields.setdefault(match["field"], {})[shard_index(name)] = join(path, name)
    return fields


def field_lists(path: str) -> dict[str, list[str]]:
    """`{field: [shard paths in shard order]}` of one Shar directory: what lhotse's `CutSet.from_shar(fields=...)`
    takes (its `in_dir=` only globs local paths)."""
    return {name: [p for _, p in sorted(files.items())] for name, files in sorted(list_fields(path).items())}


def find_shar_dirs(path: str) -> list[str]:
    """Every directory at or below `path` (local or URL) that holds cuts shards (e.g. a demo's splits)."""
    fs, root = filesystems.fsspec_filesystem(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"{path} does not exist")
    dirs: set[str] = set()
    for entry in fs.find(root):
        parent, _, name = entry.rpartition("/")
        match = SHARD_NAME.match(name)
        if match and match["field"] == "cuts" and match["ext"].startswith("jsonl"):
            dirs.add(parent)
    base = path.rstrip("/")
    return sorted(base + parent[len(root) :] for parent in dirs)


def discover_dir(path: str, input_index: int = 0) -> list[Shard]:
    """The shards of one Shar directory, in shard-number order, checked for completeness.

    Every field present must have exactly one file per cuts shard, with the same shard numbers; only the
    audio fields (`recording`, `target_audio`) and cached codes (`target_codes`) are kept for reading.
    """
    by_field = list_fields(path)
    cuts = by_field.pop("cuts", {})
    if not cuts:
        raise SharLayoutError(
            f"shar_path {path!r} has no cuts.NNNNNN.jsonl.gz files; is it a Lhotse Shar directory "
            "(written by CutSet.to_shar)?"
        )
    _check_consistent(path, cuts, by_field)
    if "recording" not in by_field:
        raise SharLayoutError(
            f"shar_path {path!r} has no recording.NNNNNN.tar files; the audio must be written into the Shar "
            "dataset (CutSet.to_shar(..., fields={'recording': 'flac'}))"
        )
    read = {f: files for f, files in by_field.items() if f in READ_FIELDS}
    return [
        Shard(cuts=cuts[i], fields={f: files[i] for f, files in read.items()}, source=path, input_index=input_index)
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
    read = {f: list(p) for f, p in fields.items() if f in READ_FIELDS}
    source = f"{{cuts: [{cuts[0]}, ...]}}" if cuts else "{cuts: []}"
    return [
        Shard(cuts=str(c), fields={f: str(p[i]) for f, p in read.items()}, source=source, input_index=input_index)
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


# ----------------------------------------------------------------------------------------------
# Placeholders: which cut attributes are data stored in the field tars
# ----------------------------------------------------------------------------------------------


def is_manifest(value: Any) -> bool:
    """A serialised Lhotse manifest (Recording, Array, Features): a data field of a cut, not a plain attribute."""
    return isinstance(value, dict) and ("sources" in value or "storage_type" in value or "array" in value)


def is_shar_placeholder(value: Any) -> bool:
    """A manifest whose data is stored in this Shar set's field tars (not in a file elsewhere)."""
    if not is_manifest(value):
        return False
    sources = value.get("sources") or []
    return value.get("storage_type") == "shar" or any(s.get("type") == "shar" for s in sources)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_manifest(path: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every cut of a cuts manifest (`.jsonl.gz` or `.jsonl`), as plain dicts."""
    raw = filesystems.read_bytes(path, storage_options)
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


_PARSED: dict[str, list[dict[str, Any]]] = {}  # path -> parsed lines, most recent last
_PARSED_KEEP = 2


def read_manifest_cached(
    path: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None, *, cache: bool = True
) -> list[dict[str, Any]]:
    """`read_manifest`, keeping the last files parsed in this process when `cache`: the slices of one large
    manifest (`orchestrator.data.records.Shard.part`) are read one after another by the same read task."""
    if not cache:
        return read_manifest(path, storage_options)
    if path in _PARSED:
        _PARSED[path] = _PARSED.pop(path)
        return _PARSED[path]
    parsed = read_manifest(path, storage_options)
    _PARSED[path] = parsed
    while len(_PARSED) > _PARSED_KEEP:
        del _PARSED[next(iter(_PARSED))]
    return parsed


def iter_tar_entries(raw: bytes | io.BufferedIOBase) -> Iterator[TarEntry]:
    """The (data, manifest) member pairs of a field tar, in archive order: `.nodata`/`.nometa` members (a cut
    without this field) give None. Plain tars in memory are parsed directly (`tar_members`), others by lhotse's
    own pairwise reader over `tarfile`."""
    members = plain_tar_members(raw) if isinstance(raw, bytes) else None
    if members is None:
        yield from _iter_tar_entries_with_tarfile(raw)
        return
    if len(members) % 2:
        raise TarFormatError(f"{len(members)} members: a Shar tar holds pairs of data and manifest members")
    for (data_path, data), (meta_path, meta) in zip(members[::2], members[1::2], strict=True):
        name = PurePosixPath(data_path)
        yield TarEntry(
            str(name.with_suffix("")),
            None if name.suffix == ".nodata" else data,
            None if meta_path.endswith(".nometa") else meta,
        )


def _iter_tar_entries_with_tarfile(raw: bytes | io.BufferedIOBase) -> Iterator[TarEntry]:
    from lhotse.shar.readers.tar import iterate_tarfile_pairwise

    fileobj = io.BytesIO(raw) if isinstance(raw, bytes) else raw
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for (data, data_path), (manifest, _) in iterate_tarfile_pairwise(tar):
            name = PurePosixPath(data_path)
            yield TarEntry(str(name.with_suffix("")), data, manifest)


class CorruptShardError(RuntimeError):
    """A shard cannot be read; fatal only with `skip_corrupt: false`."""


def record_from_cut(cut: Mapping[str, Any], shard: Shard, item: int, audio: dict[str, TarEntry]) -> SharCut:
    """One Lhotse cut (a manifest line, as a dict) as a record: id, duration, joined supervision text, plain custom
    fields (manifests such as recordings left out), with the audio entries given. Shar and Lhotse manifests share it."""
    sups = cut.get("supervisions") or []
    return SharCut(
        id=str(cut.get("id")),
        duration=float(cut["duration"]) if "duration" in cut else math.nan,
        text=" ".join(t for s in sups if (t := (s.get("text") or "").strip())),
        supervisions=[
            {
                "speaker": s.get("speaker"),
                "start": float(s.get("start", 0.0)),
                "duration": float(s.get("duration", 0.0)),
                "text": s.get("text") or "",
            }
            for s in sups
        ],
        custom={k: v for k, v in (cut.get("custom") or {}).items() if not is_manifest(v)},
        audio=audio,
        item=item,
        input_index=shard.input_index,
        shard=shard.cuts,
    )


def read_shard(
    shard: Shard,
    item: int = 0,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    with_audio: bool = True,
) -> list[SharCut]:
    """Every cut of `shard` with its encoded audio, or CorruptShardError naming the shard and the cause.

    The whole shard is read before any cut is used, so a truncated tar or a garbled manifest skips the shard
    as a unit instead of yielding a prefix of it. storage_options: see DatasetPlan (None: this process's env).
    with_audio=False reads the cuts manifest only (cuts with empty `audio`), for a resumed read task that only
    needs durations and texts to rebuild its batches.
    """
    try:
        cuts = read_manifest(shard.cuts, storage_options)
    except Exception as exc:  # gzip, JSON, IO and network errors all mean "corrupt shard"
        raise CorruptShardError(f"{shard.cuts}: cannot read the cuts manifest ({type(exc).__name__}: {exc})") from exc
    fields: dict[str, list[TarEntry]] = {}
    for name, path in shard.fields.items() if with_audio else ():
        try:
            fields[name] = list(iter_tar_entries(filesystems.read_bytes(path, storage_options)))
        except Exception as exc:
            raise CorruptShardError(f"{path}: cannot read the {name} tar ({type(exc).__name__}: {exc})") from exc
        if len(fields[name]) != len(cuts):
            raise CorruptShardError(
                f"{path}: {len(fields[name])} {name} entries but {len(cuts)} cuts in {shard.cuts}; "
                "the shard is truncated or its files come from different exports"
            )
    out: list[SharCut] = []
    for idx, cut in enumerate(cuts):
        audio: dict[str, TarEntry] = {}
        arrays: dict[str, TarEntry] = {}
        for name, entries in fields.items():
            entry = entries[idx]
            if entry.cut_id != cut.get("id"):
                raise CorruptShardError(
                    f"{shard.fields[name]}: entry {idx} is {entry.cut_id!r} but cut {idx} of {shard.cuts} is "
                    f"{cut.get('id')!r}; the {name} tar and the cuts manifest are out of step"
                )
            if entry.data is not None:
                (arrays if name in ARRAY_FIELDS else audio)[name] = entry
        record = record_from_cut(cut, shard, item, audio)
        record.arrays = arrays
        if CODES_FIELD in fields and CODES_FIELD not in arrays:  # add-codes could not read its target_audio
            record.unreadable = (
                f"it has no {CODES_FIELD} in {shard.fields[CODES_FIELD]} (add-codes could not read its target_audio)"
            )
        if CONVERSATION_KEY in record.custom:
            try:
                _as_conversation(record, record.custom.pop(CONVERSATION_KEY))
            except (KeyError, TypeError, ValueError) as exc:
                raise CorruptShardError(
                    f"{shard.cuts}: cut {record.id!r} has a malformed {CONVERSATION_KEY!r} ({type(exc).__name__}: "
                    f"{exc}); re-create the shard with `speechlm data shar --type ...`"
                ) from exc
        out.append(record)
    return out


def _as_conversation(record: SharCut, turns: list[dict[str, Any]]) -> None:
    """Make a cut written by `data shar --type` a conversation again: its audio turns are spans of its one
    recording (`orchestrator.data.convert_inputs`), each read as its own audio key."""
    from orchestrator.data.records import Turn, conversation_text

    out: list[Turn] = []
    recording = record.audio.get("recording")
    for turn in turns:
        if turn["type"] != "audio":
            out.append(Turn(turn["role"], text=str(turn["value"])))
            continue
        key = f"audio{sum(t.is_audio for t in out)}"
        if recording is not None:
            record.audio[key] = recording
        record.spans[key] = (float(turn["offset"]), float(turn["duration"]))
        out.append(Turn(turn["role"], audio=key))
    record.audio.pop("recording", None)
    record.turns = tuple(out)
    record.text = conversation_text(record.turns)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def safe_cut_id(raw: str) -> str:
    """A cut id Shar can round-trip: lhotse's tar reader splits member names at the first dot."""
    return re.sub(r"[.\s/\\]+", "_", raw).strip("_") or "cut"


def encode_audio(audio: np.ndarray, sampling_rate: int, audio_format: str = "flac") -> bytes:
    """Encode a float mono array the way lhotse's Shar writer does (16-bit for FLAC/WAV).

    Cheap to call in worker processes: needs soundfile only, not lhotse or torch.
    """
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(audio, dtype=np.float32), sampling_rate, format=audio_format.upper())
    return buf.getvalue()


def shar_recording(recording_id: str, sampling_rate: int, num_samples: int):
    """A Recording manifest whose audio lives in a Shar tar (what lhotse writes into the cuts)."""
    from lhotse import AudioSource, Recording

    return Recording(
        id=recording_id,
        sources=[AudioSource(type="shar", channels=[0], source="")],
        sampling_rate=sampling_rate,
        num_samples=num_samples,
        duration=num_samples / sampling_rate,
    )


class EncodedSharWriter:
    """Writes Shar from audio that is already encoded, e.g. FLAC made in worker processes.

    lhotse's ``SharWriter`` decodes each cut's audio and encodes it again in the writing process;
    for synthetic data that round trip is the bottleneck. This writer produces the same files with
    lhotse's own shard writers: per cut, ``<id>.<format>`` + ``<id>.json`` in each field tar and the
    cut (whose recordings are ``shar_recording`` placeholders) in the cuts jsonl. Like ``write_shar`` it
    writes atomically: the set appears in ``out_dir`` when the writer is closed without an error.
    """

    def __init__(
        self, out_dir: str | Path, fields: dict[str, str], shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False
    ) -> None:
        from lhotse.shar.writers.cut import JsonlShardWriter
        from lhotse.shar.writers.tar import TarWriter

        self.out_dir = Path(out_dir)
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_shar_dir(out_dir, overwrite))
        self._tmp = tmp
        self.fields = dict(fields)
        self._cuts = JsonlShardWriter(f"{tmp}/cuts.%06d.jsonl.gz", shard_size)
        self._tars = {name: TarWriter(f"{tmp}/{name}.%06d.tar", shard_size) for name in fields}

    def __enter__(self) -> EncodedSharWriter:
        return self

    def __exit__(self, *exc) -> None:
        for writer in (self._cuts, *self._tars.values()):
            writer.close()
        self._stack.__exit__(*exc)

    def close(self) -> None:
        """Finish the last shards and move the set into place."""
        self.__exit__(None, None, None)

    @property
    def output_paths(self) -> dict[str, list[str]]:
        paths = {"cuts": self._cuts.output_paths, **{k: w.output_paths for k, w in self._tars.items()}}
        return _final_paths(paths, self._tmp, self.out_dir)

    def write(self, cut, encoded: dict[str, bytes]) -> None:
        """Write ``cut`` plus one encoded blob per field (``recording`` or a custom Recording field); a field
        missing from ``encoded`` is written as lhotse's no-data placeholder."""
        _check_cut_id(cut.id)
        for name, tar in self._tars.items():
            if name not in encoded:  # as lhotse's writer: a cut without this field (text-only) gets placeholders
                tar.write(f"{cut.id}.nodata", io.BytesIO())
                tar.write(f"{cut.id}.nometa", io.BytesIO(), count=False)
                continue
            manifest = cut.recording if name == "recording" else cut.custom[name]
            tar.write(f"{cut.id}.{self.fields[name]}", io.BytesIO(encoded[name]))
            tar.write(f"{cut.id}.json", io.BytesIO(json.dumps(manifest.to_dict()).encode() + b"\n"), count=False)
        self._cuts.write(cut)


def _is_shar_file(name: str) -> bool:
    return SHARD_NAME.match(name) is not None


def _is_cuts_file(name: str) -> bool:
    return name.startswith("cuts.") and _is_shar_file(name)


@contextlib.contextmanager
def atomic_shar_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A directory to write a Shar set into, moved to ``out_dir`` once complete (`storage.atomic.atomic_dir`).

    A directory that already holds shards is refused (readers would mix old and new ones) unless ``overwrite``,
    which replaces exactly those shard files, and only once the new set is complete. Other files in
    ``out_dir`` stay. Cuts manifests are moved in last, so an interrupted move never looks like a whole shard.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory for the Shar set")
    existing = sorted(p.name for p in out.iterdir() if _is_shar_file(p.name)) if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds Shar files ({existing[0]}, ...); choose another output directory, or pass "
            "--overwrite to replace them (they are replaced only once the new set is complete)"
        )
    with atomic_dir(out, merge_into_existing=True, last=_is_cuts_file, replace=_is_shar_file) as tmp:
        yield tmp


def _final_paths(paths: dict[str, list[str]], tmp: Path, out: Path) -> dict[str, list[str]]:
    return {k: [str(out / Path(p).name) if Path(p).parent == tmp else p for p in v] for k, v in paths.items()}


def _check_cut_id(cut_id: str) -> None:
    if "." in cut_id:
        raise ValueError(
            f"cut id {cut_id!r} contains a dot, which lhotse's Shar reader mis-splits; rename it (see safe_cut_id)"
        )


def write_shar(
    cuts: Iterable,
    out_dir: str | Path,
    fields: dict[str, str],
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Write cuts (with audio attached) as Shar into ``out_dir``, atomically; returns the shard paths per field.

    ``fields`` maps field name to format, e.g. ``{"recording": "flac", "target_audio": "flac"}``.
    Refuses a directory that already holds shards unless ``overwrite`` (see ``atomic_shar_dir``).
    """
    from lhotse.shar import SharWriter

    if shard_size < 1:
        raise ValueError(f"shard size {shard_size} must be at least 1 (cuts per shard)")
    with atomic_shar_dir(out_dir, overwrite) as tmp:
        with SharWriter(str(tmp), fields=fields, shard_size=shard_size) as writer:
            for cut in cuts:
                _check_cut_id(cut.id)
                writer.write(cut)
        return _final_paths(writer.output_paths, tmp, Path(out_dir))
