"""Where a dataset stream is, for resuming it: a work item, plus what each read task had emitted.

Work items are (epoch, shard) pairs numbered in read order (see `orchestrator.data.plan`). Every row carries its
read task's low-water mark (every item of the task below it has been emitted); the training loop keeps the marks it
sees and derives the oldest item not yet consumed; `merge_positions` combines ranks. A resumed run starts at that
item: it re-reads the few shards in flight at checkpoint time, and never re-reads the epoch from its start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskGroup:
    """Read tasks that share a run of work items, item i going to task first_task + (i - start) % num_tasks.

    Ray Data starts tasks in order and the tasks of a group run side by side, so items are read roughly in
    order whatever the number of tasks the cluster can run at once.
    """

    index: int
    start: int
    end: int  # exclusive
    first_task: int
    num_tasks: int

    @property
    def tasks(self) -> range:
        return range(self.first_task, self.first_task + self.num_tasks)


@dataclass(frozen=True)
class DataPosition:
    """Where a dataset stream is, at shard (work item) granularity; stored in checkpoints.

    `item` is the first work item a resumed run reads (epoch = item // shards_per_epoch). `marks` (read task
    -> low-water mark) and `groups` (the task groups those tasks belong to) let positions from several ranks
    be merged: rows of one task are spread over all ranks.
    """

    item: int = 0
    shards_per_epoch: int = 0
    marks: tuple[tuple[int, int], ...] = ()  # (task, every item of the task below this one was consumed)
    groups: tuple[TaskGroup, ...] = ()

    @property
    def epoch(self) -> int:
        return self.item // self.shards_per_epoch if self.shards_per_epoch else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for checkpoints."""
        return {
            "item": self.item,
            "shards_per_epoch": self.shards_per_epoch,
            "marks": [list(m) for m in self.marks],
            "groups": [[g.index, g.start, g.end, g.first_task, g.num_tasks] for g in self.groups],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataPosition:
        return cls(
            int(d["item"]),
            int(d["shards_per_epoch"]),
            tuple((int(t), int(m)) for t, m in d.get("marks", ())),
            tuple(TaskGroup(*(int(x) for x in g)) for g in d.get("groups", ())),
        )


def resume_item(marks: Mapping[int, int], groups: Sequence[TaskGroup], default: int) -> int:
    """Oldest work item not yet consumed: tasks of a seen group that were never seen count from its start."""
    oldest = []
    for group in groups:
        for task in group.tasks:
            mark = marks.get(task, group.start)
            if mark < group.end:
                oldest.append(mark)
    if oldest:
        return min(oldest)
    return max((group.end for group in groups), default=default)


def merge_positions(positions: Sequence[DataPosition]) -> DataPosition:
    """One resume position from every rank's (gather them with e.g. `torch.distributed.all_gather_object`).

    Each rank's `item` is a safe resume point from its own view, so the furthest of them is too; per read task
    the furthest mark any rank saw can move it further (rows of one task are spread over all ranks).
    """
    positions = [p for p in positions if p is not None]
    if not positions:
        return DataPosition()
    floor = max(p.item for p in positions)
    marks: dict[int, int] = {}
    groups: dict[int, TaskGroup] = {}
    for p in positions:
        for task, mark in p.marks:
            marks[task] = max(mark, marks.get(task, mark))
        for group in p.groups:
            if group.end > floor:  # a group wholly behind some rank's resume point is done
                groups[group.index] = group
    item = max(floor, resume_item(marks, list(groups.values()), default=floor))
    return DataPosition(
        item,
        positions[0].shards_per_epoch,
        tuple(sorted((t, m) for t, m in marks.items() if any(t in g.tasks for g in groups.values()))),
        tuple(g for _, g in sorted(groups.items())),
    )
