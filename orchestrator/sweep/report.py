"""What a sweep leaves behind: a ranked results table, the best trial's config as a ready-to-run YAML, a PNG
comparing trials, and the same files on the sweep's MLflow parent run.

Files in the sweep dir: results.md (the table), results.csv, best_config.yaml, sweep_comparison.png.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import load_experiment, to_yaml
from orchestrator.storage import atomic, filesystems
from orchestrator.storage.paths import is_url, join
from orchestrator.sweep.spec import LoadedSweep
from orchestrator.training.progress import format_duration

RESULTS_TABLE = "results.md"
RESULTS_CSV = "results.csv"
BEST_CONFIG = "best_config.yaml"
COMPARISON_PNG = "sweep_comparison.png"

# Tune trial status -> ours (finished / early_stopped need the last step; see collect_trials)
_UNFINISHED = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused"}


@dataclass
class TrialRecord:
    trial_id: str
    status: str  # finished | early_stopped | failed | pending | running | paused
    config: dict[str, Any]  # what Tune sampled (preset names for presets)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) at each validation
    last_step: int | None = None
    error: str | None = None

    def best(self, mode: str) -> tuple[int, float] | None:
        """(step, value) of the best validation of this trial."""
        if not self.history:
            return None
        pick = min if mode == "min" else max
        return pick(self.history, key=lambda sv: sv[1])


# ------------------------------------------------------------------------------------------------ collect


def collect_trials(tune_path: str, loaded: LoadedSweep) -> list[TrialRecord]:
    """Every trial of the Tune experiment (including ones finished before a --resume), best first.

    Read back from the saved experiment state rather than from Tuner.fit()'s ResultGrid: after a Ctrl-C the
    in-memory trials read as terminated, while the saved state keeps them RUNNING/PENDING (resumable).
    """
    from ray.tune import ExperimentAnalysis

    metric = loaded.spec.metric
    analysis = ExperimentAnalysis(tune_path)
    records = []
    for trial in analysis.trials:
        history: list[tuple[int, float]] = []
        frame = analysis.trial_dataframes.get(trial.trial_id)
        if frame is not None and metric in frame and "step" in frame:
            for step, value in zip(frame["step"], frame[metric], strict=True):
                if _finite(value) and _finite(step):
                    history.append((int(step), float(value)))
        last_step = history[-1][0] if history else None
        status = trial_status(trial.status, last_step, loaded)
        error = _read_error(tune_path, trial) if status == "failed" else None
        records.append(TrialRecord(trial.trial_id, status, dict(trial.config), history, last_step, error))
    return rank(records, loaded.spec.mode)


def trial_status(tune_status: str, last_step: float | None, loaded: LoadedSweep) -> str:
    """Tune's status -> ours: a terminated trial finished if it reached trainer.max_steps, else the scheduler
    (or the time budget) stopped it early."""
    if tune_status in _UNFINISHED:
        return _UNFINISHED[tune_status]
    if tune_status == "ERROR":
        return "failed"
    return "finished" if last_step is not None and last_step >= loaded.max_steps else "early_stopped"


def rank(records: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """Best metric first; trials without a metric (failed, not started) last, in trial order."""
    sign = 1.0 if mode == "min" else -1.0

    def key(r: TrialRecord):
        best = r.best(mode)
        return (0, sign * best[1]) if best else (1, 0.0)

    return sorted(records, key=key)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _read_error(tune_path: str, trial) -> str | None:
    """The trial's error.txt in the experiment dir (trial dirs are named by trial id). Not `trial.error_file`:
    after a --resume that points into the previous driver's Ray session dir, which is gone."""
    try:
        return filesystems.read_text(join(join(tune_path, trial.trial_id), "error.txt")).strip()
    except OSError:  # no error.txt (FileNotFoundError) or an unreadable one
        return None


# -------------------------------------------------------------------------------------------------- tables

_EXCEPTION_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception)): (.+)$")
_WRAPPERS = (
    "TrialFailedError",
    "TrainingFailedError",
    "WorkerGroupError",
    "ControllerError",
    "RayTaskError",
    "TuneError",
)


