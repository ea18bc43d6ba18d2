"""Bucketing inside one Ray Data task: group examples of similar length into batches.

Why inside the task: a batch is formed where the audio is decoded, so each Ray Data row is one ready batch and
`streaming_split(equal=True)` can hand every rank the same number of steps. This module is pure Python (no
Ray, no audio) so it is unit-tested on plain numbers.

Semantics follow lhotse's `DynamicBucketingSampler` and NeMo's sampling constraints, which NeMo configs are tuned
for. An example's *length* is its audio duration (seconds), or, with NeMo's `use_multimodal_sampling`, its tokens:
text tokens plus one token per `token_equivalent_duration` of audio (`Lengths`), either one number (the total, or
the context with `measure_total_length: false`) or NeMo's 2-D pair (input tokens, output tokens); 2-D duration
bins pair seconds with text tokens.
- `duration_bins` are the upper edges of the buckets, ascending; 1-D: an example goes to the first bucket whose
  edge is >= its length, or to an extra last bucket (with fixed per-bucket batch sizes, examples longer than the
  last edge fit no bucket). 2-D (NeMo's `find_smallest_bucket`): strict mode only tries the sub-buckets of the
  first edge that fits the first dimension; lenient mode takes the first bucket that fits both. An example that
  fits no bucket is dropped (and counted by the read task).
- Batch size: `batch_duration` caps a batch's summed duration (lhotse's `max_duration`); `batch_tokens` caps its
  padded token slots (examples x longest, as lhotse's TokenConstraint; `quadratic_factor` q counts a length L as
  L + L^2 / q); `bucket_batch_size` fixes the batch size of every bucket (NeMo's OOMptimizer output); `batch_size`
  caps the number of examples in every mode. An example longer than the cap forms a batch alone.
- at most `buffer_size` examples wait in buckets; beyond that the fullest bucket is emitted early.
- `flush()` empties the buckets at the end of the data: leftovers are sorted by length and packed together
  (fixed batch sizes: each bucket's leftovers form one batch), so the tail yields a few full-ish batches of similar
  lengths rather than one small batch per bucket.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
Length = float | tuple[float, float]


def estimate_duration_bins(durations: Sequence[float], num_buckets: int) -> list[float]:
    """`num_buckets - 1` boundaries that give every bucket about the same total duration (or total tokens).

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


def estimate_2d_bins(pairs: Sequence[tuple[float, float]], num_buckets: int, num_subbuckets: int) -> list[list[float]]:
    """NeMo's 2-D bins (`estimate_token_bins.py --sub-buckets`): `num_buckets` edges over the first dimension
    (equal totals), each split into about `num_subbuckets` edges over the second (equal totals); every first-edge
    group ends with a sub-bin as high as the largest second/first ratio seen allows (and at least its largest
    second value), so no example of the sample is left out."""
    if num_buckets < 1 or num_subbuckets < 1:
        raise ValueError(f"num_buckets and sub-buckets must be >= 1, got {num_buckets} and {num_subbuckets}")
    ordered = sorted((float(a), float(b)) for a, b in pairs)
    if not ordered:
        return []
    max_ratio = max(b / a for a, b in ordered if a > 0) if any(a > 0 for a, _ in ordered) else 1.0
    per_bucket = sum(a for a, _ in ordered) / num_buckets
    bins: list[list[float]] = []

    def close(group: list[tuple[float, float]], edge: float) -> None:
        seconds = sorted(b for _, b in group)
        per_sub = sum(seconds) / num_subbuckets
        acc = 0.0
        for value in seconds:
            if acc > per_sub:
                bins.append([edge, value])
                acc = 0.0
            acc += value
        bins.append([edge, float(max(math.ceil(edge * max_ratio), seconds[-1]))])

    group: list[tuple[float, float]] = []
    acc = 0.0
    for first, second in ordered:
        if acc > per_bucket and group and first > group[-1][0]:
            close(group, group[-1][0])
            group, acc = [], 0.0
        group.append((first, second))
        acc += first
    close(group, ordered[-1][0])
    # Sub-bins must rise within a first edge (NeMo's bisect over them).
    out: list[list[float]] = []
    for edge, sub in bins:
        if out and out[-1][0] == edge and sub <= out[-1][1]:
            continue
        out.append([edge, sub])
    return out


@dataclass(frozen=True)
class Lengths:
    """An example's length in tokens, NeMo's way: text tokens plus audio frames (one per token_equivalent_duration,
    each audio's placeholder token replaced by its frames), split into input (context) and output (the answer)."""

    input: int
    output: int
    text: int  # text tokens only (2-D duration bins pair them with seconds)

    @property
    def total(self) -> int:
        return self.input + self.output


