"""How a restarted Train worker group tells the read tasks what its checkpoint had consumed.

Ray Train replaces a failed worker group inside one `fit()` and restores the latest checkpoint, but it re-executes
the datasets the driver planned once, from the run's start position. So the driver creates one small named actor
per training dataset (a *board*); every rank, after restoring a checkpoint and before it iterates the dataset,
publishes what that checkpoint had consumed (`publish_restored_position`), and every read task reads it once when
it starts (`restored_position`). The ranks' first iteration is a barrier of the streaming split (no read task runs
before every rank has asked for data), so the tasks of a new worker group always see its checkpoint's position.
One actor call per read task and per rank start: nothing per row.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from orchestrator.data.position import DataPosition, reconcile

if TYPE_CHECKING:
    from orchestrator.data.plan import DatasetPlan

logger = logging.getLogger(__name__)


class ResumeBoard:
    """The position the current worker group restored, for one dataset plan (a Ray actor)."""

    def __init__(self, plan: DatasetPlan) -> None:
        self.name, self.fingerprint, self.shards_per_epoch = plan.name, plan.fingerprint, plan.shards_per_epoch
        self.start_epoch = plan.start_epoch
        self.position: DataPosition | None = None

    def publish(self, position: DataPosition | None) -> DataPosition:
        """Store what the restored checkpoint consumed (None: nothing restored), as this plan can use it."""
        if position is None:
            position = DataPosition(shards_per_epoch=self.shards_per_epoch, fingerprint=self.fingerprint)
        if position.epoch < self.start_epoch:
            logger.warning(
                "[%s] the worker group restored a checkpoint from epoch %d but the run was planned from epoch %d (a "
                "newer checkpoint); epochs %d to %d are not read again",
                self.name,
                position.epoch,
                self.start_epoch,
                position.epoch,
                self.start_epoch - 1,
            )
        self.position = reconcile(position, self.fingerprint, self.shards_per_epoch, self.name)
        return self.position

    def read(self) -> DataPosition | None:
        return self.position


def new_board_name(dataset: str) -> str:
    """A name for the board of one run's dataset (unique: a sweep runs many trials in one Ray cluster)."""
    return f"speechlm-resume-{dataset}-{uuid.uuid4().hex[:12]}"


def create_board(board_name: str, plan: DatasetPlan):
    """Start the board on the driver's node; keep the returned handle as long as the dataset (the actor lives as
    long as a handle to it does). Pinned there because an elastic run loses spot nodes: a board placed on one
    would die with it and end the run, while the driver's node lives as long as the run does."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver_node = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(ResumeBoard).options(name=board_name, num_cpus=0, scheduling_strategy=driver_node).remote(plan)


def publish_restored_position(board_name: str | None, position: DataPosition | None) -> DataPosition | None:
    """On a Train worker, before it iterates the dataset: what its restored checkpoint consumed (None: nothing),
    as the read tasks will go by it."""
    if board_name is None:
        return position
    import ray

    return ray.get(ray.get_actor(board_name).publish.remote(position))


def restored_position(board_name: str | None) -> DataPosition | None:
    """In a read task: the position the current worker group published (None: none, go by the plan's)."""
    if board_name is None:
        return None
    import ray

    try:
        board = ray.get_actor(board_name)
    except ValueError:  # the driver that owns it is gone; the task's output has no consumer either
        logger.warning("resume board %s not found; reading from the plan's start position", board_name)
        return None
    return ray.get(board.read.remote())