def error_summary(error: str | None) -> str:
    """The root cause of a trial's error in one line (the innermost exception, not Ray's or our wrappers)."""
    if not error:
        return ""
    causes = [m for line in error.splitlines() if (m := _EXCEPTION_LINE.match(line))]
    inner = [m for m in causes if not m.group(1).split(".")[-1].startswith(_WRAPPERS)]
    pick = (inner or causes)[-1] if (inner or causes) else None
    return f"{pick.group(1).split('.')[-1]}: {pick.group(2)}"[:300] if pick else error.splitlines()[-1][:300]


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def results_rows(records: list[TrialRecord], loaded: LoadedSweep) -> tuple[list[str], list[list[str]]]:
    metric, mode = loaded.spec.metric, loaded.spec.mode
    header = ["rank", "trial", "status", *[p.key for p in loaded.params], f"best {metric}", "at step", "last step"]
    rows = []
    for i, r in enumerate(records, 1):
        best = r.best(mode)
        rows.append(
            [
                str(i) if best else "-",
                r.trial_id,
                r.status,
                *[_value_text(r.config.get(p.key)) for p in loaded.params],
                f"{best[1]:.4f}" if best else "-",
                str(best[0]) if best else "-",
                str(r.last_step) if r.last_step is not None else "-",
            ]
        )
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table that also reads well on a terminal."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def live_table(trials, loaded: LoadedSweep, status: dict[str, str] | None = None) -> str:
    """The table printed while the sweep runs (from Tune's Trial objects); `status` overrides Tune's status
    for trials that just ended (Tune updates it after its callbacks run)."""
    metric = loaded.spec.metric
    header = ["trial", "status", *[p.key for p in loaded.params], "step", metric]
    rows = []
    status = status or {}
    states = [
        status.get(t.trial_id) or trial_status(t.status, (t.last_result or {}).get("step"), loaded) for t in trials
    ]
    for trial, state in zip(trials, states, strict=True):
        last = trial.last_result or {}
        rows.append(
            [
                trial.trial_id,
                state,
                *[_value_text(trial.config.get(p.key)) for p in loaded.params],
                str(int(last["step"])) if "step" in last else "-",
                f"{last[metric]:.4f}" if metric in last else "-",
            ]
        )
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"\n[sweep] {loaded.spec.name}: {summary}\n" + format_table(header, rows) + "\n"


def results_csv(records: list[TrialRecord], loaded: LoadedSweep) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["trial", "status", *[p.key for p in loaded.params], "best_value", "best_step", "last_step", "metric", "error"]
    )
    for r in records:
        best = r.best(loaded.spec.mode)
        writer.writerow(
            [
                r.trial_id,
                r.status,
                *[r.config.get(p.key) for p in loaded.params],
                best[1] if best else "",
                best[0] if best else "",
                r.last_step or "",
                loaded.spec.metric,
                error_summary(r.error),
            ]
        )
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- best config


def best_config_yaml(record: TrialRecord, loaded: LoadedSweep) -> str:
    """The best trial's full resolved config, ready for `speechlm train` (writing to a run dir of its own)."""
    name = f"{loaded.spec.name}_best"
    extra = [f"exp_manager.name={name}", "exp_manager.explicit_log_dir=null", "exp_manager.resume_from_checkpoint=null"]
    cfg = loaded.trial_config(record.config, extra).cfg
    best = record.best(loaded.spec.mode)
    swept = ", ".join(f"{p.key}={_value_text(record.config.get(p.key))}" for p in loaded.params)
    header = [
        f"# Best trial of sweep {loaded.spec.name!r} ({loaded.source}): trial {record.trial_id}",
        f"# {loaded.spec.metric} = {best[1]:.4f} at step {best[0]}" if best else "# (no metric reported)",
        f"# Swept values: {swept}",
        "# The full resolved config; exp_manager.name is set so a run does not collide with the sweep's trials.",
        "#",
        "# Launch: speechlm train THIS_FILE",
    ]
    return "\n".join(header) + "\n" + to_yaml(cfg)


# ---------------------------------------------------------------------------------------------------- plot


