"""Duration bucketing inside one Ray Data task: group examples of similar length into batches.

Why inside the task: a batch is formed where the audio is decoded, so each Ray Data row is one ready batch and
`streaming_split(equal=True)` can hand every rank the same number of steps. This module is pure Python (no
Ray, no audio) so it is unit-tested on plain floats.

Semantics follow lhotse's `DynamicBucketingSampler`, which NeMo configs are tuned for:
- `duration_bins` are the boundaries between buckets (`num_buckets - 1` values, ascending); an example of
  duration d goes to the first bucket whose upper boundary is >= d, or to the last bucket.
- `batch_duration` caps the summed duration of a batch (lhotse's `max_duration`); `batch_size` caps its
  number of examples; either or both may be set. An example longer than `batch_duration` forms a batch alone.
- at most `buffer_size` examples wait in buckets; beyond that the fullest bucket is emitted early.
- `flush()` empties the buckets at the end of the data: leftovers are sorted by duration and packed together,
  so the tail yields a few full-ish batches of similar lengths rather than one small batch per bucket.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def estimate_duration_bins(durations: Sequence[float], num_buckets: int) -> list[float]:
    """`num_buckets - 1` boundaries that give every bucket about the same total duration.

    Same idea as lhotse's `estimate_duration_buckets`: equal total duration (not equal counts) keeps each
    bucket's share of the training steps proportional to its share of the audio.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    ordered = sorted(float(d) for d in durations)
    if num_buckets == 1 or len(ordered) < 2:
        return []
    total = sum(ordered)
    per_bucket = total / num_buckets
    bins: list[float] = []
    acc = 0.0
    for i, d in enumerate(ordered[:-1]):
        acc += d
        if acc >= per_bucket * (len(bins) + 1) and d < ordered[i + 1] and len(bins) < num_buckets - 1:
            bins.append(d)
    return bins


@dataclass(frozen=True)
class BatchingSpec:
    """How examples are grouped into batches; see the module docstring for the semantics."""

    batch_size: int | None = None
    batch_duration: float | None = None
    duration_bins: tuple[float, ...] = ()  # empty: one bucket (plain dynamic or fixed-size batching)
    buffer_size: int = 10000

    def __post_init__(self) -> None:
        if self.batch_size is None and self.batch_duration is None:
            raise ValueError("set batch_size or batch_duration (or both): one of them must bound a batch")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.batch_duration is not None and self.batch_duration <= 0:
            raise ValueError(f"batch_duration must be > 0 seconds, got {self.batch_duration}")
        if list(self.duration_bins) != sorted(self.duration_bins):
            raise ValueError(f"bucket_duration_bins must be ascending, got {list(self.duration_bins)}")
        if self.buffer_size < 1:
            raise ValueError(f"bucket_buffer_size must be >= 1, got {self.buffer_size}")


class _Bucket(Generic[T]):
    __slots__ = ("duration", "items")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.duration = 0.0


class DurationBucketer(Generic[T]):
    """Feed examples one at a time with `add`; it returns the batches that became ready.

    `duration_of` reads an example's duration in seconds (examples are opaque to the bucketer).
    """

    def __init__(self, spec: BatchingSpec, duration_of: Callable[[T], float]) -> None:
        self.spec = spec
        self.duration_of = duration_of
        self._bins = list(spec.duration_bins)
        self._buckets: list[_Bucket[T]] = [_Bucket() for _ in range(len(self._bins) + 1)]
        self._buffered = 0

    def __len__(self) -> int:
        """Examples waiting in buckets."""
        return self._buffered

    def _fits(self, bucket: _Bucket[T], duration: float) -> bool:
        spec = self.spec
        if spec.batch_size is not None and len(bucket.items) + 1 > spec.batch_size:
            return False
        return spec.batch_duration is None or bucket.duration + duration <= spec.batch_duration

    def _is_full(self, bucket: _Bucket[T]) -> bool:
        spec = self.spec
        if spec.batch_size is not None and len(bucket.items) >= spec.batch_size:
            return True
        return spec.batch_duration is not None and bucket.duration >= spec.batch_duration

    def _take(self, bucket: _Bucket[T]) -> list[T]:
        batch = bucket.items
        self._buffered -= len(batch)
        bucket.items, bucket.duration = [], 0.0
        return batch

    def add(self, item: T) -> list[list[T]]:
        """Put one example in its bucket; return the batches (zero, one or two) that are now complete."""
        duration = float(self.duration_of(item))
        bucket = self._buckets[bisect.bisect_left(self._bins, duration)]
        ready: list[list[T]] = []
        if bucket.items and not self._fits(bucket, duration):
            ready.append(self._take(bucket))
        bucket.items.append(item)
        bucket.duration += duration
        self._buffered += 1
        if self._is_full(bucket):
            ready.append(self._take(bucket))
        elif self._buffered > self.spec.buffer_size:
            # Buffer over budget: release the bucket holding the most audio, even though it is not full.
            fullest = max(self._buckets, key=lambda b: b.duration)
            ready.append(self._take(fullest))
        return ready

    def flush(self) -> list[list[T]]:
        """Emit everything still buffered, packing leftovers of neighbouring buckets together."""
        leftovers = [item for bucket in self._buckets for item in self._take(bucket)]
        leftovers.sort(key=self.duration_of)  # packing in duration order keeps each tail batch's range narrow
        packer: DurationBucketer[T] = DurationBucketer(
            BatchingSpec(self.spec.batch_size, self.spec.batch_duration, (), len(leftovers) + 1), self.duration_of
        )
        ready = [batch for item in leftovers for batch in packer.add(item)]
        if packer._buffered:
            ready.append(packer._take(packer._buckets[0]))
        return ready


def padding_fraction(batches: Sequence[Sequence[float]]) -> float:
    """Share of padded audio: 1 - sum(durations) / sum(batch_size x longest), over batches of durations."""
    real = sum(sum(b) for b in batches)
    padded = sum(len(b) * max(b) for b in batches if b)
    return 0.0 if padded == 0 else 1.0 - real / padded
