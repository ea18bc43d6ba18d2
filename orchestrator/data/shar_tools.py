"""Lhotse Shar tooling: write Shar (from encoded audio, manifests or audio folders) and inspect it.

Shar is a directory of numbered shards, one ``cuts.NNNNNN.jsonl.gz`` plus one ``<field>.NNNNNN.tar``
per field (recording, target_audio, ...). Readers pair shards by index and tar members by cut id, so
``inspect_shar`` checks exactly those two invariants and names every shard that breaks them.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
DEFAULT_SHARD_SIZE = 200
# cuts.000000.jsonl.gz, recording.000012.tar (also the unsharded cuts.jsonl.gz / recording.tar).
_SHARD_RE = re.compile(r"^(?P<field>[A-Za-z0-9_-]+)(?:\.(?P<index>\d+))?\.(?P<ext>jsonl\.gz|tar)$")


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
    cut (whose recordings are ``shar_recording`` placeholders) in the cuts jsonl.
    """

    def __init__(self, out_dir: str | Path, fields: dict[str, str], shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        from lhotse.shar.writers.cut import JsonlShardWriter
        from lhotse.shar.writers.tar import TarWriter

        out = _empty_shar_dir(out_dir)
        self.fields = dict(fields)
        self._cuts = JsonlShardWriter(f"{out}/cuts.%06d.jsonl.gz", shard_size)
        self._tars = {name: TarWriter(f"{out}/{name}.%06d.tar", shard_size) for name in fields}

    def __enter__(self) -> EncodedSharWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for writer in (self._cuts, *self._tars.values()):
            writer.close()

    @property
    def output_paths(self) -> dict[str, list[str]]:
        return {"cuts": self._cuts.output_paths, **{k: w.output_paths for k, w in self._tars.items()}}

    def write(self, cut, encoded: dict[str, bytes]) -> None:
        """Write ``cut`` plus one encoded blob per field (``recording`` or a custom Recording field)."""
        _check_cut_id(cut.id)
        for name, tar in self._tars.items():
            manifest = cut.recording if name == "recording" else cut.custom[name]
            tar.write(f"{cut.id}.{self.fields[name]}", io.BytesIO(encoded[name]))
            tar.write(f"{cut.id}.json", io.BytesIO(json.dumps(manifest.to_dict()).encode() + b"\n"), count=False)
        self._cuts.write(cut)


def _empty_shar_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir``; refuse one that holds shards, since readers would mix old and new ones."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.iterdir() if _SHARD_RE.match(p.name))
    if existing:
        raise FileExistsError(
            f"{out} already holds Shar files ({existing[0]}, ...); remove them or choose another output directory"
        )
    return out


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
) -> dict[str, list[str]]:
    """Write cuts (with audio attached) as Shar into ``out_dir``; returns the shard paths per field.

    ``fields`` maps field name to format, e.g. ``{"recording": "flac", "target_audio": "flac"}``.
    Refuses a directory that already holds shards, since readers would mix old and new shards.
    """
    from lhotse.shar import SharWriter

    out = _empty_shar_dir(out_dir)
    with SharWriter(str(out), fields=fields, shard_size=shard_size) as writer:
        for cut in cuts:
            _check_cut_id(cut.id)
            writer.write(cut)
    return writer.output_paths


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


# ----------------------------------------------------------------------------------------------
# Reading and inspecting
# ----------------------------------------------------------------------------------------------


def _fs_and_root(path_or_url: str | Path):
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path_or_url))
    return fs, root.rstrip("/")


def _join(path_or_url: str, name: str) -> str:
    return f"{str(path_or_url).rstrip('/')}/{name}"


def list_shar_fields(path_or_url: str | Path) -> dict[str, list[str]]:
    """Shard paths per field in one Shar directory (local or fsspec URL), sorted by shard index.

    Pass the result as ``CutSet.from_shar(fields=...)``: lhotse only globs local ``in_dir`` paths.
    """
    fs, root = _fs_and_root(path_or_url)
    found: dict[str, list[tuple[int, str]]] = {}
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _SHARD_RE.match(name)
        if match:
            index = int(match["index"]) if match["index"] is not None else -1
            found.setdefault(match["field"], []).append((index, _join(path_or_url, name)))
    return {f: [p for _, p in sorted(shards)] for f, shards in sorted(found.items())}


