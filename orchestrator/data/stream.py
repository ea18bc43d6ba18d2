"""The worker side of a dataset: rows back into batches, with counters and this rank's resume position."""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from orchestrator.data.position import DataPosition, TaskGroup, resume_item
from orchestrator.data.read_task import RowMeta, read_row


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
        self._groups: dict[int, TaskGroup] = {}  # group index -> group, for groups not wholly consumed
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
            tuple(g for _, g in sorted(self._groups.items())),
        )

    def _track(self, meta: RowMeta) -> None:
        task, group = meta.task, meta.group
        self._shards_per_epoch = meta.shards_per_epoch
        self._marks[task] = max(meta.low_water, self._marks.get(task, meta.low_water))
        self._groups[group.index] = group
        # Ray Data starts read tasks in order, at most `concurrency` at a time: once task T has started, every
        # task before T - concurrency + 1 has finished, even if this rank never saw its last row.
        self._newest_task = max(self._newest_task, task)
        finished_below = self._newest_task - meta.concurrency + 1
        for g in self._groups.values():
            for t in range(g.first_task, min(g.first_task + g.num_tasks, finished_below)):
                self._marks[t] = g.end
        self._item = resume_item(self._marks, list(self._groups.values()), self._item)
        # Forget groups that are wholly behind the resume point (keeps the position small on long runs).
        for index, g in list(self._groups.items()):
            if g.end <= self._item:
                del self._groups[index]
                for t in g.tasks:
                    self._marks.pop(t, None)

    def _rows(self) -> Iterator[tuple[Any, RowMeta]]:
        if hasattr(self.shard, "iter_batches"):
            tables = self.shard.iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=self.prefetch_batches
            )
        else:  # an iterable of tables (tests)
            tables = self.shard
        for table in tables:
            for i in range(table.num_rows):
                yield read_row(table, i)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], BatchMeta]]:
        for batch_buf, meta in self._rows():
            counters = Counter(meta.counters)
            self.totals.update(counters)
            if meta.marker:
                self.pending.update(counters)
                continue
            counters.update(self.pending)
            self.pending.clear()
            self._track(meta)
            yield (
                pickle.loads(batch_buf),
                BatchMeta(
                    epoch=meta.epoch,
                    item=meta.item,
                    first_item=meta.first_item,
                    position=self.position,
                    num_examples=meta.num_examples,
                    audio_seconds=meta.audio_seconds,
                    padded_seconds=meta.padded_seconds,
                    counters=dict(counters),
                    ids=list(meta.ids),
                ),
            )


def iterate_batches(shard: Any, *, prefetch_batches: int = 2) -> BatchStream:
    """`for batch, meta in iterate_batches(ray.train.get_dataset_shard("train"))`: see BatchStream."""
    return BatchStream(shard, prefetch_batches)
