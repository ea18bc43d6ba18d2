"""The body of one Ray Data read task: work items in, one row per ready-to-train batch out.

    work items (epoch, shard) -> read the whole shard (cuts manifest + audio tars) -> shuffle its cuts (seeded)
    -> drop too short / too long / empty-text cuts (counted) -> duration bucketing (bucketing.py)
    -> decode + resample the audio of a full bucket -> collator (prompt format, tokenise) -> ONE ROW

Rows: one pyarrow row per batch with two binary cells, the pickled collated batch and a pickled `RowMeta`. One
pickled cell instead of Arrow tensor columns keeps per-row overhead to one `pickle.loads` and supports any
collator output.

Counters: drops and corruption are counted per task and attached to the task's next row, so they reach the
training workers as numbers (`BatchMeta.counters`). A task holds its latest row back until the next one is
ready, so counts that arrive after its last batch still ride on that batch. A task that produced no batch at
all emits a zero-size marker row instead, only for datasets split with `equal=False` (validation): a marker in
the equal split would cost one rank a step. For the training stream such counts are logged as a warning.

Resume marks: every row carries its task's low-water mark (`orchestrator.data.position`). A task's bucket buffer
spans all its shards, but cuts that have waited an epoch are flushed as partial batches, so the resume position
never lags by more than an epoch.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.data.audio import decode_audio
from orchestrator.data.bucketing import DurationBucketer
from orchestrator.data.plan import DatasetPlan, InputPlan
from orchestrator.data.position import TaskGroup
from orchestrator.data.shar import CorruptShardError, SharCut, read_shard

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

# Counters carried by rows and summed by the training loop. Names are metric names (`data/<name>`).
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


class UnreadableCutError(RuntimeError):
    """A cut's audio cannot be decoded; fatal only with `skip_corrupt: false`."""


@dataclass(frozen=True)
class RowMeta:
    """What a row says about its batch (pickled next to it): provenance, size, counters and resume marks."""

    task: int  # the read task that made it
    counters: Mapping[str, int] = field(default_factory=dict)  # counted since the task's previous row
    marker: bool = False  # True: no batch, the row only carries counters (validation streams)
    group: TaskGroup | None = None  # the task's group
    concurrency: int = 1  # read tasks the dataset runs at once
    low_water: int = 0  # every work item of the task below this one has been emitted
    shards_per_epoch: int = 0
    epoch: int = 0
    item: int = 0  # newest work item with a cut in the batch
    first_item: int = 0  # oldest work item with a cut in the batch
    num_examples: int = 0
    audio_seconds: float = 0.0  # real audio in the batch
    padded_seconds: float = 0.0  # batch size x longest cut (the padded cost)
    ids: tuple[str, ...] = ()  # cut ids in the batch


# ----------------------------------------------------------------------------------------------
# Cuts to collator examples
# ----------------------------------------------------------------------------------------------


def to_example(cut: SharCut, inp: InputPlan) -> dict[str, Any]:
    """The example dict a collator receives (see speech_models.registry)."""
    if "recording" not in cut.audio:
        raise ValueError("the cut has no recording data in its shard")
    example: dict[str, Any] = {
        "id": cut.id,
        "duration": cut.duration,
        "audio": decode_audio(cut.audio["recording"].data, cut.audio["recording"].manifest, inp.sample_rate),
        "text": cut.text,
        "supervisions": cut.supervisions,
        "tags": dict(inp.tags),
        "custom": cut.custom,
    }
    if inp.target_sample_rate is not None and "target_audio" in cut.audio:
        target = cut.audio["target_audio"]
        example["target_audio"] = decode_audio(target.data, target.manifest, inp.target_sample_rate)
    return example


# ----------------------------------------------------------------------------------------------
# The read task
# ----------------------------------------------------------------------------------------------


def _row(batch: bytes, meta: RowMeta) -> pa.Table:
    """A one-row table; the batch bytes become the Arrow value buffer without another copy."""
    import pyarrow as pa

    offsets = pa.py_buffer(np.array([0, len(batch)], dtype=np.int32).tobytes())
    batch_col = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(batch)])
    return pa.table({"batch": batch_col, "meta": pa.array([pickle.dumps(meta)], type=pa.binary())})


def read_row(table: pa.Table, index: int) -> tuple[Any, RowMeta]:
    """(the batch's pickled bytes as a buffer, its RowMeta) of row `index` of a read task's table."""
    return table.column("batch")[index].as_buffer(), pickle.loads(table.column("meta")[index].as_buffer())


@dataclass
class HeldRow:
    """A row a task holds back until its next one is ready (so late counts still ride on a batch)."""

    batch: bytes  # the pickled collated batch
    meta: RowMeta


class _TaskState:
    """Counters, bucket buffer and the held-back row of one read task."""

    def __init__(self, plan: DatasetPlan, task_index: int) -> None:
        self.plan, self.task_index = plan, task_index
        self.counters: Counter[str] = Counter()
        self.bucketer: DurationBucketer[SharCut] = DurationBucketer(plan.batching, lambda c: c.duration)
        self.buffered_items: Counter[int] = Counter()  # item -> cuts of it waiting in buckets
        self.reading: int | None = None  # item whose cuts are still being added
        self.group = plan.group_of(task_index)
        self.items = plan.task_items(task_index)
        self.next_unread = self.items.start if len(self.items) else self.group.end
        self.held: HeldRow | None = None

    def low_water(self) -> int:
        """Every item below this one has been fully emitted by this task."""
        pending = [i for i, n in self.buffered_items.items() if n > 0]
        if self.reading is not None:
            pending.append(self.reading)
        return min(pending, default=self.next_unread)

    def make_row(self, cuts: list[SharCut]) -> HeldRow | None:
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
        meta = RowMeta(
            task=self.task_index,
            group=self.group,
            concurrency=plan.concurrency,
            low_water=self.low_water(),
            shards_per_epoch=plan.shards_per_epoch,
            epoch=max(items) // plan.shards_per_epoch,
            item=max(items),
            first_item=min(items),
            num_examples=len(examples),
            audio_seconds=float(sum(durations)),
            padded_seconds=float(len(durations) * max(durations)),
            ids=tuple(e["id"] for e in examples),
        )
        return HeldRow(pickle.dumps(batch, protocol=5), meta)

    def push(self, row: HeldRow | None) -> Iterator[pa.Table]:
        """Hold `row` back and release the previous one, carrying the counters gathered so far."""
        if row is None:
            return
        if self.held is not None:
            yield self.release()
        self.held = row

    def release(self, last: bool = False) -> pa.Table:
        row = self.held
        # `last`: nothing of this task's items is left behind this row.
        low_water = self.group.end if last else row.meta.low_water
        meta = replace(row.meta, counters=dict(self.counters), low_water=low_water)
        self.counters.clear()
        self.held = None
        return _row(row.batch, meta)


def _accept(cut: SharCut, plan: DatasetPlan, counters: Counter[str]) -> bool:
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
            yield _row(b"", RowMeta(task=task_index, counters=dict(state.counters), marker=True))


