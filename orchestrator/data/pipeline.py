"""Ray Data pipelines that turn Lhotse Shar shards into ready-to-train batches, one row per batch.

Data flow of one dataset (all of it inside Ray Data read tasks, on any node with CPUs):

    work items (epoch, shard) -> read the whole shard (cuts jsonl + audio tars) -> shuffle its cuts (seeded)
    -> drop too short / too long / empty-text cuts (counted) -> duration bucketing (bucketing.py)
    -> decode + resample the audio of a full bucket -> collator (prompt format, tokenise) -> ONE ROW

Work items: item `g` is shard `order(epoch)[g % S]` of epoch `g // S` (S shards per epoch); `order(epoch)` is
shuffled from the shard seed + epoch, so it is reproducible. The training dataset is one stream of items over
`max_epochs` epochs (UNBOUNDED_EPOCHS when None: the loop stops at max_steps). Items are cut into groups of
`num_workers` read tasks; inside a group, task k reads every num_workers-th item from the k-th, so the tasks
of a group, which Ray Data runs side by side, read the items roughly in order. A group spans whole epochs and
at least MIN_GROUP_ITEMS items, so tasks are long-lived (starting a task costs Ray Data tens of milliseconds,
a second concurrent one about a second). A task's bucket buffer spans all its shards, but cuts that have waited
an epoch are flushed as partial batches, so the resume position never lags by more than an epoch. Validation
datasets are one epoch, unshuffled: every cut is emitted exactly once.

Rows: one pyarrow row per batch with two binary cells, the pickled collated batch and a small pickled meta
dict (epoch, items, counters, audio seconds real vs padded, resume marks). One pickled cell instead of Arrow
tensor columns keeps per-row overhead to one `pickle.loads` and supports any collator output.

Counters: drops and corruption are counted per task and attached to the task's next row, so they reach the
training workers as numbers (`BatchMeta.counters`). A task holds its latest row back until the next one is
ready, so counts that arrive after its last batch still ride on that batch. A task that produced no batch at
all emits a zero-size marker row instead, only for datasets split with `equal=False` (validation): a marker in
the equal split would cost one rank a step. For the training stream such counts are logged as a warning.

Resume (`DataPosition`): shard granularity. Every row carries its task's low-water mark (every item of the
task below it has been emitted); `iterate_batches` keeps the marks it sees and derives the oldest item not yet
consumed; `merge_positions` combines ranks. A resumed run starts at that item: it re-reads the few shards in
flight at checkpoint time (and can miss a few batches still in prefetch buffers), and never re-reads the epoch
from its start.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import pickle
import random
import secrets
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.train import DataConfig

from orchestrator import object_storage
from orchestrator.data.bucketing import BatchingSpec, DurationBucketer, estimate_duration_bins
from orchestrator.data.shards import Shard, discover_shards
from orchestrator.data.torn_imports import retire_process_if_imports_are_torn

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from orchestrator.config.schema import DataConfig, DatasetConfig

logger = logging.getLogger(__name__)

# Counters carried by rows and summed by iterate_batches. Names are metric names (prefix them per dataset).
COUNTER_NAMES = (
    "shards_read",  # work items (shards) read, corrupt ones included
    "corrupt_shards",  # shards skipped whole: unreadable manifest or tar, or cuts and tar out of step
    "cuts_read",  # cuts in readable shards
    "too_short",  # duration < min_duration
    "too_long",  # duration > max_duration
    "empty_text",  # no supervision text
    "unreadable_cuts",  # audio that could not be decoded, or unsupported cut types (e.g. MixedCut)
    "cuts_batched",  # cuts that reached a batch
)
TRAIN = "train"
VAL_PREFIX = "val_"
DEFAULT_VAL_NAME = "default"  # validation_ds without named `datasets` -> "val_default"
_BIN_ESTIMATE_MAX_SHARDS = 16  # manifests read on the driver to estimate bucket bins when none are given
# max_epochs=None: the training stream is this many epochs long (the loop stops at max_steps long before).
UNBOUNDED_EPOCHS = 1000
# Ray Data puts every read task in the object store up front (about 1 ms each): a long stream is cut into at
# most this many tasks, each covering more shards.
MAX_READ_TASKS = 256
# A group of read tasks spans at least this many work items, in whole epochs. Every group starts new tasks and
# Ray Data adds a second concurrent task only about a second after the first, so one-epoch groups of a small
# dataset (tasks of well under a second) left the stream slower than lhotse's own reader (bench/README.md).
MIN_GROUP_ITEMS = 64


class CorruptShardError(RuntimeError):
    """A shard cannot be read; fatal only with `skip_corrupt: false`."""


class UnreadableCutError(RuntimeError):
    """A cut's audio cannot be decoded; fatal only with `skip_corrupt: false`."""


