"""`speechlm data inspect`: summarise a Shar set and check every shard (present, readable, aligned ids, audio).

Readers pair shards by index and tar members by cut id, so `inspect_shar` checks exactly those two invariants and
names every shard that breaks them. It also decodes every audio member (random bytes named `.flac` are not
audio; NaN/inf samples and a sample count below the member's manifest mean damage), and names a set that an
interrupted write left behind (`storage.atomic`). The format itself is `orchestrator.data.shar`.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.data.shar import (
    CONVERSATION_KEY,
    find_shar_dirs,
    is_shar_placeholder,
    iter_tar_entries,
    list_fields,
)
from orchestrator.storage import filesystems
from orchestrator.storage.atomic import is_partial_dir, marker_for
from orchestrator.storage.paths import is_url, join, local_path

# Bad audio members named per shard before the rest are only counted.
_SHOWN_BAD_CUTS = 3


@dataclass
class _ShardResult:
    num_cuts: int = 0
    durations: list[float] = field(default_factory=list)
    custom_fields: set[str] = field(default_factory=set)
    referenced_fields: set[str] = field(default_factory=set)
    sample_rates: dict[str, set[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    conversations: int = 0
    text_only: int = 0
    audio_turns: int = 0


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
    decoded: bool = True
    conversations: int = 0  # cuts holding a conversation (`data shar --type`), text-only ones included
    text_only: int = 0
    audio_turns: int = 0

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
        if self.conversations:
            lines.append(
                f"  conversations: {self.conversations} ({self.text_only} text-only, {self.audio_turns} audio turns)"
            )
        if self.durations:
            d = np.asarray(self.durations)
            label = "audio per cut" if self.text_only else "duration"  # text-only cuts are left out
            lines.append(f"  {label} min/mean/max: {d.min():.2f} / {d.mean():.2f} / {d.max():.2f} s")
            lines += ["  " + row for row in self.histogram()]
        if self.problems:
            lines.append(f"  BROKEN: {len(self.problems)} problem(s)")
            lines += [f"    - {p}" for p in self.problems]
        else:
            lines.append(
                "  consistency: OK (one shard per field per cuts shard, tars readable, ids match"
                + (", audio decodes)" if self.decoded else "; audio not decoded)")
            )
        return "\n".join(lines)

    __str__ = format


def _read_cuts_shard(fs, path: str, result: _ShardResult) -> list[str] | None:
    try:
        with fs.open(path, "rb") as raw, _text_stream(raw, path) as f:
            ids = []
            for line in f:
                if not line.strip():
                    continue
                item = json.loads(line)
                ids.append(item["id"])
                custom = item.get("custom") or {}
                if CONVERSATION_KEY in custom:
                    _check_conversation(item, custom[CONVERSATION_KEY], path, result)
                if CONVERSATION_KEY not in custom or item.get("recording"):  # text-only cuts have no duration
                    result.durations.append(float(item["duration"]))
                result.custom_fields.update(custom)
                # Data stored in the Shar tars is marked by a "shar" source/storage placeholder.
                if is_shar_placeholder(item.get("recording")):
                    result.referenced_fields.add("recording")
                result.referenced_fields.update(k for k, v in custom.items() if is_shar_placeholder(v))
    except (OSError, EOFError, ValueError, KeyError) as err:
        result.problems.append(f"cuts shard {path} is unreadable ({type(err).__name__}: {err}); re-create it")
        return None
    result.num_cuts = len(ids)
    return ids


def _check_conversation(item: dict, turns: list, path: str, result: _ShardResult) -> None:
    """Count a conversation cut, and name one whose audio turns are not spans of its recording."""
    result.conversations += 1
    spans = [(float(t["offset"]), float(t["duration"])) for t in turns if t.get("type") == "audio"]
    result.audio_turns += len(spans)
    has_audio = bool(item.get("recording"))
    result.text_only += not has_audio
    end = max((offset + length for offset, length in spans), default=0.0)
    length = float(item["duration"]) if has_audio else 0.0
    if (spans and not has_audio) or end > length + 1e-3:
        held = f"a {length:.2f} s recording" if has_audio else "no recording"
        result.problems.append(
            f"cuts shard {path}: conversation {item['id']!r} has audio turns up to {end:.2f} s but {held}; "
            "re-create the set with `speechlm data shar --type ...`"
        )


def _text_stream(raw, path: str):
    return gzip.open(raw, "rt", encoding="utf-8") if path.endswith(".gz") else io.TextIOWrapper(raw, encoding="utf-8")


def _audio_problem(data: bytes, manifest: dict) -> str | None:
    """Why an audio member is not the audio its manifest describes, or None."""
    import soundfile as sf

    from orchestrator.data.audio import samples_problem, wav_truncation

    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile's LibsndfileError and friends: not audio it can decode
        return f"does not decode as audio ({str(exc).splitlines()[0][:120]})"
    if cut_short := wav_truncation(data):
        return f"is a truncated WAV ({cut_short[1]} of {cut_short[0]} samples)"
    if problem := samples_problem(audio):
        return problem
    declared = manifest.get("num_samples")
    if declared and rate == manifest.get("sampling_rate") and declared - len(audio) > 0.025 * rate:
        return f"holds {len(audio) / rate:.2f} s of audio but its manifest declares {declared / rate:.2f} s"
    return None


def _array_problem(data: bytes) -> str | None:
    """Why an array member (cached codec codes, features) does not load, or None. `.npy` members are loaded
    without pickles; other encodings (lilcom) are left to lhotse."""
    import numpy as np

    if not data.startswith(b"\x93NUMPY"):
        return None
    try:
        np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # a damaged header, a pickled object array, a short file
        return f"does not load as a .npy array ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def _member_problem(data: bytes, manifest: dict) -> str | None:
    """Why a data member is not what its manifest says: an array (its manifest has `array` or `storage_type`:
    lhotse's Array, TemporalArray, Features) or audio (a Recording)."""
    if "array" in manifest or "storage_type" in manifest:
        return _array_problem(data)
    return _audio_problem(data, manifest)


def _read_tar_shard(fs, field_name: str, path: str, result: _ShardResult, decode: bool) -> list[str] | None:
    """Ids of the data members of a field tar, in order; reads every byte to catch truncation, and with `decode`
    decodes every member (audio, or arrays such as cached codec codes)."""
    ids: list[str] = []
    bad: list[str] = []
    try:
        with fs.open(path, "rb") as raw:
            for entry in iter_tar_entries(raw):
                manifest = json.loads(entry.manifest) if entry.manifest is not None else {}
                rate = manifest.get("sampling_rate")
                if rate:
                    result.sample_rates.setdefault(field_name, set()).add(int(rate))
                # Placeholders (`.nodata`: a cut without this field, e.g. a text-only cut) keep their cut's place.
                ids.append(entry.cut_id)
                if entry.data is not None:
                    if decode and (problem := _member_problem(entry.data, manifest)):
                        bad.append(f"cut {entry.cut_id!r} {problem}")
    except (OSError, EOFError, tarfile.TarError, ValueError, RuntimeError) as err:
        result.problems.append(
            f"{field_name} shard {path} is not a readable tar ({type(err).__name__}: {err}); "
            "it is probably truncated: re-create or re-download it"
        )
        return None
    if bad:
        more = f"; and {len(bad) - _SHOWN_BAD_CUTS} more" if len(bad) > _SHOWN_BAD_CUTS else ""
        result.problems.append(
            f"{field_name} shard {path}: {len(bad)} undecodable or damaged member(s): "
            + "; ".join(bad[:_SHOWN_BAD_CUTS])
            + more
            + "; re-create the shard from the source audio"
        )
    return ids


def _check_shard(fs, index: int, shards: dict[str, str | None], decode: bool) -> _ShardResult:
    result = _ShardResult()
    cut_ids = _read_cuts_shard(fs, shards["cuts"], result)
    for name, path in shards.items():
        if name == "cuts" or path is None:
            continue
        member_ids = _read_tar_shard(fs, name, path, result, decode)
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


def inspect_shar(path_or_url: str | Path, num_threads: int = 8, decode: bool = True) -> SharReport:
    """Summarise one Shar directory and check that every shard is present, readable and aligned, and (with
    `decode`) that every audio member decodes to the audio its manifest describes.

    Works on local paths and fsspec URLs (s3://, gs://, ...); reads every shard fully, in threads.
    """
    path = str(path_or_url)
    fs, _ = filesystems.fsspec_filesystem(path)
    fields = list_fields(path)
    problems: list[str] = []
    if not is_url(path) and is_partial_dir(local_path(path)):
        problems.append(
            f"{path} is an incomplete Shar set: a write was interrupted ({marker_for(local_path(path)).name} is still "
            "beside it); re-run the command that wrote it (it starts over), or delete this directory"
        )
    cuts_shards = fields.get("cuts", {})
    if not cuts_shards:
        problems.append(
            f"{path} has no cuts shards (cuts.NNNNNN.jsonl.gz); is this the Shar directory itself? "
            f"Shar directories below it: {find_shar_dirs(path) or 'none'}"
        )
    by_index: dict[int, dict[str, str | None]] = {i: {"cuts": p} for i, p in cuts_shards.items()}
    for name, present in fields.items():
        if name == "cuts":
            continue
        if len(present) != len(cuts_shards):
            problems.append(
                f"shar_path {path} has {len(cuts_shards)} cuts shards but {len(present)} "
                f"{name} shards; every field needs one shard per cuts shard"
            )
        for index, shards in by_index.items():
            shards[name] = present.get(index)
            if index not in present:
                suffix = f".{index:06d}" if index >= 0 else ""
                problems.append(
                    f"missing {name} shard {join(path, f'{name}{suffix}.tar')} for "
                    f"{shards['cuts']}; re-create it or remove the field's other shards"
                )
        for index, p in present.items():
            if index not in by_index:
                problems.append(f"{name} shard {p} has no matching cuts shard; remove it")

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(pool.map(lambda item: _check_shard(fs, *item, decode), sorted(by_index.items())))

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
        custom_fields=sorted({c for r in results for c in r.custom_fields} - {CONVERSATION_KEY}),
        problems=problems,
        decoded=decode,
        conversations=sum(r.conversations for r in results),
        text_only=sum(r.text_only for r in results),
        audio_turns=sum(r.audio_turns for r in results),
    )