def comparison_png(records: list[TrialRecord], loaded: LoadedSweep, out_file: Path) -> Path | None:
    """Left: the metric over steps per trial (dashed = stopped early). Then one panel per swept key: each
    trial's best metric against its value (categorical keys and presets on a labelled axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_metric = [r for r in records if r.history]
    if not with_metric:
        return None
    metric, mode = loaded.spec.metric, loaded.spec.mode
    panels = 1 + len(loaded.params)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for r in with_metric:
        steps, values = zip(*r.history, strict=True)
        style = "--" if r.status == "early_stopped" else "-"
        label = f"{r.trial_id} " + ", ".join(_value_text(r.config.get(p.key)) for p in loaded.params)
        ax.plot(steps, values, style, marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax, param in zip(axes[0][1:], loaded.params, strict=True):
        points = [(r.config.get(param.key), r.best(mode)[1], r.status) for r in with_metric]
        if param.discrete:
            labels = [str(o) for o in param.options]
            xs = [labels.index(str(v)) if str(v) in labels else -1 for v, _, _ in points]
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=20 if max(map(len, labels)) > 6 else 0)  # tilt only long names
        else:
            xs = [float(v) for v, _, _ in points]
            if param.kind == "loguniform":
                ax.set_xscale("log")
        colors = ["tab:orange" if s == "early_stopped" else "tab:blue" for _, _, s in points]
        ax.scatter(xs, [y for _, y, _ in points], c=colors)
        ax.set_xlabel(param.key)
        ax.set_ylabel(f"best {metric}")
        ax.set_title(f"best {metric} vs {param.key}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {loaded.spec.name} (orange: stopped early)")
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


# -------------------------------------------------------------------------------------------------- finish


@dataclass
class ResultFiles:
    """What `write_results` wrote (in the sweep dir, or a scratch dir for a sweep dir on object storage)."""

    out_dir: Path
    table: str  # the ranked table, as printed
    best: TrialRecord | None
    best_config: Path | None
    comparison: Path | None

    @property
    def paths(self) -> list[Path]:
        files = [self.out_dir / RESULTS_TABLE, self.out_dir / RESULTS_CSV, self.best_config, self.comparison]
        return [f for f in files if f is not None]


def write_results(loaded: LoadedSweep, records: list[TrialRecord]) -> ResultFiles:
    """results.md, results.csv, best_config.yaml (validated: it is what we hand the user) and the plot."""
    sweep_dir = loaded.sweep_dir
    out = Path(_scratch_dir()) if is_url(sweep_dir) else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = results_rows(records, loaded)
    table = format_table(header, rows)
    atomic.write_text(
        out / RESULTS_TABLE, f"# Sweep {loaded.spec.name}: {loaded.spec.metric} ({loaded.spec.mode})\n\n" + table + "\n"
    )
    atomic.write_text(out / RESULTS_CSV, results_csv(records, loaded))
    best = next((r for r in records if r.history), None)
    best_path = None
    if best is not None:
        best_path = out / BEST_CONFIG
        atomic.write_text(best_path, best_config_yaml(best, loaded))
        load_experiment(best_path)
    png = comparison_png(records, loaded, out / COMPARISON_PNG)
    return ResultFiles(out, table, best, best_path, png)


def summary_text(
    loaded: LoadedSweep, records: list[TrialRecord], files: ResultFiles, elapsed: float, interrupted: bool
) -> list[str]:
    """The lines printed at the end of a sweep, before where it is tracked."""
    counts = {s: sum(r.status == s for r in records) for s in ("finished", "early_stopped", "failed")}
    lines = [
        "",
        "=" * 100,
        f"sweep {loaded.spec.name} "
        + ("INTERRUPTED" if interrupted else "finished")
        + f" in {format_duration(elapsed)}: {len(records)} trials, {counts['finished']} finished, "
        f"{counts['early_stopped']} stopped early, {counts['failed']} failed",
        "",
        files.table,
        "",
    ]
    if files.best is not None:
        step, value = files.best.best(loaded.spec.mode)
        lines.append(f"best trial:    {files.best.trial_id} ({loaded.spec.metric}={value:.4f} at step {step})")
        lines.append(f"best config:   {files.best_config}   ->   speechlm train {files.best_config}")
    if files.comparison is not None:
        lines.append(f"comparison:    {files.comparison}")
    lines.append(f"results:       {files.out_dir / RESULTS_TABLE}")
    return lines


def _scratch_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="speechlm-sweep-")
