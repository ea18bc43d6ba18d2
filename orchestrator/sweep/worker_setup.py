"""Runs in every Ray worker process of a sweep before it takes a task (`worker_process_setup_hook`).

When a trial is stopped, its Train run is aborted and Ray Data cancels the read tasks in flight by raising
KeyboardInterrupt in them. A task interrupted during its first `import torch` leaves that (reused) worker
unable to import torch ever again ("Trying to override a python impl ..."), and every later read task it
gets fails: the next trial's data pipeline stalls. Importing torch before any task runs closes that window.
"""


def preload() -> None:
    import torch  # noqa: F401