# ----------------------------------------------------------------------------------------------
# Resume position
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPosition:
    """Where a dataset stream is, at shard (work item) granularity; stored in checkpoints.

    `item` is the first work item a resumed run reads (epoch = item // shards_per_epoch). `marks` (read task
    -> low-water mark) and `groups` (the task groups those tasks belong to) let positions from several ranks
    be merged: rows of one task are spread over all ranks.
    """

    item: int = 0
    shards_per_epoch: int = 0
    marks: tuple[tuple[int, int], ...] = ()  # (task, every item of the task below this one was consumed)
    groups: tuple[tuple[int, int, int, int, int], ...] = ()  # (group, start, end, first task, num tasks)

    @property
    def epoch(self) -> int:
        return self.item // self.shards_per_epoch if self.shards_per_epoch else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for checkpoints."""
        return {
            "item": self.item,
            "shards_per_epoch": self.shards_per_epoch,
            "marks": [list(m) for m in self.marks],
            "groups": [list(g) for g in self.groups],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataPosition:
        return cls(
            int(d["item"]),
            int(d["shards_per_epoch"]),
            tuple((int(t), int(m)) for t, m in d.get("marks", ())),
            tuple(tuple(int(x) for x in g) for g in d.get("groups", ())),  # type: ignore[misc]
        )


def _resume_item(marks: Mapping[int, int], groups: Mapping[int, tuple[int, int, int, int]], default: int) -> int:
    """Oldest work item not yet consumed: tasks of a seen group that were never seen count from its start."""
    oldest = []
    for start, end, first, num in groups.values():
        for task in range(first, first + num):
            mark = marks.get(task, start)
            if mark < end:
                oldest.append(mark)
    if oldest:
        return min(oldest)
    return max((end for _, end, _, _ in groups.values()), default=default)


def merge_positions(positions: Sequence[DataPosition]) -> DataPosition:
    """One resume position from every rank's (gather them with e.g. `torch.distributed.all_gather_object`).

    Each rank's `item` is a safe resume point from its own view, so the furthest of them is too; per read task
    the furthest mark any rank saw can move it further (rows of one task are spread over all ranks).
    """
    positions = [p for p in positions if p is not None]
    if not positions:
        return DataPosition()
    floor = max(p.item for p in positions)
    marks: dict[int, int] = {}
    groups: dict[int, tuple[int, int, int, int]] = {}
    for p in positions:
        for task, mark in p.marks:
            marks[task] = max(mark, marks.get(task, mark))
        for g, *rest in p.groups:
            if rest[1] > floor:  # a group wholly behind some rank's resume point is done
                groups[g] = tuple(rest)  # type: ignore[assignment]
    item = max(floor, _resume_item(marks, groups, default=floor))
    return DataPosition(
        item,
        positions[0].shards_per_epoch,
        tuple(sorted((t, m) for t, m in marks.items() if any(g[2] <= t < g[2] + g[3] for g in groups.values()))),
        tuple((g, *rest) for g, rest in sorted(groups.items())),
    )


# ----------------------------------------------------------------------------------------------
# The plan of one dataset: everything a read task needs, built on the driver and pickled once
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputPlan:
    """One group of shards (an input_cfg entry or one directory of it) and how to decode it."""

    shards: tuple[Shard, ...]
    weight: float
    tags: Mapping[str, Any]
    sample_rate: int  # source audio rate after resampling
    target_sample_rate: int | None  # target_audio rate (S2S inputs), else None


@dataclass(frozen=True)
class TaskGroup:
    """Read tasks that share a run of work items, item i going to task first_task + (i - start) % num_tasks.

    Ray Data starts tasks in order and the tasks of a group run side by side, so items are read roughly in
    order whatever the number of tasks the cluster can run at once.
    """

    index: int
    start: int
    end: int
    first_task: int
    num_tasks: int


@dataclass(frozen=True)
class DatasetPlan:
    """A dataset's shards, order, filters, batching and collator; the argument of every read task."""

    name: str
    inputs: tuple[InputPlan, ...]
    batching: BatchingSpec
    collate: Callable[[list[dict]], Mapping[str, Any]]
    shuffle: bool = True
    base_seed: int = 42
    min_duration: float = 0.0
    max_duration: float = math.inf
    skip_corrupt: bool = True
    concurrency: int = 1  # read tasks in flight (dataset num_workers)
    group_items: int = 1  # work items per group of `concurrency` read tasks
    start_item: int = 0
    end_item: int = 1  # exclusive
    equal_split: bool = True  # split with equal=True: no marker rows
    # fsspec kwargs per protocol (custom S3 endpoint, credentials), resolved from the driver's env: read tasks
    # may run in processes or on nodes without that env (object_storage.fsspec_options).
    storage_options: Mapping[str, Mapping[str, Any]] | None = None

    @property
    def shards_per_epoch(self) -> int:
        return sum(len(i.shards) for i in self.inputs)

    @property
    def tasks_per_group(self) -> int:
        return max(1, min(self.concurrency, self.group_items))

    @property
    def num_tasks(self) -> int:
        total = max(0, self.end_item - self.start_item)
        full, rest = divmod(total, self.group_items)
        # At least one (then empty) task: Ray Data handles a task without output better than no task at all.
        return max(1, full * self.tasks_per_group + min(self.tasks_per_group, rest))

    def group_of(self, task_index: int) -> TaskGroup:
        """The group of read tasks that `task_index` belongs to."""
        g = task_index // self.tasks_per_group
        start = self.start_item + g * self.group_items
        end = max(start, min(self.end_item, start + self.group_items))
        first = g * self.tasks_per_group
        return TaskGroup(g, start, end, first, max(1, min(self.tasks_per_group, end - start)))

    def task_items(self, task_index: int) -> range:
        """The work items of read task `task_index`: every n-th item of its group, n = tasks in the group."""
        group = self.group_of(task_index)
        return range(group.start + task_index - group.first_task, group.end, group.num_tasks)

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """(input index, shard index) in the order epoch `epoch` reads them.

        Without shuffling, inputs are concatenated in order. With shuffling, each input's shards are shuffled
        and the inputs interleaved at random in proportion to their weights (each shard is read once per epoch;
        weights set how evenly inputs are mixed over the epoch, not how often a shard repeats).
        """
        per_input = [list(range(len(inp.shards))) for inp in self.inputs]
        if not self.shuffle:
            return [(i, j) for i, shards in enumerate(per_input) for j in shards]
        rng = random.Random(self.base_seed + epoch)
        for shards in per_input:
            rng.shuffle(shards)
        if len(per_input) == 1:
            return [(0, j) for j in per_input[0]]
        taken = [0] * len(per_input)
        order: list[tuple[int, int]] = []
        for _ in range(self.shards_per_epoch):
            weights = [
                inp.weight * (len(per_input[i]) - taken[i]) if taken[i] < len(per_input[i]) else 0.0
                for i, inp in enumerate(self.inputs)
            ]
            (i,) = rng.choices(range(len(per_input)), weights=weights)
            order.append((i, per_input[i][taken[i]]))
            taken[i] += 1
        return order


# ----------------------------------------------------------------------------------------------
# Reading one shard
# ----------------------------------------------------------------------------------------------


@dataclass
class RawCut:
    """One cut's metadata and still-encoded audio, as read from a shard (decoded only when batched)."""

    id: str
    duration: float
    text: str
    supervisions: list[dict[str, Any]]
    custom: dict[str, Any]
    audio: dict[str, tuple[bytes, bytes | None]]  # field -> (encoded data, lhotse manifest json)
    item: int
    input_index: int
    shard: str


def _read_manifest(path: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    raw = object_storage.read_bytes(path, storage_options)
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def _read_audio_tar(
    path: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[tuple[str, bytes | None, bytes | None]]:
    """(cut id, data or None, manifest json or None) per cut, in archive order."""
    out: list[tuple[str, bytes | None, bytes | None]] = []
    with tarfile.open(fileobj=io.BytesIO(object_storage.read_bytes(path, storage_options)), mode="r:") as tar:
        members = tar.getmembers()
        if len(members) % 2:
            raise ValueError(f"{len(members)} tar members; Shar stores a data file and a .json file per cut")
        for data_info, meta_info in zip(members[0::2], members[1::2], strict=True):
            name = PurePosixPath(data_info.name)
            if name.suffix == ".nodata":
                out.append((str(name.with_suffix("")), None, None))
                continue
            data = tar.extractfile(data_info).read()
            meta = tar.extractfile(meta_info).read() if PurePosixPath(meta_info.name).suffix == ".json" else None
            out.append((str(name.with_suffix("")), data, meta))
    return out


def _is_manifest(value: Any) -> bool:
    return isinstance(value, dict) and ("sources" in value or "storage_type" in value or "array" in value)


def read_shard(
    shard: Shard, item: int = 0, storage_options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[RawCut]:
    """Every cut of `shard` with its encoded audio, or CorruptShardError naming the shard and the cause.

    The whole shard is read before any cut is used, so a truncated tar or a garbled manifest skips the shard
    as a unit instead of yielding a prefix of it. storage_options: see DatasetPlan (None: this process's env).
    """
    try:
        cuts = _read_manifest(shard.cuts, storage_options)
    except Exception as exc:  # gzip, JSON, IO and network errors all mean "corrupt shard"
        raise CorruptShardError(f"{shard.cuts}: cannot read the cuts manifest ({type(exc).__name__}: {exc})") from exc
    fields: dict[str, list[tuple[str, bytes | None, bytes | None]]] = {}
    for name, path in shard.fields.items():
        try:
            fields[name] = _read_audio_tar(path, storage_options)
        except Exception as exc:
            raise CorruptShardError(f"{path}: cannot read the {name} tar ({type(exc).__name__}: {exc})") from exc
        if len(fields[name]) != len(cuts):
            raise CorruptShardError(
                f"{path}: {len(fields[name])} {name} entries but {len(cuts)} cuts in {shard.cuts}; "
                "the shard is truncated or its files come from different exports"
            )
    out: list[RawCut] = []
    for idx, cut in enumerate(cuts):
        audio: dict[str, tuple[bytes, bytes | None]] = {}
        for name, entries in fields.items():
            entry_id, data, meta = entries[idx]
            if entry_id != cut.get("id"):
                raise CorruptShardError(
                    f"{shard.fields[name]}: entry {idx} is {entry_id!r} but cut {idx} of {shard.cuts} is "
                    f"{cut.get('id')!r}; the {name} tar and the cuts manifest are out of step"
                )
            if data is not None:
                audio[name] = (data, meta)
        sups = cut.get("supervisions") or []
        custom = {k: v for k, v in (cut.get("custom") or {}).items() if not _is_manifest(v)}
        out.append(
            RawCut(
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
                custom=custom,
                audio=audio,
                item=item,
                input_index=shard.input_index,
                shard=shard.cuts,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# Decoding audio
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _resample_ratio(src: int, dst: int) -> tuple[int, int]:
    g = math.gcd(src, dst)
    return dst // g, src // g


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy's resample_poly): fast and band-limited for the usual rate pairs."""
    if src_rate == dst_rate:
        return audio
    from scipy.signal import resample_poly

    up, down = _resample_ratio(src_rate, dst_rate)
    return resample_poly(audio, up, down).astype(np.float32, copy=False)


def decode_audio(data: bytes, meta: bytes | None, sample_rate: int) -> np.ndarray:
    """Encoded audio bytes -> float32 mono at `sample_rate`. soundfile first; lhotse for other formats."""
    import soundfile as sf

    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        audio = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)
    except Exception:  # soundfile cannot read every format lhotse writes (e.g. opus via ffmpeg)
        if meta is None:
            raise
        from lhotse.serialization import decode_json_line, deserialize_item
        from lhotse.shar.utils import fill_shar_placeholder

        recording = deserialize_item(decode_json_line(meta.decode("utf-8")))
        fill_shar_placeholder(manifest=recording, data=data, tarpath="audio")
        audio = recording.load_audio().astype(np.float32)
        audio = audio[0] if audio.shape[0] == 1 else audio.mean(axis=0)
        rate = recording.sampling_rate
    return np.ascontiguousarray(resample(audio, int(rate), sample_rate), dtype=np.float32)


def to_example(cut: RawCut, inp: InputPlan) -> dict[str, Any]:
    """The example dict a collator receives (see speech_models.registry)."""
    if "recording" not in cut.audio:
        raise ValueError("the cut has no recording data in its shard")
    example: dict[str, Any] = {
        "id": cut.id,
        "duration": cut.duration,
        "audio": decode_audio(*cut.audio["recording"], inp.sample_rate),
        "text": cut.text,
        "supervisions": cut.supervisions,
        "tags": dict(inp.tags),
        "custom": cut.custom,
    }
    if inp.target_sample_rate is not None and "target_audio" in cut.audio:
        example["target_audio"] = decode_audio(*cut.audio["target_audio"], inp.target_sample_rate)
    return example


def pad_audio_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """A model-free collator: right-padded audio plus lengths, ids and texts (tests, benchmarks)."""
    lens = np.array([len(e["audio"]) for e in examples], dtype=np.int64)
    audio = np.zeros((len(examples), int(lens.max())), dtype=np.float32)  # (B, T)
    for row, e in enumerate(examples):
        audio[row, : len(e["audio"])] = e["audio"]
    batch: dict[str, Any] = {
        "audio": audio,
        "audio_lens": lens,
        "ids": [e["id"] for e in examples],
        "text": [e["text"] for e in examples],
    }
    if all("target_audio" in e for e in examples):
        tlens = np.array([len(e["target_audio"]) for e in examples], dtype=np.int64)
        target = np.zeros((len(examples), int(tlens.max())), dtype=np.float32)  # (B, T_target)
        for row, e in enumerate(examples):
            target[row, : len(e["target_audio"])] = e["target_audio"]
        batch["target_audio"], batch["target_audio_lens"] = target, tlens
    return batch


# ----------------------------------------------------------------------------------------------
# The read task: work items in, one row per batch out
# ----------------------------------------------------------------------------------------------


def _row(batch: bytes, meta: dict[str, Any]) -> pa.Table:
    """A one-row table; the batch bytes become the Arrow value buffer without another copy."""
    import pyarrow as pa

    offsets = pa.py_buffer(np.array([0, len(batch)], dtype=np.int32).tobytes())
    batch_col = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(batch)])
    return pa.table({"batch": batch_col, "meta": pa.array([pickle.dumps(meta)], type=pa.binary())})


class _TaskState:
    """Counters, bucket buffer and the held-back row of one read task."""

    def __init__(self, plan: DatasetPlan, task_index: int) -> None:
        self.plan, self.task_index = plan, task_index
        self.counters: Counter[str] = Counter()
        self.bucketer: DurationBucketer[RawCut] = DurationBucketer(plan.batching, lambda c: c.duration)
        self.buffered_items: Counter[int] = Counter()  # item -> cuts of it waiting in buckets
        self.reading: int | None = None  # item whose cuts are still being added
        self.group = plan.group_of(task_index)
        self.items = plan.task_items(task_index)
        self.next_unread = self.items.start if len(self.items) else self.group.end
        self.held: tuple[bytes, dict[str, Any]] | None = None

    def low_water(self) -> int:
        """Every item below this one has been fully emitted by this task."""
        pending = [i for i, n in self.buffered_items.items() if n > 0]
        if self.reading is not None:
            pending.append(self.reading)
        return min(pending, default=self.next_unread)

    def make_row(self, cuts: list[RawCut]) -> tuple[bytes, dict[str, Any]] | None:
        plan = self.plan
        examples = []
        for cut in cuts:
            self.buffered_items[cut.item] -= 1
            try:
                examples.append(to_example(cut, plan.inputs[cut.input_index]))
            except Exception as exc:  # any decoding failure is an unreadable cut
                msg = f"cut {cut.id!r} in {cut.shard}: cannot decode its audio ({type(exc).__name__}: {exc})"
                if not plan.skip_corrupt:
                    raise UnreadableCutError(
                        msg + "; fix or remove the cut, or set skip_corrupt: true to skip and count such cuts"
                    ) from exc
                logger.warning("%s [%s]: skipped; counted in unreadable_cuts", msg, plan.name)
                self.counters["unreadable_cuts"] += 1
        self.buffered_items += Counter()  # drop zero entries
        if not examples:
            return None
        batch = plan.collate(examples)
        durations = [e["duration"] for e in examples]
        items = [c.item for c in cuts]
        self.counters["cuts_batched"] += len(examples)
        meta = {
            "epoch": max(items) // plan.shards_per_epoch,
            "item": max(items),
            "first_item": min(items),
            "task": self.task_index,
            "concurrency": plan.concurrency,
            "group": (self.group.index, self.group.start, self.group.end, self.group.first_task, self.group.num_tasks),
            "low_water": self.low_water(),
            "shards_per_epoch": plan.shards_per_epoch,
            "num_examples": len(examples),
            "audio_seconds": float(sum(durations)),
            "padded_seconds": float(len(durations) * max(durations)),
            "ids": [e["id"] for e in examples],
        }
        return pickle.dumps(batch, protocol=5), meta

    def push(self, row: tuple[bytes, dict[str, Any]] | None) -> Iterator[pa.Table]:
        """Hold `row` back and release the previous one, carrying the counters gathered so far."""
        if row is None:
            return
        if self.held is not None:
            yield self.release()
        self.held = row

    def release(self, last: bool = False) -> pa.Table:
        batch, meta = self.held
        meta["counters"] = dict(self.counters)
        if last:  # nothing of this task's items is left behind this row
            meta["low_water"] = self.group.end
        self.counters.clear()
        self.held = None
        return _row(batch, meta)


def _accept(cut: RawCut, plan: DatasetPlan, counters: Counter[str]) -> bool:
    if not cut.duration >= plan.min_duration:  # also catches NaN (no duration: MixedCut and friends)
        if math.isnan(cut.duration):
            counters["unreadable_cuts"] += 1
            logger.warning("cut %r in %s has no duration (unsupported cut type); skipped", cut.id, cut.shard)
        else:
            counters["too_short"] += 1
        return False
    if cut.duration > plan.max_duration:
        counters["too_long"] += 1
        return False
    if not cut.text:
        counters["empty_text"] += 1
        return False
    return True


def run_read_task(plan: DatasetPlan, task_index: int) -> Iterator[pa.Table]:
    """Body of one Ray Data read task: read its work items, filter, bucket, collate, yield rows."""
    state = _TaskState(plan, task_index)
    orders: dict[int, list[tuple[int, int]]] = {}
    for item in state.items:
        if item - state.low_water() >= plan.shards_per_epoch:
            # A task spans several epochs; a bucket that rarely fills must not hold the resume position (the
            # low-water mark, here the oldest item with a cut still in a bucket) back by more than an epoch:
            # emit the partial batches.
            for batch in state.bucketer.flush():
                yield from state.push(state.make_row(batch))
        epoch, pos = divmod(item, plan.shards_per_epoch)
        if epoch not in orders:
            orders = {epoch: plan.epoch_order(epoch)}
        input_index, shard_index = orders[epoch][pos]
        shard = plan.inputs[input_index].shards[shard_index]
        state.counters["shards_read"] += 1
        state.next_unread = item + state.items.step if item + state.items.step < state.items.stop else state.group.end
        try:
            cuts = read_shard(shard, item, plan.storage_options)
        except CorruptShardError as exc:
            if not plan.skip_corrupt:
                raise CorruptShardError(
                    f"[{plan.name}] {exc}; fix or remove the shard, or set skip_corrupt: true to skip and count it"
                ) from exc
            logger.warning("[%s] corrupt shard skipped and counted in corrupt_shards: %s", plan.name, exc)
            state.counters["corrupt_shards"] += 1
            continue
        state.counters["cuts_read"] += len(cuts)
        if plan.shuffle:
            random.Random(plan.base_seed * 1_000_003 + item).shuffle(cuts)
        state.reading = item
        for i, cut in enumerate(cuts):
            if not _accept(cut, plan, state.counters):
                continue
            state.buffered_items[item] += 1
            if i == len(cuts) - 1:
                state.reading = None
            for batch in state.bucketer.add(cut):
                yield from state.push(state.make_row(batch))
        state.reading = None
    for batch in state.bucketer.flush():
        yield from state.push(state.make_row(batch))
    if state.held is not None:
        yield state.release(last=True)
    elif any(state.counters.values()):
        if plan.equal_split:
            logger.warning(
                "[%s] read task %d produced no batch; its counts %s are only logged (a marker row would cost "
                "one rank a training step)",
                plan.name,
                task_index,
                dict(state.counters),
            )
        else:
            yield _row(b"", {"counters": dict(state.counters), "task": task_index, "marker": True})


# ----------------------------------------------------------------------------------------------
# Ray Data glue
# ----------------------------------------------------------------------------------------------


def _read_task_entry(plan_ref: Any, task_index: int) -> Iterator[pa.Table]:
    import ray

    # Before anything else: a process poisoned by an earlier cancelled task would fail to unpickle the plan
    # on every retry (see torn_imports.py).
    retire_process_if_imports_are_torn(f"read task {task_index}")
    return run_read_task(ray.get(plan_ref), task_index)


class SharBatchDatasource(Datasource):
    """Groups of read tasks over a dataset's work items; see the module docstring."""

    def __init__(self, plan: DatasetPlan) -> None:
        self.plan = plan

    def get_name(self) -> str:
        return f"SharBatches[{self.plan.name}]"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        import ray

        plan_ref = ray.put(self.plan)  # one copy of the plan (collator, shard list) shared by all tasks
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        # functools.partial of a module-level function pickles by reference: a lambda would be pickled by value,
        # which costs milliseconds per task when there are hundreds of them.
        return [ReadTask(partial(_read_task_entry, plan_ref, t), meta) for t in range(self.plan.num_tasks)]


def build_dataset(plan: DatasetPlan, *, cpus_per_task: float = 1.0) -> ray.data.Dataset:
    """The Ray Data dataset of one plan: one row per batch, `plan.concurrency` read tasks at a time.

    Ray Data starts read tasks in order, so work items are read roughly in order whatever the number of
    tasks the cluster can run at once, and no task waits for another to finish.
    """
    import ray.data

    ds = ray.data.read_datasource(
        SharBatchDatasource(plan),
        override_num_blocks=max(1, plan.num_tasks),
        concurrency=plan.concurrency,
        num_cpus=cpus_per_task,
    )
    # Emit every yielded row as its own block: Ray Data otherwise coalesces small blocks up to 128 MiB, which
    # delays the first batch and makes equal splitting coarse.
    ds.context.target_max_block_size = 1
    ds.set_name(plan.name)
    return ds


def _inputs_of(dataset_cfg: DatasetConfig, data_cfg: DataConfig) -> list[InputPlan]:
    entries: list[tuple[Any, float, dict[str, Any]]] = []
    if dataset_cfg.input_cfg:
        for idx, inp in enumerate(dataset_cfg.input_cfg):
            if inp.type != "lhotse_shar":
                raise ValueError(
                    f"input_cfg[{idx}].type {inp.type!r} is not supported by the Ray Data pipeline; use "
                    "lhotse_shar (convert manifests with CutSet.to_shar)"
                )
            tags = dict(inp.tags)
            if inp.audio_locator_tag is not None:
                tags["audio_locator_tag"] = inp.audio_locator_tag
            entries.append((inp.shar_path, inp.weight, tags))
    elif dataset_cfg.shar_path is not None:
        entries.append((dataset_cfg.shar_path, 1.0, {}))
    else:
        raise ValueError("the dataset has neither input_cfg nor shar_path; set one of them")
    inputs = []
    for shar_path, weight, tags in entries:
        for shards, group_weight in discover_shards(shar_path, input_index=len(inputs)):
            s2s = any(s.has_target_audio for s in shards)
            inputs.append(
                InputPlan(
                    shards=tuple(replace(s, input_index=len(inputs)) for s in shards),
                    weight=weight * group_weight,
                    tags=tags,
                    # NeMo duplex configs set sample_rate to target_sample_rate; the user audio of an S2S pair
                    # is still read at source_sample_rate, the agent audio at target_sample_rate.
                    sample_rate=data_cfg.source_sample_rate if s2s else dataset_cfg.sample_rate,
                    target_sample_rate=data_cfg.target_sample_rate if s2s else None,
                )
            )
    return inputs


def _estimate_bins(inputs: Sequence[InputPlan], num_buckets: int, min_d: float, max_d: float) -> list[float]:
    shards = [s for inp in inputs for s in inp.shards]
    step = max(1, len(shards) // _BIN_ESTIMATE_MAX_SHARDS)
    durations = []
    for shard in shards[::step][:_BIN_ESTIMATE_MAX_SHARDS]:
        try:
            durations += [float(c["duration"]) for c in _read_manifest(shard.cuts) if "duration" in c]
        except Exception:  # a corrupt shard is reported by the read tasks, not here
            continue
    durations = [d for d in durations if min_d <= d <= max_d]
    return estimate_duration_bins(durations, num_buckets)


def plan_dataset(
    name: str,
    dataset_cfg: DatasetConfig,
    data_cfg: DataConfig,
    collate: Callable[[list[dict]], Mapping[str, Any]],
    *,
    epochs: int | None,
    start_position: DataPosition | None = None,
    equal_split: bool = True,
) -> DatasetPlan:
    """Resolve shards, sample rates, seeds, bucket bins and the work-item range of one dataset."""
    inputs = _inputs_of(dataset_cfg, data_cfg)
    bins: tuple[float, ...] = ()
    if dataset_cfg.use_bucketing:
        if dataset_cfg.bucket_duration_bins:
            bins = tuple(float(b) for b in dataset_cfg.bucket_duration_bins)
        else:
            bins = tuple(
                _estimate_bins(inputs, dataset_cfg.num_buckets, dataset_cfg.min_duration, dataset_cfg.max_duration)
            )
            logger.info("[%s] estimated bucket_duration_bins %s", name, [round(b, 3) for b in bins])
    try:
        batching = BatchingSpec(
            batch_size=dataset_cfg.batch_size,
            batch_duration=dataset_cfg.batch_duration,
            duration_bins=bins,
            buffer_size=dataset_cfg.bucket_buffer_size,
        )
    except ValueError as exc:
        raise ValueError(f"dataset {name!r}: {exc}") from exc
    shard_seed = dataset_cfg.shard_seed
    if shard_seed == "randomized":
        base_seed = dataset_cfg.seed
    elif shard_seed == "trng":
        base_seed = secrets.randbits(31)  # not reproducible by definition, also across resumes
    else:
        base_seed = int(shard_seed)
    shards_per_epoch = sum(len(i.shards) for i in inputs)
    start = 0
    if start_position is not None:
        start = start_position.item
        if start_position.shards_per_epoch not in (0, shards_per_epoch):
            # The data changed since the checkpoint: keep the epoch, restart it.
            start = start_position.epoch * shards_per_epoch
            logger.warning(
                "[%s] resume position was taken with %d shards per epoch but the data has %d; restarting epoch %d",
                name,
                start_position.shards_per_epoch,
                shards_per_epoch,
                start_position.epoch,
            )
    concurrency = max(1, dataset_cfg.num_workers)
    end = (epochs or UNBOUNDED_EPOCHS) * shards_per_epoch
    return DatasetPlan(
        name=name,
        inputs=tuple(inputs),
        batching=batching,
        collate=collate,
        shuffle=dataset_cfg.shuffle,
        base_seed=base_seed,
        min_duration=dataset_cfg.min_duration,
        max_duration=dataset_cfg.max_duration,
        skip_corrupt=dataset_cfg.skip_corrupt,
        concurrency=concurrency,
        # A group spans whole epochs (each task's bucket buffer spans its share of one), at least MIN_GROUP_ITEMS
        # items, and more for long streams so that there are at most MAX_READ_TASKS tasks.
        group_items=max(
            shards_per_epoch * math.ceil(MIN_GROUP_ITEMS / max(1, shards_per_epoch)),
            math.ceil((end - start) / max(1, MAX_READ_TASKS // concurrency)),
        ),
        start_item=start,
        end_item=end,
        equal_split=equal_split,
        storage_options=object_storage.fsspec_options(),
    )


def validation_sets(data_cfg: DataConfig) -> dict[str, DatasetConfig]:
    """Named validation sets: validation_ds.datasets, or validation_ds itself as "default"."""
    val = data_cfg.validation_ds
    if val is None:
        return {}
    if val.datasets:
        return dict(val.datasets)
    if val.shar_path is None and not val.input_cfg:
        return {}
    return {DEFAULT_VAL_NAME: val}


def build_datasets(
    data_cfg: DataConfig,
    collate_train: Callable[[list[dict]], Mapping[str, Any]],
    collate_val_by_name: Mapping[str, Callable] | Callable | None = None,
    *,
    start_position: DataPosition | None = None,
    max_epochs: int | None = None,
    cpus_per_task: float = 1.0,
    val_cpus_per_task: float = 0.0,
) -> dict[str, ray.data.Dataset]:
    """{"train": ..., "val_<name>": ...} Ray Data datasets for a TorchTrainer; pass ray_data_config(...) too.

    collate_val_by_name: one collator per validation set name (keys with or without the "val_" prefix), or
    one collator for all; None uses collate_train. max_epochs None streams until the loop stops.
    cpus_per_task: CPUs each training read task reserves (fractional values share cores with Train workers).
    val_cpus_per_task: the same for validation read tasks. 0 by default on purpose: validation runs while the
    training stream is paused, and its read tasks, blocked on a full buffer, still hold their CPUs; had
    validation to reserve CPUs too, a small cluster could deadlock (validation waits for CPUs that paused
    training tasks never give back). Paused tasks use no CPU time, so validation borrows their cores.
    """
    datasets = {
        TRAIN: build_dataset(
            plan_dataset(
                TRAIN, data_cfg.train_ds, data_cfg, collate_train, epochs=max_epochs, start_position=start_position
            ),
            cpus_per_task=cpus_per_task,
        )
    }
    for name, cfg in validation_sets(data_cfg).items():
        if collate_val_by_name is None:
            collate = collate_train
        elif callable(collate_val_by_name):
            collate = collate_val_by_name
        else:
            collate = collate_val_by_name.get(name) or collate_val_by_name.get(VAL_PREFIX + name)
            if collate is None:
                raise KeyError(
                    f"no collator for validation set {name!r}; collate_val_by_name has {sorted(collate_val_by_name)}"
                )
        key = VAL_PREFIX + name
        plan = plan_dataset(key, cfg, data_cfg, collate, epochs=1, equal_split=False)
        datasets[key] = build_dataset(plan, cpus_per_task=val_cpus_per_task)
    return datasets


class SplitDataConfig(DataConfig):
    """Split every dataset across ranks; with equal=True only for the names in `equal` (the training set)."""

    def __init__(self, equal: Sequence[str] = (TRAIN,)) -> None:
        super().__init__(datasets_to_split="all")
        self.equal = list(equal)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            splits = ds.streaming_split(world_size, equal=name in self.equal, locality_hints=hints)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output


def ray_data_config(names: Iterable[str]) -> SplitDataConfig:
    """The Ray Train DataConfig for `build_datasets` output.

    "train" is split with equal=True: every rank gets the same number of batches, so DDP never waits on a
    rank that ran out. Every other dataset is split with equal=False: each validation batch goes to exactly
    one rank and none is dropped, so ranks may get different counts: validation must not run a collective
    per batch (sum locally, all-reduce once at the end).
    """
    return SplitDataConfig([n for n in names if n == TRAIN])


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------


@dataclass
class BatchMeta:
    """What iterate_batches yields next to each batch."""

    epoch: int
    item: int  # newest work item with a cut in this batch
    first_item: int  # oldest work item with a cut in this batch
    position: DataPosition  # this rank's resume position after this batch (merge ranks: merge_positions)
    num_examples: int
    audio_seconds: float  # real audio in the batch
    padded_seconds: float  # batch size x longest cut (the padded cost)
    counters: dict[str, int] = field(default_factory=dict)  # drops/corruption since this rank's previous batch
    ids: list[str] = field(default_factory=list)


class BatchStream:
    """Iterate a dataset shard as (batch, BatchMeta); keeps running counter totals and the resume position."""

    def __init__(self, shard: Any, prefetch_batches: int = 2) -> None:
        self.shard = shard
        self.prefetch_batches = prefetch_batches
        self.totals: Counter[str] = Counter()  # every counter this rank received, markers included
        self.pending: Counter[str] = Counter()  # counts from marker rows not yet attached to a batch
        self._marks: dict[int, int] = {}  # read task -> its latest low-water mark seen here
        self._groups: dict[int, tuple[int, int, int, int]] = {}  # group -> (start, end, first task, num tasks)
        self._shards_per_epoch = 0
        self._item = 0
        self._newest_task = 0

    @property
    def position(self) -> DataPosition:
        """Resume position from this rank's view; merge ranks' positions with merge_positions."""
        return DataPosition(
            self._item,
            self._shards_per_epoch,
            tuple(sorted(self._marks.items())),
            tuple((g, *rest) for g, rest in sorted(self._groups.items())),
        )

    def _track(self, meta: dict[str, Any]) -> None:
        task, (group, *rest) = meta["task"], meta["group"]
        self._shards_per_epoch = meta["shards_per_epoch"]
        self._marks[task] = max(meta["low_water"], self._marks.get(task, meta["low_water"]))
        self._groups[group] = tuple(rest)
        # Ray Data starts read tasks in order, at most `concurrency` at a time: once task T has started, every
        # task before T - concurrency + 1 has finished, even if this rank never saw its last row.
        self._newest_task = max(self._newest_task, task)
        finished_below = self._newest_task - meta["concurrency"] + 1
        for _, end, first, num in self._groups.values():
            for t in range(first, min(first + num, finished_below)):
                self._marks[t] = end
        self._item = _resume_item(self._marks, self._groups, self._item)
        # Forget groups that are wholly behind the resume point (keeps the position small on long runs).
        for g, (_, end, first, num) in list(self._groups.items()):
            if end <= self._item:
                del self._groups[g]
                for t in range(first, first + num):
                    self._marks.pop(t, None)

    def _rows(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        if hasattr(self.shard, "iter_batches"):
            tables = self.shard.iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=self.prefetch_batches
            )
        else:  # an iterable of tables (tests)
            tables = self.shard
        for table in tables:
            batches, metas = table.column("batch"), table.column("meta")
            for i in range(table.num_rows):
                yield batches[i].as_buffer(), pickle.loads(metas[i].as_buffer())

    def __iter__(self) -> Iterator[tuple[dict[str, Any], BatchMeta]]:
        for batch_buf, meta in self._rows():
            counters = Counter(meta.get("counters", {}))
            self.totals.update(counters)
            if meta.get("marker"):
                self.pending.update(counters)
                continue
            counters.update(self.pending)
            self.pending.clear()
            self._track(meta)
            yield (
                pickle.loads(batch_buf),
                BatchMeta(
                    epoch=meta["epoch"],
                    item=meta["item"],
                    first_item=meta["first_item"],
                    position=self.position,
                    num_examples=meta["num_examples"],
                    audio_seconds=meta["audio_seconds"],
                    padded_seconds=meta["padded_seconds"],
                    counters=dict(counters),
                    ids=meta["ids"],
                ),
            )


def iterate_batches(shard: Any, *, prefetch_batches: int = 2) -> BatchStream:
    """`for batch, meta in iterate_batches(ray.train.get_dataset_shard("train"))`: see BatchStream."""
    return BatchStream(shard, prefetch_batches)
