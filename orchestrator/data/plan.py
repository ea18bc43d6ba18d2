"""The plan of one dataset: every shard, in which order, filtered and batched how; built once on the driver.

Work items: item `g` is shard `order(epoch)[g % S]` of epoch `g // S` (S shards per epoch); `order(epoch)` is
shuffled from the shard seed + epoch, so it is reproducible. The training dataset is one stream of items over
`max_epochs` epochs (UNBOUNDED_EPOCHS when None: the loop stops at max_steps). Items are cut into groups of
`num_workers` read tasks; inside a group, task k reads every num_workers-th item from the k-th, so the tasks
of a group, which Ray Data runs side by side, read the items roughly in order. A group spans whole epochs and
at least MIN_GROUP_ITEMS items, so tasks are long-lived (starting a task costs Ray Data tens of milliseconds,
a second concurrent one about a second). Validation datasets are one epoch, unshuffled: every cut is emitted
exactly once.

The plan is pickled once (`ray.put`) and read by every read task (`orchestrator.data.read_task`).
"""

from __future__ import annotations

import logging
import math
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from orchestrator.data.bucketing import BatchingSpec, estimate_duration_bins
from orchestrator.data.position import DataPosition, TaskGroup
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
# most this many tasks, each covering more shards.
MAX_READ_TASKS = 256
# A group of read tasks spans at least this many work items, in whole epochs. Every group starts new tasks and
# Ray Data adds a second concurrent task only about a second after the first, so one-epoch groups of a small
# dataset (tasks of well under a second) left the stream slower than lhotse's own reader (bench/README.md).
MIN_GROUP_ITEMS = 64


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
    group_items: int = 1  # work items per group of `concurrency` read tasks
    start_item: int = 0
    end_item: int = 1  # exclusive
    equal_split: bool = True  # split with equal=True: no marker rows
    # fsspec kwargs per protocol (custom S3 endpoint, credentials), resolved from the driver's env: read tasks
    # may run in processes or on nodes without that env (filesystems.fsspec_options).
    storage_options: Mapping[str, Mapping[str, Any]] | None = None

    @property
    def shards_per_epoch(self) -> int:
        return sum(len(i.shards) for i in self.inputs)

    @property
    def tasks_per_group(self) -> int:
        return max(1, min(self.concurrency, self.group_items))

    @property
    def num_tasks(self) -> int:
        total = max(0, self.end_item - self.start_item)
        full, rest = divmod(total, self.group_items)
        # At least one (then empty) task: Ray Data handles a task without output better than no task at all.
        return max(1, full * self.tasks_per_group + min(self.tasks_per_group, rest))

    def group_of(self, task_index: int) -> TaskGroup:
        """The group of read tasks that `task_index` belongs to."""
        g = task_index // self.tasks_per_group
        start = self.start_item + g * self.group_items
        end = max(start, min(self.end_item, start + self.group_items))
        first = g * self.tasks_per_group
        return TaskGroup(g, start, end, first, max(1, min(self.tasks_per_group, end - start)))

    def task_items(self, task_index: int) -> range:
        """The work items of read task `task_index`: every n-th item of its group, n = tasks in the group."""
        group = self.group_of(task_index)
        return range(group.start + task_index - group.first_task, group.end, group.num_tasks)

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
        base_seed = secrets.randbits(31)  # not reproducible by definition, also across resumes
    else:
        base_seed = int(shard_seed)
    shards_per_epoch = sum(len(i.shards) for i in inputs)
    start = 0
    if start_position is not None:
        start = start_position.item
        if start_position.shards_per_epoch not in (0, shards_per_epoch):
            # The data changed since the checkpoint: keep the epoch, restart it.
            start = start_position.epoch * shards_per_epoch
            logger.warning(
                "[%s] resume position was taken with %d shards per epoch but the data has %d; restarting epoch %d",
                name,
                start_position.shards_per_epoch,
                shards_per_epoch,
                start_position.epoch,
            )
    concurrency = max(1, dataset_cfg.num_workers)
    end = (epochs or UNBOUNDED_EPOCHS) * shards_per_epoch
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
        # A group spans whole epochs (each task's bucket buffer spans its share of one), at least MIN_GROUP_ITEMS
        # items, and more for long streams so that there are at most MAX_READ_TASKS tasks.
        group_items=max(
            shards_per_epoch * math.ceil(MIN_GROUP_ITEMS / max(1, shards_per_epoch)),
            math.ceil((end - start) / max(1, MAX_READ_TASKS // concurrency)),
        ),
        start_item=start,
        end_item=end,
        equal_split=equal_split,
        storage_options=filesystems.fsspec_options(),
    )


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
