"""What a running sweep is, shared by the driver, its trials and its MLflow records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.sweep.spec import LoadedSweep

TUNE_DIR = "tune"  # <sweep dir>/tune: Tune's experiment state (what --resume restores)
TRIALS_DIR = "trials"  # <sweep dir>/trials/<trial id>: each trial's Ray Train run dir


@dataclass
class SweepContext:
    """What every trial needs besides its sampled values; pickled into the trial function."""

    loaded: LoadedSweep
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    cwd: str

    def trial_dir(self, trial_id: str) -> str:
        return f"{self.loaded.sweep_dir.rstrip('/')}/{TRIALS_DIR}/{trial_id}"


@dataclass
class SweepOutcome:
    ok: bool  # the sweep ran to its end (some trials may have failed)
    interrupted: bool
    sweep_dir: str
    trials: list[Any] = field(default_factory=list)  # report.TrialRecord, best first
    best_config: str | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None