@dataclass(frozen=True)
class BatchingSpec:
    """How examples are grouped into batches; see the module docstring for the semantics."""

    batch_size: int | None = None
    batch_duration: float | None = None
    duration_bins: tuple = ()  # floats, or (first, second) pairs for 2-D; empty: one bucket
    buffer_size: int = 10000
    batch_tokens: int | None = None
    bucket_batch_size: tuple[int, ...] = ()
    quadratic_factor: float | None = None
    strict_2d: bool = True

    def __post_init__(self) -> None:
        if self.batch_size is None and self.batch_duration is None and self.batch_tokens is None and not self.fixed:
            raise ValueError(
                "set batch_size or batch_duration (or both; with use_multimodal_sampling batch_tokens, or a "
                "bucket_batch_size per bucket): one of them must bound a batch"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.batch_duration is not None and self.batch_duration <= 0:
            raise ValueError(f"batch_duration must be > 0 seconds, got {self.batch_duration}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        bins = [tuple(b) if self.two_d else b for b in self.duration_bins]
        if bins != sorted(bins):
            raise ValueError(f"bucket_duration_bins must be ascending, got {list(self.duration_bins)}")
        if self.two_d and any(len(b) != 2 for b in self.duration_bins):
            raise ValueError(f"2-D bucket_duration_bins must be [first, second] pairs, got {list(self.duration_bins)}")
        if self.fixed and len(self.bucket_batch_size) != len(self.duration_bins):
            raise ValueError(
                f"bucket_batch_size has {len(self.bucket_batch_size)} sizes but bucket_duration_bins has "
                f"{len(self.duration_bins)} buckets; give one batch size per bucket"
            )
        if self.fixed and any(b < 1 for b in self.bucket_batch_size):
            raise ValueError(f"bucket_batch_size values must be >= 1, got {list(self.bucket_batch_size)}")
        if self.two_d and not (self.fixed or self.batch_tokens is not None):
            raise ValueError("2-D bucket_duration_bins need bucket_batch_size or batch_tokens to size the batches")
        if self.buffer_size < 1:
            raise ValueError(f"bucket_buffer_size must be >= 1, got {self.buffer_size}")

    @property
    def fixed(self) -> bool:
        """Every bucket has its own fixed batch size."""
        return bool(self.bucket_batch_size)

    @property
    def two_d(self) -> bool:
        return bool(self.duration_bins) and isinstance(self.duration_bins[0], (tuple, list))

    @property
    def by_tokens(self) -> bool:
        """Batches are bounded by padded token slots."""
        return self.batch_tokens is not None and not self.fixed


class _Bucket(Generic[T]):
    __slots__ = ("duration", "items", "longest")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.duration = 0.0  # summed cost (batch_duration)
        self.longest = 0.0  # the longest cost of an item (batch_tokens)


class Bucketer(Generic[T]):
    """Feed examples one at a time with `add`; it returns the batches that became ready.

    `length_of` reads an example's length: seconds, tokens, or a 2-D pair (examples are opaque to the bucketer).
    Check `bucket_of(length)` first: `add` requires an example that fits a bucket.
    """

    def __init__(self, spec: BatchingSpec, length_of: Callable[[T], Length]) -> None:
        self.spec = spec
        self.length_of = length_of
        self._bins = [tuple(b) for b in spec.duration_bins] if spec.two_d else list(spec.duration_bins)
        self._first = [b[0] for b in self._bins] if spec.two_d else []
        extra = 0 if (spec.fixed or spec.two_d) else 1  # 1-D dynamic: an overflow bucket past the last edge
        self._buckets: list[_Bucket[T]] = [_Bucket() for _ in range(max(1, len(self._bins) + extra))]
        self._buffered = 0

    def __len__(self) -> int:
        """Examples waiting in buckets."""
        return self._buffered

    def bucket_of(self, length: Length) -> int | None:
        """The bucket an example of this length goes to, or None when it fits none (see the module docstring)."""
        if not self._bins:
            return 0
        if not self.spec.two_d:
            index = bisect.bisect_left(self._bins, float(length))
            return None if self.spec.fixed and index == len(self._bins) else index
        first, second = length
        if self.spec.strict_2d:
            begin = bisect.bisect_left(self._first, first)
            if begin == len(self._bins):
                return None
            end = begin
            while end < len(self._bins) and self._first[end] == self._first[begin]:
                end += 1
            index = begin + bisect.bisect_left([b[1] for b in self._bins[begin:end]], second)
            return index if index < end else None
        return next((i for i, (a, b) in enumerate(self._bins) if first <= a and second <= b), None)

    def _cost(self, length: Length) -> float:
        """What one example weighs against the batch cap: seconds, or (padded) token slots."""
        size = float(sum(length)) if isinstance(length, tuple) else float(length)
        if self.spec.by_tokens and self.spec.quadratic_factor:
            size += size * size / self.spec.quadratic_factor
        return size

    def _fits(self, bucket: _Bucket[T], index: int, cost: float) -> bool:
        spec = self.spec
        n = len(bucket.items) + 1
        if spec.batch_size is not None and n > spec.batch_size:
            return False
        if spec.fixed:
            return n <= spec.bucket_batch_size[index]
        if spec.by_tokens:
            return n * max(bucket.longest, cost) <= spec.batch_tokens
        return spec.batch_duration is None or bucket.duration + cost <= spec.batch_duration

    def _is_full(self, bucket: _Bucket[T], index: int) -> bool:
        spec = self.spec
        n = len(bucket.items)
        if spec.batch_size is not None and n >= spec.batch_size:
            return True
        if spec.fixed:
            return n >= spec.bucket_batch_size[index]
        if spec.by_tokens:
            return (n + 1) * bucket.longest > spec.batch_tokens  # one more of the longest would not fit
        return spec.batch_duration is not None and bucket.duration >= spec.batch_duration

    def _load(self, bucket: _Bucket[T], index: int) -> float:
        if self.spec.fixed:
            return len(bucket.items) / self.spec.bucket_batch_size[index]
        if self.spec.by_tokens:
            return len(bucket.items) * bucket.longest
        return bucket.duration

    def _take(self, bucket: _Bucket[T]) -> list[T]:
        batch = bucket.items
        self._buffered -= len(batch)
        bucket.items, bucket.duration, bucket.longest = [], 0.0, 0.0
        return batch

    def add(self, item: T) -> list[list[T]]:
        """Put one example in its bucket; return the batches (zero, one or two) that are now complete."""
        length = self.length_of(item)
        index = self.bucket_of(length)
        if index is None:
            raise ValueError(f"an example of length {length} fits no bucket of {self._bins}; check bucket_of first")
        bucket = self._buckets[index]
        cost = self._cost(length)
        ready: list[list[T]] = []
        if bucket.items and not self._fits(bucket, index, cost):
            ready.append(self._take(bucket))
        bucket.items.append(item)
        bucket.duration += cost
        bucket.longest = max(bucket.longest, cost)
        self._buffered += 1
        if self._is_full(bucket, index):
            ready.append(self._take(bucket))
        elif self._buffered > self.spec.buffer_size:
            # Buffer over budget: release the bucket holding the most, even though it is not full.
            fullest = max(range(len(self._buckets)), key=lambda i: self._load(self._buckets[i], i))
            ready.append(self._take(self._buckets[fullest]))
        return ready

    def flush(self) -> list[list[T]]:
        """Emit everything still buffered, packing leftovers of neighbouring buckets together."""
        if self.spec.fixed:
            return [self._take(bucket) for bucket in self._buckets if bucket.items]
        leftovers = [item for bucket in self._buckets for item in self._take(bucket)]
        leftovers.sort(key=lambda item: self._cost(self.length_of(item)))  # narrow ranges per tail batch
        spec = self.spec
        packer: Bucketer[T] = Bucketer(
            BatchingSpec(
                spec.batch_size,
                spec.batch_duration,
                (),
                len(leftovers) + 1,
                batch_tokens=spec.batch_tokens,
                quadratic_factor=spec.quadratic_factor,
            ),
            self.length_of if not spec.two_d else (lambda item: float(sum(self.length_of(item)))),
        )
        ready = [batch for item in leftovers for batch in packer.add(item)]
        if packer._buffered:
            ready.append(packer._take(packer._buckets[0]))
        return ready


class DurationBucketer(Bucketer[T]):
    """A Bucketer over durations (or any 1-D length): `DurationBucketer(spec, duration_of)`."""


def padding_fraction(batches: Sequence[Sequence[float]]) -> float:
    """Share of padded audio: 1 - sum(durations) / sum(batch_size x longest), over batches of durations."""
    real = sum(sum(b) for b in batches)
    padded = sum(len(b) * max(b) for b in batches if b)
    return 0.0 if padded == 0 else 1.0 - real / padded
