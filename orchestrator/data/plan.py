"""The plan of one dataset: every shard, in which order, filtered and batched how; built once on the driver.

Epochs and lanes: epoch e reads every shard once, in `epoch_order(e)` (shuffled from the shard seed + e, so it is
reproducible). The epoch is split into `lanes` (the dataset's num_workers, at most one per shard): lane k reads
the shards at positions k, k + lanes, ... of the order. One lane of one epoch is a *segment*: its cuts are bucketed
from empty buckets, which are flushed at the end of the epoch, so a segment always makes the same batches (a batch
never mixes epochs) and a batch is known by (epoch, lane, number) (`orchestrator.data.position`). Work item
`epoch * shards_per_epoch + position` numbers a shard read (it seeds the shuffle of the shard's cuts).

Mixing (NeMo's `input_cfg` weights): each input gets a share of the examples in proportion to its weight, whatever
its size. An epoch reads every shard at least once, and an input whose share is larger than its size repeats its
shards (each repeat reshuffled, `reads`) so that the shares hold; inputs are interleaved evenly over the epoch.
Validation sets read every shard once, unweighted.

Read tasks: the training dataset is one stream of `max_epochs` epochs (UNBOUNDED_EPOCHS when None: the loop
stops at max_steps). Epochs are cut into groups of whole epochs; a group has one read task per lane, which reads
that lane's segments epoch after epoch, so the tasks of a group, which Ray Data runs side by side, read the
shards roughly in order. A group spans at least MIN_GROUP_ITEMS work items, so tasks are long-lived (starting a
task costs Ray Data tens of milliseconds, a second concurrent one about a second). Validation datasets are one
epoch, unshuffled: every cut is emitted exactly once.

Resuming: `plan_dataset` starts at the first epoch a checkpoint's position has not consumed whole; an epoch that was
partly consumed keeps the lanes it was read with (a changed num_workers applies from the next epoch), so its
batches keep their numbers and read tasks skip the consumed ones (`orchestrator.data.read_task`).

The plan is pickled once (`ray.put`) and read by every read task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from orchestrator.data.bucketing import BatchingSpec, Lengths, estimate_duration_bins
from orchestrator.data.examples import measure_lengths
from orchestrator.data.inputs import (
    InputEntry,
    ShardGroup,
    discover_entry,
    flatten_entries,
    read_records,
    reads_audio_with_shard,
    split_into_parts,
)
from orchestrator.data.position import DataPosition, reconcile
from orchestrator.data.records import Shard
from orchestrator.storage import filesystems

if TYPE_CHECKING:
    from orchestrator.config.schema import DataConfig, DatasetConfig

logger = logging.getLogger(__name__)

TRAIN = "train"
VAL_PREFIX = "val_"
DEFAULT_VAL_NAME = "default"  # validation_ds without named `datasets` -> "val_default"
_BIN_ESTIMATE_MAX_SHARDS = 16  # manifests read on the driver to estimate bucket bins when none are given
_MIX_SAMPLE_SHARDS = 8  # manifests per input read on the driver to size inputs mixed by weight
# Files without audio tars (text, manifests of audio files) are read in slices of about this many records, so that
# mixed inputs interleave at about the grain of a Shar shard rather than a whole file.
PART_RECORDS = 200
# max_epochs=None: the training stream is this many epochs long (the loop stops at max_steps long before).
UNBOUNDED_EPOCHS = 1000
# Ray Data puts every read task in the object store up front (about 1 ms each): a long stream is cut into at
# most about this many tasks, each covering more epochs.
MAX_READ_TASKS = 256
# A group of read tasks spans at least this many work items, in whole epochs. Every group starts new tasks and
# Ray Data adds a second concurrent task only about a second after the first, so one-epoch groups of a small
# dataset (tasks of well under a second) left the stream slower than lhotse's own reader (bench/README.md).
MIN_GROUP_ITEMS = 64


@dataclass(frozen=True)
class ReadTaskSpec:
    """One read task: lane `lane` of `lanes` in each epoch of [first_epoch, end_epoch)."""

    first_epoch: int
    end_epoch: int  # exclusive
    lane: int
    lanes: int

    @property
    def epochs(self) -> range:
        return range(self.first_epoch, self.end_epoch)


@dataclass(frozen=True)
class InputPlan:
    """One group of shards (an input_cfg entry or one directory of it) and how to read and decode it."""

    shards: tuple[Shard, ...]
    weight: float  # its share of the examples (the shares of all inputs sum to 1)
    tags: Mapping[str, Any]
    sample_rate: int  # source audio rate after resampling
    target_sample_rate: int | None  # target_audio rate (S2S inputs), else None
    options: Mapping[str, Any] = field(default_factory=dict)  # reader options (orchestrator.data.inputs)
    reads: int = 0  # shard reads per epoch: len(shards), more when its share asks for repeats (0: len(shards))

    @property
    def reads_per_epoch(self) -> int:
        return self.reads or len(self.shards)


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
    start_epoch: int = 0
    end_epoch: int = 1  # exclusive
    tasks: tuple[ReadTaskSpec, ...] = (ReadTaskSpec(0, 1, 0, 1),)
    equal_split: bool = True  # split with equal=True: no marker rows
    # fsspec kwargs per protocol (custom S3 endpoint, credentials), resolved from the driver's env: read tasks
    # may run in processes or on nodes without that env (filesystems.fsspec_options).
    storage_options: Mapping[str, Mapping[str, Any]] | None = None
    fingerprint: str = ""  # what a segment's batches depend on besides its lanes (see `fingerprint_of`)
    resume: DataPosition | None = None  # what the checkpoint this run starts from had consumed
    # The named actor through which a restarted Train worker group tells read tasks what its checkpoint had
    # consumed (`orchestrator.data.resume_board`); None: read tasks go by `resume`.
    resume_board: str | None = None
    lengths: LengthRule = field(default_factory=lambda: LengthRule())  # how an example's length is measured

    @property
    def shards_per_epoch(self) -> int:
        return sum(i.reads_per_epoch for i in self.inputs)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def segment_items(self, epoch: int, lane: int, lanes: int) -> range:
        """The work items of lane `lane` of `lanes` in epoch `epoch`, in reading order."""
        first = epoch * self.shards_per_epoch
        return range(first + lane, first + self.shards_per_epoch, lanes)

    def task_items(self, task_index: int) -> list[int]:
        """Every work item read task `task_index` reads, in order."""
        spec = self.tasks[task_index]
        return [i for e in spec.epochs for i in self.segment_items(e, spec.lane, spec.lanes)]

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """(input index, shard index) in the order epoch `epoch` reads them.

        Without shuffling, inputs are concatenated in order, each shard once. With shuffling, each input's
        shards are shuffled and the inputs interleaved at random in proportion to what is left of their reads,
        so each input is spread evenly over the epoch. An input read more than once per epoch goes through its
        shards in passes, each pass shuffled on its own and continuing across epochs.
        """
        per_input = [list(range(len(inp.shards))) for inp in self.inputs]
        if not self.shuffle:
            return [(i, j) for i, shards in enumerate(per_input) for j in shards]
        rng = random.Random(self.base_seed + epoch)
        for i, shards in enumerate(per_input):
            if self.inputs[i].reads_per_epoch == len(shards):
                rng.shuffle(shards)
            else:
                per_input[i] = self._passes(i, epoch)
        if len(per_input) == 1:
            return [(0, j) for j in per_input[0]]
        taken = [0] * len(per_input)
        order: list[tuple[int, int]] = []
        for _ in range(self.shards_per_epoch):
            weights = [float(len(shards) - taken[i]) for i, shards in enumerate(per_input)]
            (i,) = rng.choices(range(len(per_input)), weights=weights)
            order.append((i, per_input[i][taken[i]]))
            taken[i] += 1
        return order

    def _passes(self, input_index: int, epoch: int) -> list[int]:
        """The shard reads of a repeated input in epoch `epoch`: its slice of an endless series of shuffled passes."""
        n, reads = len(self.inputs[input_index].shards), self.inputs[input_index].reads_per_epoch
        first = epoch * reads
        out: list[int] = []
        while len(out) < reads:
            number, offset = divmod(first + len(out), n)
            shards = list(range(n))
            random.Random(f"{self.base_seed}-{input_index}-{number}").shuffle(shards)
            out += shards[offset : offset + reads - len(out)]
        return out


@dataclass(frozen=True)
class LengthRule:
    """How a dataset measures an example for filtering and bucketing (see orchestrator.data.bucketing)."""

    measure: str = "duration"  # duration | tokens | tokens_2d | duration_2d
    token_equivalent_duration: float | None = None
    measure_total_length: bool = True
    min_tokens: int | None = None
    max_tokens: int | None = None

    @property
    def needs_tokens(self) -> bool:
        return self.measure != "duration" or self.min_tokens is not None or self.max_tokens is not None

    def key(self, duration: float, lengths: Lengths | None) -> float | tuple[float, float]:
        """The bucketer's length of an example."""
        if self.measure == "duration":
            return duration
        if self.measure == "duration_2d":
            return (duration, float(lengths.text))
        if self.measure == "tokens_2d":
            return (float(lengths.input), float(lengths.output))
        return float(lengths.total if self.measure_total_length else lengths.input)

    def token_count(self, lengths: Lengths) -> int:
        """What min_tokens / max_tokens compare with (NeMo's TokenCountFilter)."""
        return lengths.total if self.measure_total_length else lengths.input


