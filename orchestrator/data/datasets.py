"""Ray Data datasets for training and validation, and how Ray Train splits them across workers.

One dataset = one plan (`orchestrator.data.plan`) read by groups of read tasks (`orchestrator.data.read_task`),
one row per batch. The training set is split with `streaming_split(equal=True)` so every rank gets the same
number of batches; validation sets with `equal=False` so each batch goes to exactly one rank. A training set built
with a resume board (`orchestrator.data.resume_board`) has its read tasks skip what the checkpoint restored by
the current worker group had consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.train import DataConfig

from orchestrator.data.plan import TRAIN, VAL_PREFIX, DatasetPlan, plan_dataset, validation_sets
from orchestrator.data.position import DataPosition
from orchestrator.data.read_task import run_read_task
from orchestrator.data.resume_board import create_board, restored_position
from orchestrator.data.torn_imports import retire_process_if_imports_are_torn

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from orchestrator.config.schema import DataConfig as DataSection


def _read_task_entry(plan_ref: Any, task_index: int) -> Iterator[pa.Table]:
    import ray

    # Before anything else: a process poisoned by an earlier cancelled task would fail to unpickle the plan
    # on every retry (see torn_imports.py).
    retire_process_if_imports_are_torn(f"read task {task_index}")
    plan = ray.get(plan_ref)
    return run_read_task(plan, task_index, start=restored_position(plan.resume_board))


class SharBatchDatasource(Datasource):
    """Groups of read tasks over a dataset's work items; see the module docstring."""

    def __init__(self, plan: DatasetPlan, board: Any = None) -> None:
        self.plan = plan
        self.board = board  # the resume board's handle: it keeps the actor alive as long as the dataset

    def get_name(self) -> str:
        return f"SharBatches[{self.plan.name}]"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        import ray

        plan_ref = ray.put(self.plan)  # one copy of the plan (collator, shard list) shared by all tasks
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        # functools.partial of a module-level function pickles by reference: a lambda would be pickled by value,
        # which costs milliseconds per task when there are hundreds of them.
        return [ReadTask(partial(_read_task_entry, plan_ref, t), meta) for t in range(self.plan.num_tasks)]


def build_dataset(plan: DatasetPlan, *, cpus_per_task: float = 1.0) -> ray.data.Dataset:
    """The Ray Data dataset of one plan: one row per batch, `plan.concurrency` read tasks at a time.

    Ray Data starts read tasks in order, so work items are read roughly in order whatever the number of
    tasks the cluster can run at once, and no task waits for another to finish. A plan with a `resume_board`
    name gets that board started here.
    """
    import ray.data

    board = create_board(plan.resume_board, plan) if plan.resume_board else None
    ds = ray.data.read_datasource(
        SharBatchDatasource(plan, board),
        override_num_blocks=max(1, plan.num_tasks),
        concurrency=plan.concurrency,
        num_cpus=cpus_per_task,
    )
    # Emit every yielded row as its own block: Ray Data otherwise coalesces small blocks up to 128 MiB, which
    # delays the first batch and makes equal splitting coarse.
    ds.context.target_max_block_size = 1
    ds.set_name(plan.name)
    return ds


def build_datasets(
    data_cfg: DataSection,
    collate_train: Callable[[list[dict]], Mapping[str, Any]],
    collate_val_by_name: Mapping[str, Callable] | Callable | None = None,
    *,
    start_position: DataPosition | None = None,
    max_epochs: int | None = None,
    cpus_per_task: float = 1.0,
    val_cpus_per_task: float = 0.0,
    resume_board: str | None = None,
) -> dict[str, ray.data.Dataset]:
    """{"train": ..., "val_<name>": ...} Ray Data datasets for a TorchTrainer; pass ray_data_config(...) too.

    collate_val_by_name: one collator per validation set name (keys with or without the "val_" prefix), or
    one collator for all; None uses collate_train. max_epochs None streams until the loop stops.
    start_position: what the checkpoint this run resumes had consumed of the training set.
    resume_board: a name from `resume_board.new_board_name`: the training set's read tasks then follow the
    position that the Train workers publish under it after restoring a checkpoint (worker group restarts).
    cpus_per_task: CPUs each training read task reserves (fractional values share cores with Train workers).
    val_cpus_per_task: the same for validation read tasks. 0 by default on purpose: validation runs while the
    training stream is paused, and its read tasks, blocked on a full buffer, still hold their CPUs; had
    validation to reserve CPUs too, a small cluster could deadlock (validation waits for CPUs that paused
    training tasks never give back). Paused tasks use no CPU time, so validation borrows their cores.
    """
    train = plan_dataset(
        TRAIN, data_cfg.train_ds, data_cfg, collate_train, epochs=max_epochs, start_position=start_position
    )
    datasets = {TRAIN: build_dataset(replace(train, resume_board=resume_board), cpus_per_task=cpus_per_task)}
    for name, cfg in validation_sets(data_cfg).items():
        if collate_val_by_name is None:
            collate = collate_train
        elif callable(collate_val_by_name):
            collate = collate_val_by_name
        else:
            collate = collate_val_by_name.get(name) or collate_val_by_name.get(VAL_PREFIX + name)
            if collate is None:
                raise KeyError(
                    f"no collator for validation set {name!r}; collate_val_by_name has {sorted(collate_val_by_name)}"
                )
        key = VAL_PREFIX + name
        plan = plan_dataset(key, cfg, data_cfg, collate, epochs=1, equal_split=False)
        datasets[key] = build_dataset(plan, cpus_per_task=val_cpus_per_task)
    return datasets


class SplitDataConfig(DataConfig):
    """Split every dataset across ranks; with equal=True only for the names in `equal` (the training set)."""

    def __init__(self, equal: Sequence[str] = (TRAIN,)) -> None:
        super().__init__(datasets_to_split="all")
        self.equal = list(equal)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            splits = ds.streaming_split(world_size, equal=name in self.equal, locality_hints=hints)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output


def ray_data_config(names: Iterable[str]) -> SplitDataConfig:
    """The Ray Train DataConfig for `build_datasets` output.

    "train" is split with equal=True: every rank gets the same number of batches, so DDP never waits on a
    rank that ran out. Every other dataset is split with equal=False: each validation batch goes to exactly
    one rank and none is dropped, so ranks may get different counts: validation must not run a collective
    per batch (sum locally, all-reduce once at the end).
    """
    return SplitDataConfig([n for n in names if n == TRAIN])
