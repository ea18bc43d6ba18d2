"""Audio-codec codes cached with S2S data: `speechlm data add-codes` writes them, the pipeline reads them.

A duplex model's codec is frozen, so the codes of an agent's audio are the same every epoch; encoding them on every
step is most of a CPU step's time (the demo's codec: 0.7 s of a 0.8 s step). `add-codes` encodes each cut's
`target_audio` once and stores the codes in its Shar directory as one more field, `target_codes.NNNNNN.tar`, in
lhotse's array layout: per cut `<cut id>.npy` ((T, K) integers on the model's frame grid) and `<cut id>.json` (its
TemporalArray manifest). Training reads the codes instead of decoding and encoding the agent audio.

Which codec made them travels with each cut: the manifest's `array.storage_path`, which lhotse leaves unused for
data stored in the tar, holds `codec-sha256:<AudioCodec.fingerprint>`, and a model with another codec refuses the
codes (DuplexS2SModel). Nothing else is written: the cuts manifests and the other fields stay as the user made
them, and lhotse's `CutSet.from_shar` reads the new field too (`cut.load_target_codes()`).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.storage.paths import is_url

logger = logging.getLogger(__name__)

CODES_FIELD = "target_codes"
_FINGERPRINT_PREFIX = "codec-sha256:"


def decode_codes(data: bytes) -> np.ndarray:
    """One cut's cached codes, (T, K) int64. `.npy` bytes only: pickled objects are refused (no code runs)."""
    try:
        codes = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"its target_codes entry is not a .npy array ({type(exc).__name__}: {exc})") from exc
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"its target_codes are {codes.dtype} {codes.shape}, not (frames, codebooks) integers")
    return codes.astype(np.int64, copy=False)


def codes_fingerprint(manifest: bytes | None) -> str | None:
    """The fingerprint of the codec that made one cut's codes, from its manifest member (None if it has none)."""
    if not manifest:
        return None
    try:
        path = json.loads(manifest)["array"].get("storage_path") or ""
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return path.removeprefix(_FINGERPRINT_PREFIX) if path.startswith(_FINGERPRINT_PREFIX) else None


def _codes_manifest(shape: tuple[int, ...], frame_length: float, fingerprint: str) -> bytes:
    """lhotse's TemporalArray manifest of a Shar-stored array, naming the codec in the unused storage_path."""
    array = {
        "storage_type": "shar",
        "storage_path": _FINGERPRINT_PREFIX + fingerprint,
        "storage_key": "",
        "shape": list(shape),
    }
    return json.dumps({"array": array, "temporal_dim": 0, "frame_shift": frame_length, "start": 0}).encode()


# ----------------------------------------------------------------------------------------------
# Writing (`speechlm data add-codes`)
# ----------------------------------------------------------------------------------------------


@dataclass
class CodesSummary:
    """What add-codes did, per Shar directory."""

    written: dict[str, int] = field(default_factory=dict)  # directory -> cuts encoded
    skipped_current: list[str] = field(default_factory=list)  # directories whose codes were already this codec's
    unreadable: dict[str, list[str]] = field(default_factory=dict)  # directory -> cuts whose audio failed
    corrupt_shards: dict[str, list[str]] = field(default_factory=dict)  # directory -> why each shard was unreadable
    seconds: float = 0.0

    def format(self) -> str:
        lines = [f"{n:>7} cuts encoded  {d}" for d, n in self.written.items()]
        lines += [f"{'up to date':>13}  {d}" for d in self.skipped_current]
        for d, cuts in self.unreadable.items():
            shown = ", ".join(cuts[:5]) + (f", ... ({len(cuts)} in all)" if len(cuts) > 5 else "")
            lines.append(
                f"{len(cuts):>7} cuts without codes (target_audio unreadable; training skips them) in {d}: {shown}"
            )
        for d, reasons in self.corrupt_shards.items():
            lines.append(f"{len(reasons):>7} corrupt shard(s) in {d}, no codes for their cuts: " + "; ".join(reasons))
        lines.append(f"done in {self.seconds:.1f} s")
        return "\n".join(lines)


@dataclass(frozen=True)
class _CodecSpec:
    source: str  # model.pretrained_audio_codec
    frame_length: float  # data.frame_length


_worker_codec: Any = None  # each encoding process loads the codec once


def _load_codec(spec: _CodecSpec) -> Any:
    from speech_models.codec import AudioCodec

    return AudioCodec.from_pretrained(spec.source, spec.frame_length)  # every quantizer, as the models use


def _init_worker(spec: _CodecSpec) -> None:
    import torch

    global _worker_codec
    torch.set_num_threads(1)  # one process per core
    _worker_codec = _load_codec(spec)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_placeholder(tar: tarfile.TarFile, cut_id: str) -> None:
    """Shar's entry for a cut without this field: training counts and skips such a cut."""
    _add_member(tar, f"{cut_id}.nodata", b"")
    _add_member(tar, f"{cut_id}.nometa", b"")


