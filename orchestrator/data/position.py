"""Where a training stream is, for resuming it exactly: which batches of which epoch the model has consumed.

A plan (`orchestrator.data.plan`) splits every epoch into `lanes`: lane k reads the epoch's shards k, k + lanes,
... (in the epoch's seeded order) and buckets their cuts from empty buckets, flushed at the end of the epoch.
Read tasks are deterministic, so the batches of one lane of one epoch (a *segment*) come out the same, in the
same order, on every run of the same plan; they are numbered 0, 1, 2, ... and a batch is known everywhere by
(epoch, lane, number), whichever read task made it and whichever rank trained on it.

Every rank records the batches it trained on (`ConsumedBatches`, fed by `orchestrator.data.stream`). At a
checkpoint the ranks merge their records (`merge_positions`): the union is exactly what the checkpointed model has
seen; batches still in prefetch buffers or in flight are not in it. A resumed read task regenerates its segment
(bucketing needs only the shard manifests) and emits only the batches not in that set
(`orchestrator.data.read_task`). Epochs consumed whole are forgotten and consumed batch numbers are kept as
ranges, so the position stays small on long runs.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = 2  # 1: the shard-granular position of earlier versions (read as "restart its epoch")


@dataclass(frozen=True)
class SegmentPosition:
    """What was consumed of one segment (one lane of one epoch)."""

    epoch: int
    lane: int
    lanes: int  # lanes of the epoch: a resumed run reads the epoch with as many, whatever its num_workers
    consumed: tuple[tuple[int, int], ...] = ()  # batch numbers, as sorted disjoint [start, stop) ranges
    end: int | None = None  # the segment has batches 0 .. end - 1; known once its last row was consumed
    finished: bool = False  # a read task said nothing of it is left to consume (it made no row at all)
    corrupt_items: tuple[int, ...] = ()  # work items found corrupt before its last consumed batch was formed

    @property
    def complete(self) -> bool:
        return self.finished or (self.end is not None and (self.end == 0 or self.consumed == ((0, self.end),)))

    @property
    def last_consumed(self) -> int:
        """The highest consumed batch number (-1: none): a resumed task regenerates up to it from manifests."""
        return self.consumed[-1][1] - 1 if self.consumed else -1

    def is_consumed(self, number: int) -> bool:
        i = bisect.bisect_right(self.consumed, (number, float("inf"))) - 1
        return i >= 0 and self.consumed[i][0] <= number < self.consumed[i][1]


@dataclass(frozen=True)
class DataPosition:
    """Where a training stream is: stored in checkpoints, published to restarted read tasks.

    `fingerprint` names everything a segment's batches depend on besides its lanes (shards, seeds, filters,
    batching; `DatasetPlan.fingerprint`): a run whose plan has another fingerprint cannot skip batches by number
    and restarts the open epochs instead (`reconcile`).
    """

    epoch: int = 0  # every epoch before this one was consumed whole
    shards_per_epoch: int = 0
    fingerprint: str = ""
    seed: int | None = None  # the plan's shard seed (a `trng` seed is drawn once and kept across resumes)
    segments: tuple[SegmentPosition, ...] = ()  # segments of epochs >= epoch with anything known

    def segment(self, epoch: int, lane: int) -> SegmentPosition | None:
        return next((s for s in self.segments if s.epoch == epoch and s.lane == lane), None)

    def lanes_of(self, epoch: int) -> int | None:
        """The lanes an open epoch was read with (None: nothing of it was consumed)."""
        return next((s.lanes for s in self.segments if s.epoch == epoch), None)

    def is_done(self, epoch: int, lane: int) -> bool:
        """Nothing of this segment is left to consume."""
        if epoch < self.epoch:
            return True
        segment = self.segment(epoch, lane)
        return segment is not None and segment.complete

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for checkpoints."""
        return {
            "format": FORMAT,
            "epoch": self.epoch,
            "shards_per_epoch": self.shards_per_epoch,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "segments": [
                {
                    "epoch": s.epoch,
                    "lane": s.lane,
                    "lanes": s.lanes,
                    "consumed": [list(r) for r in s.consumed],
                    "end": s.end,
                    "finished": s.finished,
                    "corrupt_items": list(s.corrupt_items),
                }
                for s in self.segments
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataPosition:
        if d.get("format") != FORMAT:  # a shard-granular position: its first unconsumed work item
            spe = int(d.get("shards_per_epoch", 0))
            return cls(epoch=int(d.get("item", 0)) // spe if spe else 0, shards_per_epoch=spe)
        return cls(
            epoch=int(d["epoch"]),
            shards_per_epoch=int(d["shards_per_epoch"]),
            fingerprint=str(d["fingerprint"]),
            seed=None if d.get("seed") is None else int(d["seed"]),
            segments=tuple(
                SegmentPosition(
                    epoch=int(s["epoch"]),
                    lane=int(s["lane"]),
                    lanes=int(s["lanes"]),
                    consumed=tuple((int(a), int(b)) for a, b in s["consumed"]),
                    end=None if s.get("end") is None else int(s["end"]),
                    finished=bool(s.get("finished", False)),
                    corrupt_items=tuple(int(i) for i in s.get("corrupt_items", ())),
                )
                for s in d["segments"]
            ),
        )


def add_range(ranges: list[list[int]], start: int, stop: int) -> None:
    """Add [start, stop) to sorted disjoint ranges, merging the ranges it overlaps or touches (in place)."""
    i = bisect.bisect_left(ranges, [start, start])
    if i > 0 and ranges[i - 1][1] >= start:
        i -= 1
    j = i
    while j < len(ranges) and ranges[j][0] <= stop:
        start, stop = min(start, ranges[j][0]), max(stop, ranges[j][1])
        j += 1
    ranges[i:j] = [[start, stop]]


@dataclass
class _Segment:
    lanes: int
    consumed: list[list[int]] = field(default_factory=list)
    end: int | None = None
    finished: bool = False
    corrupt_items: set[int] = field(default_factory=set)

    def complete(self) -> bool:
        return self.finished or (self.end is not None and (self.end == 0 or self.consumed == [[0, self.end]]))


class ConsumedBatches:
    """A DataPosition being built: consumed batches (one rank's rows) and whole positions (other ranks', a
    restored checkpoint's) go in, their union comes out (`position()`)."""

    def __init__(self, start: DataPosition | None = None) -> None:
        self.epoch = 0
        self.shards_per_epoch = 0
        self.fingerprint = ""
        self.seed: int | None = None
        self.segments: dict[tuple[int, int], _Segment] = {}
        if start is not None:
            self.add_position(start)

    def _segment(self, epoch: int, lane: int, lanes: int) -> _Segment | None:
        if epoch < self.epoch:
            return None  # already known to be consumed whole
        return self.segments.setdefault((epoch, lane), _Segment(lanes))

    def add_batches(
        self,
        epoch: int,
        lane: int,
        lanes: int,
        numbers: range,
        *,
        end: int | None = None,
        corrupt_items: Iterable[int] = (),
        finished_epochs: Iterable[int] = (),
    ) -> None:
        """Batches `numbers` of segment (epoch, lane) were consumed; `end`: the segment has no batch from there on;
        `finished_epochs`: earlier segments of the same lane with nothing left to consume."""
        for finished in finished_epochs:
            segment = self._segment(finished, lane, lanes)
            if segment is not None:
                segment.finished = True
        segment = self._segment(epoch, lane, lanes)
        if segment is not None:
            if len(numbers):
                add_range(segment.consumed, numbers.start, numbers.stop)
            if end is not None:
                segment.end = end
            segment.corrupt_items.update(corrupt_items)
        if finished_epochs or (segment is not None and segment.complete()):
            self._forget_finished_epochs()

    def add_position(self, position: DataPosition) -> None:
        if not self.fingerprint:
            self.shards_per_epoch, self.fingerprint, self.seed = (
                position.shards_per_epoch,
                position.fingerprint,
                position.seed,
            )
        self.epoch = max(self.epoch, position.epoch)
        for s in position.segments:
            segment = self._segment(s.epoch, s.lane, s.lanes)
            if segment is None:
                continue
            for start, stop in s.consumed:
                add_range(segment.consumed, start, stop)
            if s.end is not None:
                segment.end = s.end
            segment.finished |= s.finished
            segment.corrupt_items.update(s.corrupt_items)
        self._forget_finished_epochs()

    def set_stream(self, shards_per_epoch: int, fingerprint: str, seed: int | None) -> None:
        """What the stream's rows say about their plan (a fresh run's position learns it from its first row)."""
        self.shards_per_epoch, self.fingerprint, self.seed = shards_per_epoch, fingerprint, seed

    def _forget_finished_epochs(self) -> None:
        for key in [k for k in self.segments if k[0] < self.epoch]:
            del self.segments[key]
        while True:
            lanes = [s for (e, _), s in self.segments.items() if e == self.epoch]
            if not lanes:
                return
            expected = lanes[0].lanes
            done = {lane for (e, lane), s in self.segments.items() if e == self.epoch and s.complete()}
            if done != set(range(expected)):
                return
            for lane in range(expected):
                del self.segments[(self.epoch, lane)]
            self.epoch += 1

    def position(self) -> DataPosition:
        return DataPosition(
            epoch=self.epoch,
            shards_per_epoch=self.shards_per_epoch,
            fingerprint=self.fingerprint,
            seed=self.seed,
            segments=tuple(
                SegmentPosition(
                    epoch=e,
                    lane=lane,
                    lanes=s.lanes,
                    consumed=tuple((a, b) for a, b in s.consumed),
                    end=s.end,
                    finished=s.finished,
                    corrupt_items=tuple(sorted(s.corrupt_items)),
                )
                for (e, lane), s in sorted(self.segments.items())
            ),
        )


def merge_positions(positions: Sequence[DataPosition | None]) -> DataPosition:
    """The union of every rank's consumed batches (gather them with `torch.distributed.all_gather_object`)."""
    merged = ConsumedBatches()
    for position in positions:
        if position is not None:
            merged.add_position(position)
    return merged.position()


def reconcile(position: DataPosition, fingerprint: str, shards_per_epoch: int, name: str = "train") -> DataPosition:
    """`position` as a plan with `fingerprint` can use it: batch numbers only mean the same batches under the
    same fingerprint. Otherwise (the shards, seeds, filters or batching changed, or the position is from an
    older version) keep the count of whole epochs consumed and restart the open ones."""
    if position.fingerprint == fingerprint:
        return position
    open_epochs = sorted({s.epoch for s in position.segments}) or [position.epoch]
    logger.warning(
        "[%s] the data or its batching changed since the checkpoint (%s); epochs %s restart from their first "
        "batch, so their batches consumed before the checkpoint are trained on again",
        name,
        f"{position.shards_per_epoch} -> {shards_per_epoch} shards per epoch"
        if position.shards_per_epoch != shards_per_epoch
        else "shards, seeds, filters or batch settings differ"
        if position.fingerprint
        else "the checkpoint's position is from an older version",
        open_epochs,
    )
    return DataPosition(epoch=position.epoch, shards_per_epoch=shards_per_epoch, fingerprint=fingerprint)