def _entries_of(dataset_cfg: DatasetConfig, name: str) -> list[InputEntry]:
    from orchestrator.config.schema import InputConfig

    if dataset_cfg.input_cfg:
        entries = flatten_entries(dataset_cfg.input_cfg, f"{name}.input_cfg")
    elif dataset_cfg.shar_path is not None:
        entries = flatten_entries([InputConfig(shar_path=dataset_cfg.shar_path)], f"{name}.shar_path")
    else:
        raise ValueError("the dataset has neither input_cfg nor shar_path; set one of them")
    if dataset_cfg.audio_locator_tag is not None:  # NeMo: the dataset's tag reaches every entry without one
        entries = [replace(e, tags={"audio_locator_tag": dataset_cfg.audio_locator_tag, **e.tags}) for e in entries]
    return entries


def _inputs_of(dataset_cfg: DatasetConfig, data_cfg: DataConfig, name: str = "dataset") -> list[InputPlan]:
    """Every input of a dataset (flattened groups, one per directory or manifest entry), with its share."""
    entries = _entries_of(dataset_cfg, name)
    groups: list[ShardGroup] = []
    for index, entry in enumerate(entries):
        groups += discover_entry(entry, index, len(groups))
    inputs = []
    for group in groups:
        shards = group.shards
        if not any(reads_audio_with_shard(s) for s in shards):
            per_shard = _records_per_shard(InputPlan(tuple(shards), 1.0, {}, 0, None, dict(group.options)))
            shards = split_into_parts(shards, per_shard, PART_RECORDS)
        s2s = any(s.has_target_audio for s in shards)
        inputs.append(
            InputPlan(
                shards=tuple(shards),
                weight=1.0,
                tags=dict(entries[group.entry].tags),
                # NeMo duplex configs set sample_rate to target_sample_rate; the user audio of an S2S pair
                # is still read at source_sample_rate, the agent audio at target_sample_rate.
                sample_rate=data_cfg.source_sample_rate if s2s else dataset_cfg.sample_rate,
                target_sample_rate=data_cfg.target_sample_rate if s2s else None,
                options=dict(group.options),
            )
        )
    if not dataset_cfg.shuffle or len(inputs) == 1:
        return inputs
    return _mix(inputs, groups, entries)