def _encode_shard(job: tuple[Any, str]) -> tuple[int, list[str], str | None]:
    """Encode one shard's target_audio into the tar `out_path`: (cuts encoded, ids of cuts without usable audio,
    why the whole shard could not be read or None). A corrupt shard gets placeholders for the cuts its manifest
    names (an empty tar if the manifest is unreadable too), so the set keeps one codes tar per shard and training
    skips and counts those cuts as it would without codes."""
    import torch

    from orchestrator.data.audio import decode_audio
    from orchestrator.data.shar import CorruptShardError, read_shard

    shard, out_path = job
    codec = _worker_codec
    encoded, unreadable = 0, []
    with tarfile.open(out_path, "w") as tar:
        try:
            records = read_shard(shard)
        except CorruptShardError as exc:
            try:
                ids = [record.id for record in read_shard(shard, with_audio=False)]
            except CorruptShardError:
                ids = []
            for cut_id in ids:
                _add_placeholder(tar, cut_id)
            return 0, ids, str(exc)
        for record in records:
            entry = record.audio.get("target_audio")
            try:
                if entry is None or entry.data is None:
                    raise ValueError("it has no target_audio")
                audio = decode_audio(entry.data, entry.manifest, codec.sampling_rate)
                with torch.inference_mode():
                    codes, _ = codec.encode(
                        torch.from_numpy(audio)[None], torch.tensor([len(audio)]), codec.sampling_rate
                    )
            except Exception as exc:  # counted and reported: the cut gets no codes, as it has no usable audio
                logger.warning("cut %s of %s: no codes (%s: %s)", record.id, shard.cuts, type(exc).__name__, exc)
                _add_placeholder(tar, record.id)
                unreadable.append(record.id)
                continue
            array = codes[0].numpy().astype(np.int32)  # (T, K); the codebooks' ids fit int32 with room to spare
            data = io.BytesIO()
            np.save(data, array, allow_pickle=False)
            _add_member(tar, f"{record.id}.npy", data.getvalue())
            _add_member(tar, f"{record.id}.json", _codes_manifest(array.shape, codec.frame_length, codec.fingerprint))
            encoded += 1
    return encoded, unreadable, None


def _fingerprint_of(shards: list[Any]) -> str | None:
    """The codec fingerprint of a directory's codes: its first cut with codes (None: no codes, or unnamed)."""
    from orchestrator.data.shar import iter_tar_entries

    for shard in shards:
        if CODES_FIELD not in shard.fields:
            return None
        with open(shard.fields[CODES_FIELD], "rb") as f:  # streamed: only up to the first cut with codes
            for entry in iter_tar_entries(f):
                if entry.data is not None:
                    return codes_fingerprint(entry.manifest)
    return None


def add_codes(
    path: str,
    codec: str,
    frame_length: float = 0.08,
    overwrite: bool = False,
    workers: int = 2,
    progress: Callable[[str], None] = print,
) -> CodesSummary:
    """Encode the `target_audio` of every Shar directory at or below `path` (local) with `codec`.

    A directory whose codes this codec already made is skipped; codes of another codec are replaced only with
    `overwrite`. A directory's tars are written aside (`.<name>.partial` beside it) and moved in
    once all of them are complete: an interrupted run leaves the directory as it was.
    """
    from orchestrator.data.shar import discover_dir, find_shar_dirs

    if is_url(path):
        raise ValueError(f"{path} is a URL; add-codes writes next to the shards, so give a local directory")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a directory; give a Shar directory (or one that holds several)")
    started = time.perf_counter()
    spec = _CodecSpec(codec, float(frame_length))
    fingerprint = _load_codec(spec).fingerprint  # fails fast on a bad codec
    summary = CodesSummary()
    plans: list[tuple[str, list[Any]]] = []
    for directory in find_shar_dirs(path):
        shards = discover_dir(directory)
        if not all("target_audio" in s.fields for s in shards):
            progress(f"skipping {directory}: it has no target_audio field (not S2S data)")
            continue
        if any(CODES_FIELD in s.fields for s in shards) and not overwrite:
            theirs = _fingerprint_of(shards)
            if theirs == fingerprint:
                summary.skipped_current.append(directory)
                continue
            raise FileExistsError(
                f"{directory} already holds target_codes made by another codec (fingerprint {str(theirs)[:12]}; "
                f"{codec} with frame length {frame_length:g} s is {fingerprint[:12]}); pass --overwrite to replace them"
            )
        plans.append((directory, shards))
    total = sum(len(shards) for _, shards in plans)
    if total:
        progress(f"encoding the target_audio of {total} shards with {codec} ({workers} processes)")
        # spawn: a forked child would inherit this process's torch thread pool
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max(1, workers), context, initializer=_init_worker, initargs=(spec,)) as pool:
            for directory, shards in plans:
                _encode_directory(pool, directory, shards, summary, progress)
    summary.seconds = time.perf_counter() - started
    return summary


def _is_codes_tar(name: str) -> bool:
    return name.startswith(f"{CODES_FIELD}.") and name.endswith(".tar")


def _encode_directory(
    pool: ProcessPoolExecutor, directory: str, shards: list[Any], summary: CodesSummary, progress: Callable
) -> None:
    """Encode one directory's shards aside, then move the tars in (replacing older codes) with the project's
    atomic directory writer: an interrupted run leaves the directory as it was."""
    from orchestrator.data.shar import shard_index
    from orchestrator.storage.atomic import atomic_dir

    names = []
    for shard in shards:
        index = shard_index(shard.cuts.rsplit("/", 1)[-1])
        names.append(f"{CODES_FIELD}.tar" if index is None or index < 0 else f"{CODES_FIELD}.{index:06d}.tar")
    with atomic_dir(directory, merge_into_existing=True, replace=_is_codes_tar) as aside:
        jobs = [
            (replace(s, fields={"target_audio": s.fields["target_audio"]}), str(aside / n))
            for s, n in zip(shards, names, strict=True)
        ]
        for n, (encoded, unreadable, corrupt) in enumerate(pool.map(_encode_shard, jobs), start=1):
            summary.written[directory] = summary.written.get(directory, 0) + encoded
            if unreadable:
                summary.unreadable.setdefault(directory, []).extend(unreadable)
            if corrupt:
                summary.corrupt_shards.setdefault(directory, []).append(corrupt)
            progress(f"  {directory}: {n}/{len(jobs)} shards")
