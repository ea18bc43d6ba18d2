"""The body of one Ray Data read task: work items in, one row per ready-to-train batch out.

    a lane's shards of one epoch (a segment, see `orchestrator.data.plan`) -> read each whole shard (cuts manifest
    + audio tars) -> shuffle its cuts (seeded) -> drop too short / too long / empty-text cuts (counted)
    -> duration bucketing (bucketing.py), flushed at the end of the segment
    -> decode + resample the audio of a full bucket -> collator (prompt format, tokenise) -> ONE ROW

Rows: one pyarrow row per batch with two binary cells, the pickled collated batch and a pickled `RowMeta`. One
pickled cell instead of Arrow tensor columns keeps per-row overhead to one `pickle.loads` and supports any
collator output.

Counters: drops and corruption are counted per task and attached to the task's next row, so they reach the
training workers as numbers (`BatchMeta.counters`). A task holds its latest row back until the next one is
ready, so counts that arrive after its last batch still ride on that batch. A task that produced no batch at
all emits a zero-size marker row instead, only for datasets split with `equal=False` (validation): a marker in
the equal split would cost one rank a step. For the training stream such counts are logged as a warning.

Exact resume: a segment's batches are numbered in the order the bucketer forms them, and a row names the batch
numbers it stands for (`orchestrator.data.position`). Everything that decides a batch's cuts is deterministic:
the epoch's shard order, the seeded shuffles, the filters and the bucketing read the manifests only; audio that
fails to decode drops cuts from a formed batch (a batch left without cuts makes no row, and its number rides on
the segment's next row). A task that resumes a segment re-forms its batches from the manifests alone, up to the
last consumed one, and decodes and emits only those not consumed; shards found corrupt before that batch was
formed are named in the position, since telling a corrupt audio tar apart needs the tar itself.
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

from orchestrator.data.bucketing import Bucketer
from orchestrator.data.examples import measure_lengths, to_example
from orchestrator.data.inputs import read_records, reads_audio_with_shard
from orchestrator.data.plan import DatasetPlan
from orchestrator.data.position import DataPosition, SegmentPosition
from orchestrator.data.records import SharCut, Shard, TarEntry
from orchestrator.data.shar import CorruptShardError

__all__ = ["COUNTER_NAMES", "RowMeta", "read_row", "run_read_task", "to_example"]

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
    "too_few_tokens",  # tokens < min_tokens
    "too_many_tokens",  # tokens > max_tokens
    "no_bucket",  # fits none of the buckets (2-D bins, or past the last bin with bucket_batch_size)
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
    epoch: int = 0
    lane: int = 0
    lanes: int = 1
    # The row stands for batches first_batch..batch of its segment: earlier ones that made no row (no cut
    # decoded) ride on it, and the segment's last row stands for the batches after it too.
    first_batch: int = 0
    batch: int = 0
    segment_end: bool = False  # no batch of the segment comes after `batch`
    finished_epochs: tuple[int, ...] = ()  # earlier segments of this task that ended without a row
    corrupt_items: tuple[int, ...] = ()  # work items of the segment found corrupt before `batch` was formed
    shards_per_epoch: int = 0
    fingerprint: str = ""  # the plan's (see DataPosition)
    seed: int = 0  # the plan's shard seed
    num_examples: int = 0
    audio_seconds: float = 0.0  # real audio in the batch
    padded_seconds: float = 0.0  # batch size x longest cut (the padded cost)
    ids: tuple[str, ...] = ()  # cut ids in the batch
    tokens: int = 0  # token-aware batching: text tokens + audio frames of the examples (0: not measured)
    padded_tokens: int = 0  # batch size x the longest example's tokens


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


class _Segment:
    """One lane of one epoch as a task reads it, with what a restored checkpoint had consumed of it."""

    def __init__(self, epoch: int, lane: int, lanes: int, restored: SegmentPosition | None) -> None:
        self.epoch, self.lane, self.lanes, self.restored = epoch, lane, lanes, restored
        self.replay_until = restored.last_consumed if restored is not None else -1
        self.known_corrupt = set(restored.corrupt_items) if restored is not None else set()
        self.next_batch = 0  # number of the next batch the bucketer forms
        self.unreported = 0  # first batch number that no row stands for yet
        self.made_row = False
        self.corrupt_items: list[int] = []

    @property
    def replaying(self) -> bool:
        """Still re-forming batches that were formed before the checkpoint: manifests are enough."""
        return self.next_batch <= self.replay_until


class _TaskState:
    """Counters, the held-back row, and the audio of cuts read without it, of one read task."""

    def __init__(self, plan: DatasetPlan, task_index: int) -> None:
        self.plan, self.task_index = plan, task_index
        self.counters: Counter[str] = Counter()
        self.held: HeldRow | None = None
        self.finished_epochs: list[int] = []  # segments that ended without a row, not yet on a row
        # Shards read without audio (replaying), their audio once a batch needs it, and their cuts still in buckets.
        self.shard_of: dict[int, Shard] = {}
        # item -> cut index -> (audio, arrays) of a replayed shard, read when its first batch needs them
        self.audio: dict[int, dict[int, tuple[dict[str, TarEntry], dict[str, TarEntry]]]] = {}
        self.waiting: Counter[int] = Counter()

    def read_segment(self, segment: _Segment) -> Iterator[pa.Table]:
        plan = self.plan
        order = plan.epoch_order(segment.epoch)
        rule = plan.lengths
        bucketer: Bucketer[SharCut] = Bucketer(plan.batching, lambda c: rule.key(c.duration, c.lengths))
        for item in plan.segment_items(segment.epoch, segment.lane, segment.lanes):
            replaying = segment.replaying
            # Replayed shards were counted before the checkpoint.
            counters = Counter() if replaying else self.counters
            input_index, shard_index = order[item % plan.shards_per_epoch]
            inp = plan.inputs[input_index]
            shard = inp.shards[shard_index]
            counters["shards_read"] += 1
            if replaying and item in segment.known_corrupt:
                segment.corrupt_items.append(item)
                continue
            try:
                cuts = read_records(shard, inp.options, item, plan.storage_options, with_audio=not replaying)
            except CorruptShardError as exc:
                if not plan.skip_corrupt:
                    raise CorruptShardError(
                        f"[{plan.name}] {exc}; fix or remove the shard, or set skip_corrupt: true to skip and count it"
                    ) from exc
                logger.warning("[%s] corrupt shard skipped and counted in corrupt_shards: %s", plan.name, exc)
                counters["corrupt_shards"] += 1
                segment.corrupt_items.append(item)
                continue
            counters["cuts_read"] += len(cuts)
            if plan.shuffle:
                random.Random(plan.base_seed * 1_000_003 + item).shuffle(cuts)
            cuts = [cut for cut in cuts if _accept(cut, plan, counters) and self._fits(cut, bucketer, counters)]
            if replaying and cuts and reads_audio_with_shard(shard):
                self.shard_of[item], self.waiting[item] = shard, len(cuts)
            for cut in cuts:
                for batch in bucketer.add(cut):
                    yield from self.batch_formed(segment, batch)
        for batch in bucketer.flush():
            yield from self.batch_formed(segment, batch)
        self.end_segment(segment)

    def batch_formed(self, segment: _Segment, cuts: list[SharCut]) -> Iterator[pa.Table]:
        number = segment.next_batch
        segment.next_batch += 1
        if segment.restored is not None and segment.restored.is_consumed(number):
            if segment.unreported == number:
                segment.unreported += 1
            self._release_audio(cuts)
            return
        row = self.make_row(segment, cuts, number)
        if row is not None:
            if self.held is not None:
                yield self.release()
            self.held = row

    def make_row(self, segment: _Segment, cuts: list[SharCut], number: int) -> HeldRow | None:
        plan = self.plan
        examples = []
        for cut in cuts:
            try:
                if cut.item in self.shard_of and not cut.audio:
                    cut.audio, cut.arrays = self._audio_of(cut)
                examples.append(to_example(cut, plan.inputs[cut.input_index], plan.storage_options))
            except CorruptShardError:
                raise
            except Exception as exc:  # any decoding failure is an unreadable cut
                msg = f"cut {cut.id!r} in {cut.shard}: cannot decode its audio ({type(exc).__name__}: {exc})"
                if not plan.skip_corrupt:
                    raise UnreadableCutError(
                        msg + "; fix or remove the cut, or set skip_corrupt: true to skip and count such cuts"
                    ) from exc
                logger.warning("%s [%s]: skipped; counted in unreadable_cuts", msg, plan.name)
                self.counters["unreadable_cuts"] += 1
        self._release_audio(cuts)
        if not examples:
            return None
        batch = plan.collate(examples)
        durations = [e["duration"] for e in examples]
        kept = {e["id"] for e in examples}
        tokens = [c.lengths.total for c in cuts if c.lengths is not None and c.id in kept]
        self.counters["cuts_batched"] += len(examples)
        meta = RowMeta(
            task=self.task_index,
            epoch=segment.epoch,
            lane=segment.lane,
            lanes=segment.lanes,
            first_batch=segment.unreported,
            batch=number,
            finished_epochs=tuple(self.finished_epochs),
            corrupt_items=tuple(segment.corrupt_items),
            shards_per_epoch=plan.shards_per_epoch,
            fingerprint=plan.fingerprint,
            seed=plan.base_seed,
            num_examples=len(examples),
            audio_seconds=float(sum(durations)),
            padded_seconds=float(len(durations) * max(durations)),
            ids=tuple(e["id"] for e in examples),
            tokens=int(sum(tokens)),
            padded_tokens=int(len(tokens) * max(tokens, default=0)),
        )
        self.finished_epochs = []
        segment.unreported, segment.made_row = number + 1, True
        return HeldRow(pickle.dumps(batch, protocol=5), meta)

    def _fits(self, cut: SharCut, bucketer: Bucketer[SharCut], counters: Counter[str]) -> bool:
        """Measure the tokens of an accepted cut when the plan batches or filters by tokens; drop (and count)
        one outside min/max_tokens or outside every bucket."""
        plan, rule = self.plan, self.plan.lengths
        if rule.needs_tokens:
            cut.lengths = measure_lengths(cut, plan.inputs[cut.input_index], rule, plan.collate)
            count = rule.token_count(cut.lengths)
            if rule.min_tokens is not None and count < rule.min_tokens:
                counters["too_few_tokens"] += 1
                return False
            if rule.max_tokens is not None and count > rule.max_tokens:
                counters["too_many_tokens"] += 1
                return False
        if bucketer.bucket_of(rule.key(cut.duration, cut.lengths)) is None:
            counters["no_bucket"] += 1
            return False
        return True

    def _audio_of(self, cut: SharCut) -> tuple[dict[str, TarEntry], dict[str, TarEntry]]:
        """The audio (and cached codes) of a cut read without them (a replayed shard), read once per shard when
        a batch needs it."""
        if cut.item not in self.audio:
            try:
                shard = self.shard_of[cut.item]
                options = self.plan.inputs[cut.input_index].options
                cuts = read_records(shard, options, cut.item, self.plan.storage_options)
                self.audio[cut.item] = {c.index: (c.audio, c.arrays) for c in cuts}
            except CorruptShardError as exc:
                if not self.plan.skip_corrupt:
                    raise CorruptShardError(f"[{self.plan.name}] {exc}; fix or remove the shard") from exc
                logger.warning("[%s] corrupt shard, its cuts are skipped: %s", self.plan.name, exc)
                self.counters["corrupt_shards"] += 1
                self.audio[cut.item] = {}
        return self.audio[cut.item].get(cut.index, ({}, {}))

    def _release_audio(self, cuts: list[SharCut]) -> None:
        for cut in cuts:
            if cut.item in self.shard_of:
                self.waiting[cut.item] -= 1
                if self.waiting[cut.item] <= 0:
                    del self.waiting[cut.item], self.shard_of[cut.item]
                    self.audio.pop(cut.item, None)

    def end_segment(self, segment: _Segment) -> None:
        """Say on a row that nothing of the segment comes after its last row (or that it made none)."""
        if segment.made_row:  # the held row is the segment's last: it stands for the batches after it too
            meta = replace(
                self.held.meta,
                batch=segment.next_batch - 1,
                segment_end=True,
                corrupt_items=tuple(segment.corrupt_items),
            )
            self.held = HeldRow(self.held.batch, meta)
            return
        self.finished_epochs.append(segment.epoch)
        if self.held is not None:
            meta = replace(self.held.meta, finished_epochs=self.held.meta.finished_epochs + tuple(self.finished_epochs))
            self.held, self.finished_epochs = HeldRow(self.held.batch, meta), []

    def release(self) -> pa.Table:
        row = self.held
        meta = replace(row.meta, counters=dict(self.counters))
        self.counters.clear()
        self.held = None
        return _row(row.batch, meta)


def _accept(cut: SharCut, plan: DatasetPlan, counters: Counter[str]) -> bool:
    if cut.is_conversation and not cut.audio_keys:  # text only: duration filters do not apply (as in NeMo)
        if not cut.text:
            counters["empty_text"] += 1
            return False
        return True
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


def run_read_task(plan: DatasetPlan, task_index: int, start: DataPosition | None = None) -> Iterator[pa.Table]:
    """Body of one Ray Data read task: read its segments, filter, bucket, collate, yield rows.

    start: what the checkpoint being resumed had consumed (None: `plan.resume`); segments it consumed whole are
    not read, and consumed batches of the others are formed again but not emitted.
    """
    start = plan.resume if start is None else start
    spec = plan.tasks[task_index]
    state = _TaskState(plan, task_index)
    for epoch in spec.epochs:
        restored = None
        if start is not None:
            if start.is_done(epoch, spec.lane):
                continue
            restored = start.segment(epoch, spec.lane)
            if restored is not None and restored.lanes != spec.lanes:
                logger.error(
                    "[%s] epoch %d was read with %d lanes before the checkpoint but this plan reads it with %d; "
                    "its consumed batches cannot be told apart and are read again",
                    plan.name,
                    epoch,
                    restored.lanes,
                    spec.lanes,
                )
                restored = None
        yield from state.read_segment(_Segment(epoch, spec.lane, spec.lanes, restored))
    if state.held is not None:
        yield state.release()
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