def find_shar_dirs(path_or_url: str | Path) -> list[str]:
    """Every directory at or below ``path_or_url`` that holds cuts shards (e.g. a demo's splits)."""
    fs, root = _fs_and_root(path_or_url)
    if not fs.exists(root):
        raise FileNotFoundError(f"{path_or_url} does not exist")
    dirs: set[str] = set()
    for entry in fs.find(root):
        parent, name = entry.rsplit("/", 1) if "/" in entry else ("", entry)
        match = _SHARD_RE.match(name)
        if match and match["field"] == "cuts" and match["ext"] == "jsonl.gz":
            dirs.add(parent)
    base = str(path_or_url).rstrip("/")
    return sorted(base + parent[len(root) :] for parent in dirs)


@dataclass
class _ShardResult:
    num_cuts: int = 0
    durations: list[float] = field(default_factory=list)
    custom_fields: set[str] = field(default_factory=set)
    referenced_fields: set[str] = field(default_factory=set)
    sample_rates: dict[str, set[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class SharReport:
    """What ``inspect_shar`` found; ``ok`` is False when any shard breaks the Shar invariants."""

    path: str
    fields: dict[str, int]  # field -> number of shards
    num_cuts: int
    hours: float
    durations: list[float]
    sample_rates: dict[str, list[int]]
    custom_fields: list[str]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_shards(self) -> int:
        return self.fields.get("cuts", 0)

    def histogram(self, width: int = 40) -> list[str]:
        """Text histogram of cut durations, 1 s bins (wider bins for long cuts)."""
        if not self.durations:
            return []
        shortest, longest = min(self.durations), max(self.durations)
        step = max(1, math.ceil((longest - shortest) / 20))
        first = math.floor(shortest / step) * step
        edges = np.arange(first, longest + step, step)
        if len(edges) < 2:
            edges = np.array([first, first + step])
        counts, edges = np.histogram(self.durations, bins=edges)
        top = counts.max() or 1
        return [
            f"{lo:6.1f}-{hi:<6.1f}s {n:7d} {'#' * max(1 if n else 0, round(width * n / top))}"
            for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True)
        ]

    def format(self) -> str:
        lines = [f"Shar {self.path}"]
        lines.append(f"  shards: {self.num_shards}   cuts: {self.num_cuts}   hours: {self.hours:.3f}")
        for name, count in self.fields.items():
            rates = self.sample_rates.get(name)
            rate_text = f"  sample rate {'/'.join(map(str, rates))} Hz" if rates else ""
            lines.append(f"  field {name:<14} {count:4d} shards{rate_text}")
        if self.custom_fields:
            lines.append(f"  custom cut attributes: {', '.join(self.custom_fields)}")
        if self.durations:
            d = np.asarray(self.durations)
            lines.append(f"  duration min/mean/max: {d.min():.2f} / {d.mean():.2f} / {d.max():.2f} s")
            lines += ["  " + row for row in self.histogram()]
        if self.problems:
            lines.append(f"  BROKEN: {len(self.problems)} problem(s)")
            lines += [f"    - {p}" for p in self.problems]
        else:
            lines.append("  consistency: OK (one shard per field per cuts shard, tars readable, ids match)")
        return "\n".join(lines)

    __str__ = format


def _is_shar_placeholder(value) -> bool:
    if not isinstance(value, dict):
        return False
    sources = value.get("sources") or []
    return value.get("storage_type") == "shar" or any(s.get("type") == "shar" for s in sources)


def _read_cuts_shard(fs, path: str, result: _ShardResult) -> list[str] | None:
    try:
        with fs.open(path, "rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            ids = []
            for line in f:
                if not line.strip():
                    continue
                item = json.loads(line)
                ids.append(item["id"])
                result.durations.append(float(item["duration"]))
                custom = item.get("custom") or {}
                result.custom_fields.update(custom)
                # Data stored in the Shar tars is marked by a "shar" source/storage placeholder.
                if _is_shar_placeholder(item.get("recording")):
                    result.referenced_fields.add("recording")
                result.referenced_fields.update(k for k, v in custom.items() if _is_shar_placeholder(v))
    except (OSError, EOFError, ValueError, KeyError) as err:
        result.problems.append(f"cuts shard {path} is unreadable ({type(err).__name__}: {err}); re-create it")
        return None
    result.num_cuts = len(ids)
    return ids


def _read_tar_shard(fs, field_name: str, path: str, result: _ShardResult) -> list[str] | None:
    """Ids of the data members of a field tar, in order; reads every byte to catch truncation."""
    ids: list[str] = []
    try:
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                name = member.name
                cut_id, _, ext = name.partition(".")
                data = tar.extractfile(member)
                payload = data.read() if data is not None else b""
                if len(payload) != member.size:
                    raise EOFError(f"member {name} has {len(payload)} of {member.size} bytes")
                if ext == "json":
                    rate = json.loads(payload).get("sampling_rate")
                    if rate:
                        result.sample_rates.setdefault(field_name, set()).add(int(rate))
                elif ext != "nometa":
                    ids.append(cut_id)
    except (OSError, EOFError, tarfile.TarError, ValueError) as err:
        result.problems.append(
            f"{field_name} shard {path} is not a readable tar ({type(err).__name__}: {err}); "
            "it is probably truncated: re-create or re-download it"
        )
        return None
    return ids


def _check_shard(fs, index: int, shards: dict[str, str | None]) -> _ShardResult:
    result = _ShardResult()
    cut_ids = _read_cuts_shard(fs, shards["cuts"], result)
    for name, path in shards.items():
        if name == "cuts" or path is None:
            continue
        member_ids = _read_tar_shard(fs, name, path, result)
        if cut_ids is None or member_ids is None or member_ids == cut_ids:
            continue
        mismatch = next(
            (i for i, (a, b) in enumerate(zip(cut_ids, member_ids, strict=False)) if a != b),
            min(len(cut_ids), len(member_ids)),
        )
        expected = cut_ids[mismatch] if mismatch < len(cut_ids) else "<end>"
        got = member_ids[mismatch] if mismatch < len(member_ids) else "<end>"
        result.problems.append(
            f"{name} shard {path} does not match {shards['cuts']}: {len(member_ids)} items vs "
            f"{len(cut_ids)} cuts, first difference at position {mismatch} (cut {expected!r}, "
            f"tar {got!r}); re-create the shard (cut ids must not contain dots)"
        )
    return result


def inspect_shar(path_or_url: str | Path, num_threads: int = 8) -> SharReport:
    """Summarise one Shar directory and check that every shard is present, readable and aligned.

    Works on local paths and fsspec URLs (s3://, gs://, ...); reads every shard fully, in threads.
    """
    path = str(path_or_url)
    fs, _ = _fs_and_root(path)
    fields = list_shar_fields(path)
    problems: list[str] = []
    cuts_shards = fields.get("cuts", [])
    if not cuts_shards:
        problems.append(
            f"{path} has no cuts shards (cuts.NNNNNN.jsonl.gz); is this the Shar directory itself? "
            f"Shar directories below it: {find_shar_dirs(path) or 'none'}"
        )
    index_of = {p: int(m["index"] or -1) for p in cuts_shards if (m := _SHARD_RE.match(p.rsplit("/", 1)[-1]))}
    by_index: dict[int, dict[str, str | None]] = {i: {"cuts": p} for p, i in index_of.items()}
    for name, shard_paths in fields.items():
        if name == "cuts":
            continue
        present = {}
        for p in shard_paths:
            m = _SHARD_RE.match(p.rsplit("/", 1)[-1])
            present[int(m["index"] or -1)] = p
        if len(shard_paths) != len(cuts_shards):
            problems.append(
                f"shar_path {path} has {len(cuts_shards)} cuts shards but {len(shard_paths)} "
                f"{name} shards; every field needs one shard per cuts shard"
            )
        for index, shards in by_index.items():
            shards[name] = present.get(index)
            if index not in present:
                suffix = f".{index:06d}" if index >= 0 else ""
                problems.append(
                    f"missing {name} shard {_join(path, f'{name}{suffix}.tar')} for "
                    f"{shards['cuts']}; re-create it or remove the field's other shards"
                )
        for index, p in present.items():
            if index not in by_index:
                problems.append(f"{name} shard {p} has no matching cuts shard; remove it")

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(pool.map(lambda item: _check_shard(fs, *item), sorted(by_index.items())))

    referenced = {f for r in results for f in r.referenced_fields}
    for name in sorted(referenced - set(fields)):
        problems.append(
            f"cuts in {path} reference field {name!r} but there are no {name}.NNNNNN.tar shards; "
            f"restore them, or read without it via CutSet.from_shar(fields=...)"
        )
    durations = [d for r in results for d in r.durations]
    rates: dict[str, set[int]] = {}
    for r in results:
        problems += r.problems
        for name, values in r.sample_rates.items():
            rates.setdefault(name, set()).update(values)
    return SharReport(
        path=path,
        fields={name: len(paths) for name, paths in fields.items()},
        num_cuts=sum(r.num_cuts for r in results),
        hours=sum(durations) / 3600,
        durations=durations,
        sample_rates={k: sorted(v) for k, v in sorted(rates.items())},
        custom_fields=sorted({c for r in results for c in r.custom_fields}),
        problems=problems,
    )
