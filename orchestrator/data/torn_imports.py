"""Retire a Ray worker process whose imports were torn by a task cancellation.

Ray Data cancels its in-flight read tasks when a stream shuts down, e.g. when Ray Train replaces a dead
worker and restarts the worker group. Cancelling raises KeyboardInterrupt in the task. When that lands while
the task is still importing a package (a read task in a fresh process spends seconds importing torch to
unpickle its collator), Python drops the half-run package from `sys.modules` but keeps the submodules that
finished. From then on every import of that package in the process fails (for torch:
`NameError: name 'adadelta' is not defined`). Ray Data retries such failures forever, and Ray reuses the same
idle process for the retry, so training hangs with no task making progress.

Such a process cannot be repaired (a C extension cannot be initialised twice), so a read task that starts
in one exits the process before doing anything: Ray sees a dead worker and retries the task in a fresh one.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)


def torn_imports() -> list[str]:
    """Modules whose parent package is missing from `sys.modules`: what an interrupted package import leaves.

    In a healthy process every submodule's parent is imported first and stays imported, so this is empty.
    """
    modules = set(sys.modules)
    return sorted(name for name in modules if "." in name and name.rpartition(".")[0] not in modules)


def retire_process_if_imports_are_torn(task: str) -> None:
    """Exit this worker process (so Ray retries `task` in a fresh one) when an earlier import was torn."""
    torn = torn_imports()
    if not torn:
        return
    logger.error(
        "%s: this Ray worker process holds half-imported packages (%s%s), left by a task cancelled while it "
        "was importing; exiting the process so that Ray retries the task in a fresh one",
        task,
        ", ".join(torn[:3]),
        ", ..." if len(torn) > 3 else "",
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)
