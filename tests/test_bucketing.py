"""Duration bucketing on plain floats: caps, buckets, buffer, flush, bin estimation, padding."""

from __future__ import annotations

import random

import pytest

from orchestrator.data.bucketing import (
    BatchingSpec,
    Bucketer,
    DurationBucketer,
    estimate_2d_bins,
    estimate_duration_bins,
    padding_fraction,
)


def run(spec: BatchingSpec, durations: list[float]) -> list[list[float]]:
    bucketer = DurationBucketer(spec, float)
    batches = [batch for d in durations for batch in bucketer.add(d)]
    return batches + bucketer.flush()


def durations(n: int = 2000, low: float = 0.5, high: float = 20.0, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(low, high), 3) for _ in range(n)]


def test_every_example_once_and_caps_hold():
    ds = durations()
    spec = BatchingSpec(batch_duration=60.0, batch_size=8, duration_bins=(2.0, 5.0, 10.0, 15.0))
    batches = run(spec, ds)
    assert sorted(x for b in batches for x in b) == sorted(ds)
    for b in batches:
        assert len(b) <= 8
        assert sum(b) <= 60.0 or len(b) == 1


def test_batches_stay_inside_their_bucket_until_the_flush():
    ds = durations()
    bins = (2.0, 5.0, 10.0, 15.0)
    bucketer = DurationBucketer(BatchingSpec(batch_duration=60.0, duration_bins=bins), float)
    edges = (0.0, *bins, float("inf"))
    for d in ds:
        for batch in bucketer.add(d):
            b = next(i for i in range(len(edges) - 1) if edges[i] < max(batch) <= edges[i + 1])
            assert all(edges[b] < x <= edges[b + 1] for x in batch)


def test_long_example_forms_its_own_batch():
    batches = run(BatchingSpec(batch_duration=10.0), [3.0, 30.0, 3.0, 3.0])
    assert [30.0] in batches
    assert sorted(x for b in batches for x in b) == [3.0, 3.0, 3.0, 30.0]


def test_fixed_batch_size_without_buckets():
    batches = run(BatchingSpec(batch_size=4), [float(i) for i in range(1, 11)])
    assert [len(b) for b in batches] == [4, 4, 2]
    assert batches[0] == [1.0, 2.0, 3.0, 4.0]  # arrival order kept


def test_buffer_is_bounded():
    spec = BatchingSpec(batch_duration=1000.0, duration_bins=(5.0, 10.0), buffer_size=50)
    bucketer = DurationBucketer(spec, float)
    for d in durations(500):
        bucketer.add(d)
        assert len(bucketer) <= 50


def test_flush_packs_leftovers_of_neighbouring_buckets():
    spec = BatchingSpec(batch_size=4, duration_bins=(1.5, 2.5, 3.5))
    bucketer = DurationBucketer(spec, float)
    assert [b for d in (1.0, 2.0, 3.0, 4.0) for b in bucketer.add(d)] == []  # one per bucket, none full
    assert bucketer.flush() == [[1.0, 2.0, 3.0, 4.0]]
    assert len(bucketer) == 0


def test_estimated_bins_split_total_duration_evenly():
    ds = durations(5000)
    bins = estimate_duration_bins(ds, num_buckets=5)
    assert len(bins) == 4 and bins == sorted(bins)
    edges = (0.0, *bins, float("inf"))
    shares = [sum(d for d in ds if edges[i] < d <= edges[i + 1]) / sum(ds) for i in range(5)]
    assert all(0.15 < s < 0.25 for s in shares), shares
    assert estimate_duration_bins(ds, 1) == []
    assert estimate_duration_bins([3.0] * 100, 4) == []  # no distinct values to split on