def _mix(inputs: list[InputPlan], groups: list[ShardGroup], entries: list[InputEntry]) -> list[InputPlan]:
    """Shares and reads per epoch of the inputs of a shuffled dataset (see the module docstring)."""
    by_entry: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        by_entry.setdefault(group.entry, []).append(i)
    sized_only = len(by_entry) == 1 and all(groups[i].weight is None for i in range(len(groups)))
    if sized_only:  # one entry of plain directories/manifests: each read once, in proportion to its size
        return inputs
    per_shard = [_records_per_shard(inp) for inp in inputs]
    sizes = [len(inp.shards) * c for inp, c in zip(inputs, per_shard, strict=True)]
    total_entry_weight = sum(entries[e].weight for e in by_entry)
    shares = [0.0] * len(inputs)
    for e, members in by_entry.items():
        explicit = any(groups[i].weight is not None for i in members)
        inner = [(groups[i].weight if groups[i].weight is not None else 1.0) if explicit else sizes[i] for i in members]
        for i, w in zip(members, inner, strict=True):
            shares[i] = entries[e].weight / total_entry_weight * (w / sum(inner) if sum(inner) > 0 else 0.0)
    epoch = max((size / share for size, share in zip(sizes, shares, strict=True) if share > 0 and size > 0), default=0)
    out = []
    for inp, share, c in zip(inputs, shares, per_shard, strict=True):
        reads = max(len(inp.shards), round(share * epoch / c)) if c > 0 else len(inp.shards)
        out.append(replace(inp, weight=share, reads=reads))
    logger.info(
        "mixing %s",
        ", ".join(
            f"input {i}: share {inp.weight:.3f}, {inp.reads} reads of {len(inp.shards)} shards"
            for i, inp in enumerate(out)
        ),
    )
    return out


