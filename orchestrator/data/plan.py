"""The plan of one dataset: every shard, in which order, filtered and batched how; built once on the driver.

Epochs and lanes: epoch e reads every shard once, in `epoch_order(e)` (shuffled from the shard seed + e, so it is
reproducible). The epoch is split into `lanes` (the dataset's num_workers, at most one per shard): lane k reads
the shards at positions k, k + lanes, ... of the order. One lane of one epoch is a *segment*: its cuts are bucketed
from empty buckets, which are flushed at the end of the epoch, so a segment always makes the same batches (a batch
never mixes epochs) and a batch is known by (epoch, lane, number) (`orchestrator.data.position`). Work item
`epoch * shards_per_epoch + position` numbers a shard read (it seeds the shuffle of the shard's cuts).

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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from orchestrator.data.bucketing import BatchingSpec, estimate_duration_bins
from orchestrator.data.position import DataPosition, reconcile
from orchestrator.data.shar import Shard, discover_shards, read_manifest
from orchestrator.storage import filesystems

if TYPE_CHECKING:
    from orchestrator.config.schema import DataConfig, DatasetConfig

logger = logging.getLogger(__name__)

TRAIN = "train"
VAL_PREFIX = "val_"
DEFAULT_VAL_NAME = "default"  # validation_ds without named `datasets` -> "val_default"
_BIN_ESTIMATE_MAX_SHARDS = 16  # manifests read on the driver to estimate bucket bins when none are given
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
    """One group of shards (an input_cfg entry or one directory of it) and how to decode it."""

    shards: tuple[Shard, ...]
    weight: float
    tags: Mapping[str, Any]
    sample_rate: int  # source audio rate after resampling
    target_sample_rate: int | None  # target_audio rate (S2S inputs), else None


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

    @property
    def shards_per_epoch(self) -> int:
        return sum(len(i.shards) for i in self.inputs)

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
            durations += [float(c["duration"]) for c in read_manifest(shard.cuts) if "duration" in c]
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
        # Not reproducible by definition, but drawn once per run: a resumed run keeps the checkpoint's seed.
        saved = start_position.seed if start_position is not None else None
        base_seed = saved if saved is not None else secrets.randbits(31)
    else:
        base_seed = int(shard_seed)
    shards_per_epoch = sum(len(i.shards) for i in inputs)
    fingerprint = fingerprint_of(
        inputs,
        batching,
        shuffle=dataset_cfg.shuffle,
        base_seed=base_seed,
        min_duration=dataset_cfg.min_duration,
        max_duration=dataset_cfg.max_duration,
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
    )


def fingerprint_of(inputs: Sequence[InputPlan], batching: BatchingSpec, **settings: Any) -> str:
    """A short hash of everything a segment's batches depend on besides its lanes: the shards (by cuts path) and
    their mixing weights, the seeds, the filters and the batching."""
    described = {
        "inputs": [[inp.weight, [s.cuts for s in inp.shards]] for inp in inputs],
        "batching": [batching.batch_size, batching.batch_duration, list(batching.duration_bins), batching.buffer_size],
        **settings,
    }
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