def test_bucketing_cuts_padding_below_ten_percent():
    ds = durations(3000, low=1.0, high=20.0)
    bins = tuple(estimate_duration_bins(ds, 30))
    bucketed = run(BatchingSpec(batch_duration=100.0, duration_bins=bins), ds)
    mean_size = round(len(ds) / len(bucketed))
    fixed = run(BatchingSpec(batch_size=mean_size), ds)
    assert padding_fraction(bucketed) <= 0.10
    assert padding_fraction(fixed) > 3 * padding_fraction(bucketed)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "batch_size or batch_duration"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_duration": -1.0}, "batch_duration must be > 0"),
        ({"batch_size": 2, "duration_bins": (3.0, 1.0)}, "ascending"),
        ({"batch_size": 2, "buffer_size": 0}, "bucket_buffer_size"),
    ],
)
def test_spec_errors_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchingSpec(**kwargs)


# ---------------------------------------------------------------------------------------------- tokens, 2-D


def run_with(spec: BatchingSpec, lengths: list) -> list[list]:
    bucketer = Bucketer(spec, lambda x: x)
    batches = [batch for x in lengths if bucketer.bucket_of(x) is not None for batch in bucketer.add(x)]
    return batches + bucketer.flush()


def test_batch_tokens_bound_padded_slots_like_lhotses_token_constraint():
    tokens = [float(t) for t in random.Random(0).choices(range(5, 400), k=3000)]
    batches = run_with(BatchingSpec(batch_tokens=1000, duration_bins=(50.0, 100.0, 200.0)), tokens)
    assert sorted(x for b in batches for x in b) == sorted(tokens)
    assert all(len(b) * max(b) <= 1000 for b in batches)  # examples x longest, not the sum
    quadratic = run_with(BatchingSpec(batch_tokens=1000, quadratic_factor=100.0), tokens)
    assert all(len(b) * max(t + t * t / 100.0 for t in b) <= 1000 or len(b) == 1 for b in quadratic)


def test_2d_buckets_follow_nemos_strict_and_lenient_selection():
    bins = ((10.0, 5.0), (10.0, 10.0), (20.0, 12.0), (20.0, 18.0))
    strict = Bucketer(BatchingSpec(bucket_batch_size=(1, 1, 1, 1), duration_bins=bins), lambda x: x)
    lenient = Bucketer(BatchingSpec(bucket_batch_size=(1, 1, 1, 1), duration_bins=bins, strict_2d=False), lambda x: x)
    assert (
        strict.bucket_of((8.0, 4.0)) == 0 and strict.bucket_of((8.0, 7.0)) == 1 and strict.bucket_of((15.0, 13.0)) == 3
    )
    assert strict.bucket_of((8.0, 11.0)) is None and lenient.bucket_of((8.0, 11.0)) == 2  # NeMo's own example
    assert strict.bucket_of((25.0, 1.0)) is None and lenient.bucket_of((25.0, 1.0)) is None


def test_fixed_batch_sizes_per_bucket_and_nothing_past_the_last_bin():
    spec = BatchingSpec(bucket_batch_size=(4, 2), duration_bins=(5.0, 10.0))
    bucketer = Bucketer(spec, float)
    assert bucketer.bucket_of(12.0) is None  # NeMo's FixedBucketBatchSizeConstraint2D: no bucket
    batches = run_with(spec, [1.0, 7.0, 2.0, 3.0, 8.0, 4.0, 9.0, 12.0])
    assert batches == [[7.0, 8.0], [1.0, 2.0, 3.0, 4.0], [9.0]]


def test_estimated_2d_bins_cover_every_example():
    rng = random.Random(0)
    pairs = [(float(a), float(rng.randint(1, max(1, a // 4)))) for a in (rng.randint(10, 500) for _ in range(3000))]
    bins = estimate_2d_bins(pairs, num_buckets=4, num_subbuckets=3)
    assert bins == sorted(bins) and len({b[0] for b in bins}) == 4
    bucketer = Bucketer(
        BatchingSpec(bucket_batch_size=tuple([1] * len(bins)), duration_bins=tuple(map(tuple, bins))), lambda x: x
    )
    assert all(bucketer.bucket_of(p) is not None for p in pairs)
