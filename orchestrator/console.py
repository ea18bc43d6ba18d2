"""What the terminal shows: this project's lines, and of Ray's and the libraries' output only what a user acts on.

A default `speechlm train` on a local Ray instance printed 57 lines of which 8 were useful. The rest is dropped
here, each kind for a reason given below; `speechlm --verbose COMMAND` (or SPEECHLM_VERBOSE=1) shows it all
again, with debug logging.

- On this process (the driver): Ray's token-auth notice (a local instance uses token auth by default: nothing
  to do) and its "Started a local Ray instance" line (the driver prints the dashboard's address itself), MLflow
  creating its database tables, the duration bins estimated for bucketing, transformers' "Loading weights" bars
  and trainable-parameter counts of models loaded to infer or export, and deprecation/future warnings raised
  outside this project.
- From Ray's worker processes (printed here by Ray's log monitor): Ray Train's worker-group start-up, Ray Data's
  per-dataset execution plans, a core_worker error line about PreemptionWatcher's restart policy (Ray's
  issue 53727: harmless), Ray Train's note that a run snapshot was found (the driver says which checkpoint it
  resumes from), transformers' "Loading weights" bars, deprecation/future warnings raised outside this project,
  the traceback of Ray's placement-group monitor thread when several local Ray instances share a machine (it
  cannot tell which cluster is its own; training is unaffected), and the trainable-parameter summary from every
  rank but the first to print it.

A line is dropped only when it matches one of the patterns below: no other error or warning is ever hidden.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

VERBOSE_ENV = "SPEECHLM_VERBOSE"

# Source trees whose warnings are always shown (they are bugs of this project).
_PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("orchestrator", "speech_models"))

# Worker lines that say nothing a user acts on (matched against the line without Ray's "(Actor pid=N)" prefix).
_NOISE = tuple(
    re.compile(pattern)
    for pattern in (
        # Ray Train's worker-group start-up (the driver prints the worker count itself)
        r"^Requesting resources: ",
        r"^Attempting to start training worker group ",
        r"^Started training worker group of size ",
        r"^- \(ip=\S+, pid=\d+\) world_rank=",
        r"^Setting up process group for: ",
        # Ray Train found its own run snapshot (the driver prints which checkpoint it resumes from)
        r"^A run snapshot was found in storage folder at: ",
        r"^This snapshot contains a list of checkpoints reported via ",
        r"^If you meant to start a brand new training job ",
        # a core_worker "E" line about the restart policy of Ray Train's PreemptionWatcher (ray issue 53727)
        r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'",
        # Ray Data, once per dataset and per validation pass
        r"^Starting execution of Dataset ",
        r"^Execution plan of Dataset ",
        r"^Progress bars disabled\. To enable, set ",
        r"Dataset \S+ execution finished in ",
        r"^Registered dataset logger for dataset ",
        # transformers' weight-loading bar, once per worker and model
        r"Loading weights: ",
    )
)
# "path.py:12: FutureWarning: ..." then the source line, indented.
_WARNING = re.compile(r"^(?P<path>\S+\.py):\d+: \w*(?:Deprecation|Future|Pending\w*)Warning: ")
# Ray's placement-group monitor thread fails to find its cluster when several local Ray instances run.
_MONITOR_TRACEBACK = "Exception in thread PlacementGroupCleanerMonitor:"
_TRACEBACK_LINES = ("Traceback (most recent call last):", "During handling of", "The above exception")
# Python 3.11+ marks the failing expression with ^ (and ~); Ray's log printer can deliver a run of them unindented.
_CARETS = re.compile(r"^[\s^~]+$")
# Printed by every rank as it builds the model; rank 0's copy is enough.
_PER_RANK = re.compile(r"^\w+: [\d,]+ trainable of [\d,]+ parameters")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def configure(verbose_flag: bool) -> None:
    """Set up this process's logging and warnings for a `speechlm` command: quiet unless `verbose_flag`."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    loud = verbose()
    logging.basicConfig(
        level=logging.DEBUG if loud else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if loud:
        return
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    logging.getLogger("ray._private.worker").setLevel(logging.WARNING)  # "Started a local Ray instance"
    logging.getLogger("orchestrator.data.plan").setLevel(logging.WARNING)  # estimated bucket bins: --verbose
    logging.getLogger("speech_models.freezing").setLevel(logging.WARNING)  # trainable counts, when not training
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"(orchestrator|speech_models)(\.|$)")


def quiet_model_loading() -> None:
    """For commands that load models in this process (eval, infer, export): no "Loading weights" bars."""
    if verbose():
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def filter_ray_worker_logs() -> bool:
    """Put `WorkerLogFilter` in front of the printer of Ray worker logs on this driver; False when Ray's log
    printing is off or its internals moved (then its output is printed unfiltered, nothing breaks)."""
    if verbose():
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    for name, handler in handlers:
        if name == "ray_print_logs" and not isinstance(handler, WorkerLogFilter):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, WorkerLogFilter(handler))
            return True
    return False


class WorkerLogFilter:
    """Wraps Ray's printer of worker log batches (dicts with "pid", "actor_name", "lines", ...), dropping noise."""

    def __init__(self, print_batch: Any) -> None:
        self.print_batch = print_batch
        self._skip_next_indented: set[Any] = set()  # pids whose last line was a dropped warning
        self._in_traceback: set[Any] = set()  # pids inside a dropped monitor traceback
        self._per_rank_seen: dict[str, Any] = {}  # line -> the pid that printed it first

    def __call__(self, data: dict[str, Any]) -> None:
        lines = [line for line in data.get("lines", []) if self.keep(data.get("pid"), line)]
        if lines:
            self.print_batch({**data, "lines": lines})

    def keep(self, pid: Any, line: str) -> bool:
        if pid in self._in_traceback:
            if not line.strip() or line.startswith((" ", "\t", *_TRACEBACK_LINES)) or _CARETS.match(line):
                return False
            self._in_traceback.discard(pid)  # the exception's own line ends the traceback
            return False
        if pid in self._skip_next_indented:
            self._skip_next_indented.discard(pid)
            if line.startswith((" ", "\t")):
                return False
        if line.startswith(_MONITOR_TRACEBACK):
            self._in_traceback.add(pid)
            return False
        if any(pattern.search(line) for pattern in _NOISE):
            return False
        if (warning := _WARNING.match(line)) and not warning["path"].startswith(_PROJECT_DIRS):
            self._skip_next_indented.add(pid)
            return False
        if _PER_RANK.match(line):
            return self._per_rank_seen.setdefault(line, pid) == pid
        return True