def _records_per_shard(inp: InputPlan) -> float:
    """Mean examples per shard of an input, from up to _MIX_SAMPLE_SHARDS manifests (deterministic sample)."""
    shards = list(inp.shards)
    step = max(1, len(shards) // _MIX_SAMPLE_SHARDS)
    counts = []
    for shard in shards[::step][:_MIX_SAMPLE_SHARDS]:
        try:
            counts.append(len(read_records(shard, inp.options, 0, with_audio=False)))
        except Exception:  # a corrupt shard is reported by the read tasks, not here
            continue
    return sum(counts) / len(counts) if counts else 0.0


def _length_rule(dataset_cfg: DatasetConfig) -> LengthRule:
    two_d = bool(dataset_cfg.bucket_duration_bins) and isinstance(dataset_cfg.bucket_duration_bins[0], list)
    if dataset_cfg.use_multimodal_sampling:
        measure = "tokens_2d" if two_d else "tokens"
    else:
        measure = "duration_2d" if two_d else "duration"
    return LengthRule(
        measure=measure,
        token_equivalent_duration=dataset_cfg.token_equivalent_duration,
        measure_total_length=dataset_cfg.measure_total_length,
        min_tokens=dataset_cfg.min_tokens,
        max_tokens=dataset_cfg.max_tokens,
    )


def _estimate_bins(
    inputs: Sequence[InputPlan],
    num_buckets: int,
    min_d: float,
    max_d: float,
    rule: LengthRule | None = None,
    collate: Any = None,
) -> list[float]:
    """1-D bucket edges from the manifests of up to _BIN_ESTIMATE_MAX_SHARDS shards: durations, or tokens."""
    shards = [(s, inp) for inp in inputs for s in inp.shards]
    step = max(1, len(shards) // _BIN_ESTIMATE_MAX_SHARDS)
    values = []
    for shard, inp in shards[::step][:_BIN_ESTIMATE_MAX_SHARDS]:
        try:
            records = read_records(shard, inp.options, 0, with_audio=False)
        except Exception:  # a corrupt shard is reported by the read tasks, not here
            continue
        for record in records:
            if rule is None or rule.measure == "duration":
                if record.duration == record.duration and min_d <= record.duration <= max_d:
                    values.append(record.duration)
            else:
                lengths = measure_lengths(record, inp, rule, collate)
                values.append(rule.key(record.duration, lengths))
    return estimate_duration_bins(values, num_buckets)


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
    inputs = _inputs_of(dataset_cfg, data_cfg, name)
    rule = _length_rule(dataset_cfg)
    if rule.needs_tokens and not callable(getattr(collate, "token_lengths", None)):
        raise ValueError(
            f"dataset {name!r}: use_multimodal_sampling, 2-D bins and min/max_tokens measure examples in tokens, "
            f"which this model's collator ({type(collate).__name__}) cannot count; batch by duration instead"
        )
    bins: tuple = ()
    bucketing = dataset_cfg.use_bucketing or dataset_cfg.bucket_batch_size is not None
    if bucketing:  # NeMo: bucket_batch_size turns bucketing on
        if dataset_cfg.bucket_duration_bins:
            bins = tuple(
                tuple(float(x) for x in b) if isinstance(b, list) else float(b)
                for b in dataset_cfg.bucket_duration_bins
            )
        else:
            bins = tuple(
                _estimate_bins(
                    inputs, dataset_cfg.num_buckets, dataset_cfg.min_duration, dataset_cfg.max_duration, rule, collate
                )
            )
            logger.info("[%s] estimated bucket_duration_bins %s", name, [round(b, 3) for b in bins])
    try:
        batching = BatchingSpec(
            batch_size=dataset_cfg.batch_size,
            batch_duration=None if dataset_cfg.use_multimodal_sampling else dataset_cfg.batch_duration,
            duration_bins=bins,
            buffer_size=dataset_cfg.bucket_buffer_size,
            batch_tokens=dataset_cfg.batch_tokens if dataset_cfg.use_multimodal_sampling else None,
            bucket_batch_size=tuple(dataset_cfg.bucket_batch_size or ()),
            quadratic_factor=dataset_cfg.quadratic_factor,
            strict_2d=dataset_cfg.bucketing_2d_strict_mode,
        )
    except ValueError as exc:
        raise ValueError(f"dataset {name!r}: {exc}") from exc
    shard_seed = dataset_cfg.shard_seed
    if shard_seed == "randomized":
        base_seed = dataset_cfg.seed
    elif shard_seed == "trng":
        # Not reproducible by definition, but drawn once per run: a resumed run keeps the checkpoint's seed.
        saved = start_position.seed if start_position is not None else None
        base_seed = saved if saved is not None else secrets.randbits(31)
    else:
        base_seed = int(shard_seed)
    shards_per_epoch = sum(i.reads_per_epoch for i in inputs)
    fingerprint = fingerprint_of(
        inputs,
        batching,
        shuffle=dataset_cfg.shuffle,
        base_seed=base_seed,
        min_duration=dataset_cfg.min_duration,
        max_duration=dataset_cfg.max_duration,
        lengths=rule,
    )
    resume = None
    if start_position is not None:
        resume = reconcile(start_position, fingerprint, shards_per_epoch, name)
        resume = DataPosition(resume.epoch, shards_per_epoch, fingerprint, base_seed, resume.segments)
    start = resume.epoch if resume is not None else 0
    end = max(start, epochs or UNBOUNDED_EPOCHS)
    concurrency = max(1, dataset_cfg.num_workers)
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
        start_epoch=start,
        end_epoch=end,
        tasks=layout_tasks(start, end, shards_per_epoch, concurrency, resume),
        equal_split=equal_split,
        storage_options=filesystems.fsspec_options(),
        fingerprint=fingerprint,
        resume=resume,
        lengths=rule,
    )


def fingerprint_of(inputs: Sequence[InputPlan], batching: BatchingSpec, **settings: Any) -> str:
    """A short hash of everything a segment's batches depend on besides its lanes: the shards (by cuts path) and
    their mixing weights, the seeds, the filters and the batching."""
    described = {
        "inputs": [[inp.weight, [s.cuts for s in inp.shards]] for inp in inputs],
        "batching": [batching.batch_size, batching.batch_duration, list(batching.duration_bins), batching.buffer_size],
        **settings,
    }
    # Added with token-aware batching and new input types; left out when at their defaults, so the fingerprints of
    # earlier plans (and the positions checkpoints hold) stay valid.
    extra_inputs = [
        [inp.reads, s.format, sorted(inp.options.items())] for inp in inputs for s in inp.shards[:1]
        if inp.reads or s.format != "lhotse_shar"
    ]  # fmt: skip
    if extra_inputs:
        described["input_formats"] = extra_inputs
    if batching.batch_tokens is not None or batching.fixed or batching.quadratic_factor or not batching.strict_2d:
        described["token_batching"] = [
            batching.batch_tokens,
            list(batching.bucket_batch_size),
            batching.quadratic_factor,
            batching.strict_2d,
        ]
    rule = described.pop("lengths", None)
    if rule is not None and rule != LengthRule():
        described["lengths"] = [
            rule.measure,
            rule.token_equivalent_duration,
            rule.measure_total_length,
            rule.min_tokens,
            rule.max_tokens,
        ]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def layout_tasks(
    start: int, end: int, shards_per_epoch: int, concurrency: int, resume: DataPosition | None = None
) -> tuple[ReadTaskSpec, ...]:
    """Groups of whole epochs in [start, end), one read task per lane in each.

    A group spans at least MIN_GROUP_ITEMS work items, and more for long streams so that there are about
    MAX_READ_TASKS tasks at most. An epoch that `resume` saw partly consumed with another number of lanes is a
    group of its own, read with those lanes.
    """
    lanes = max(1, min(concurrency, shards_per_epoch))
    per_group = max(
        math.ceil(MIN_GROUP_ITEMS / max(1, shards_per_epoch)),
        math.ceil((end - start) / max(1, MAX_READ_TASKS // lanes)),
    )
    saved = {s.epoch: s.lanes for s in resume.segments} if resume is not None else {}
    tasks: list[ReadTaskSpec] = []
    epoch = start
    while epoch < end:
        if saved.get(epoch, lanes) != lanes:
            stop, n = epoch + 1, saved[epoch]
        else:
            stop, n = min(end, epoch + per_group), lanes
            stop = next((e for e in range(epoch + 1, stop) if saved.get(e, lanes) != lanes), stop)
        tasks += [ReadTaskSpec(epoch, stop, lane, n) for lane in range(n)]
        epoch = stop
    # At least one (then empty) task: Ray Data handles a task without output better than no task at all.
    return tuple(tasks) or (ReadTaskSpec(start, start, 0, 1),)


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
