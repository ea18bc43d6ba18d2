"""The worker side of a dataset: rows back into batches, with counters and the batches this rank consumed."""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from orchestrator.data.position import ConsumedBatches, DataPosition
from orchestrator.data.read_task import RowMeta, read_row


@dataclass
class BatchMeta:
    """What iterate_batches yields next to each batch."""

    epoch: int
    num_examples: int
    audio_seconds: float  # real audio in the batch
    padded_seconds: float  # batch size x longest cut (the padded cost)
    counters: dict[str, int] = field(default_factory=dict)  # drops/corruption since this rank's previous batch
    ids: list[str] = field(default_factory=list)
    tokens: int = 0  # token-aware batching: text tokens + audio frames of the examples (0: not measured)
    padded_tokens: int = 0  # batch size x the longest example's tokens


class BatchStream:
    """Iterate a dataset shard as (batch, BatchMeta); keeps running counter totals and the consumed batches.

    A batch counts as consumed once it has been handed out, so read `position` between training steps (at a
    checkpoint): it holds the batches of `start` (what the restored checkpoint had consumed) and those this rank
    took since; merge the ranks' positions (`merge_positions`) for the whole stream's.
    """

    def __init__(self, shard: Any, prefetch_batches: int = 2, start: DataPosition | None = None) -> None:
        self.shard = shard
        self.prefetch_batches = prefetch_batches
        self.totals: Counter[str] = Counter()  # every counter this rank received, markers included
        self.pending: Counter[str] = Counter()  # counts from marker rows not yet attached to a batch
        self.consumed = ConsumedBatches(start)

    @property
    def position(self) -> DataPosition:
        """What the model has consumed of the stream, as far as this rank knows."""
        return self.consumed.position()

    def adopt(self, position: DataPosition) -> None:
        """Add what other ranks consumed (the merged position of a checkpoint), so this rank's record stays dense."""
        self.consumed.add_position(position)

    def _track(self, meta: RowMeta) -> None:
        if meta.fingerprint != self.consumed.fingerprint:
            self.consumed.set_stream(meta.shards_per_epoch, meta.fingerprint, meta.seed)
        self.consumed.add_batches(
            meta.epoch,
            meta.lane,
            meta.lanes,
            range(meta.first_batch, meta.batch + 1),
            end=meta.batch + 1 if meta.segment_end else None,
            corrupt_items=meta.corrupt_items,
            finished_epochs=meta.finished_epochs,
        )

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
                    num_examples=meta.num_examples,
                    audio_seconds=meta.audio_seconds,
                    padded_seconds=meta.padded_seconds,
                    counters=dict(counters),
                    ids=list(meta.ids),
                    tokens=meta.tokens,
                    padded_tokens=meta.padded_tokens,
                ),
            )


def iterate_batches(shard: Any, *, prefetch_batches: int = 2, start: DataPosition | None = None) -> BatchStream:
    """`for batch, meta in iterate_batches(ray.train.get_dataset_shard("train"))`: see BatchStream."""
    return BatchStream(shard, prefetch_batches, start)
