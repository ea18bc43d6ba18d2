"""`speechlm sweep`: a validated sweep spec -> Ray Tune, one Ray Train run per trial, tracked in MLflow.

The shape (Ray Train v2 + Tune): a Tune trial (`SweepTrial`) loads the base config with the trial's values
and calls `orchestrator.training.driver.run_training` - exactly what `speechlm train` does - with the trial's own run
dir `<sweep dir>/trials/<trial id>`, so a restarted trial resumes from its own checkpoints.

How results reach Tune: a `ray.train.UserCallback` in the Train controller forwards only the validation
reports (they carry `step` and the metric) through a Ray queue to the trial, whose `step()` returns them to
Tune one by one; a Tune checkpoint is a tiny pointer to the Train checkpoint of that report. Log-step
reports stay out of Tune: they lack the metric, which Tune's strict metric check rejects, and ASHA/PBT act
on validations only. The pointers are what --resume and PBT restart trials from.

Stopping: when Tune stops a trial (ASHA, time budget, Ctrl-C) the trial's `cleanup` aborts its Train run, so
its workers and placement group are released before the next trial asks for them.

Status: the driver's `TrialStatusCallback` tags each child MLflow run with speechlm.trial_status =
finished | early_stopped (stopped by the scheduler or the time budget before trainer.max_steps) | failed;
the end of the sweep reconciles every child run's MLflow status with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray.train
import yaml
from ray import tune

from orchestrator.config import ConfigError, flatten
from orchestrator.redaction import redact, redact_data
from orchestrator.storage import atomic
from orchestrator.storage.checkpoints import latest_checkpoint, read_saved_state
from orchestrator.storage.paths import is_url
from orchestrator.sweep import report, search_space, trial_runs
from orchestrator.sweep.context import TRIALS_DIR, TUNE_DIR, SweepContext, SweepOutcome
from orchestrator.sweep.report import error_summary, trial_status
from orchestrator.sweep.spec import LoadedSweep, SweptParam
from orchestrator.sweep.trial_runs import SWEEP_TAG, TRIAL_ID_TAG, TRIAL_STATUS_TAG
from orchestrator.tracking import mlflow_runs

logger = logging.getLogger(__name__)

SPEC_FILE = "sweep_spec.yaml"  # the spec as resolved when the sweep started (resume checks it)
POINTER_FILE = "train_checkpoint.json"


class TrialFailedError(RuntimeError):
    """A trial's training run failed; Tune records the trial as errored and the sweep goes on."""


# ------------------------------------------------------------------------------------------------ trial


class ForwardValidationReports(ray.train.UserCallback):
    """Runs in the Train controller: validation reports (they carry `step`) -> the trial's queue.

    The first report also sends the controller's own handle, so that a trial stopped by Tune can abort its
    Train run cleanly (workers and placement group released) before its process exits.
    """

    def __init__(self, queue) -> None:
        self._queue = queue
        self._sent_handle = False

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not self._sent_handle:
            self._queue.put({"controller": ray.get_runtime_context().current_actor})
            self._sent_handle = True
        first = metrics[0] if metrics else {}
        if "step" not in first:  # a log-step report: no validation metric
            return
        self._queue.put({"metrics": dict(first), "checkpoint": checkpoint.path if checkpoint else None})


def trial_run_dir(sweep_dir: str, trial_id: str, pointer: dict[str, Any] | None) -> tuple[str, str | None]:
    """(run dir, checkpoint to start from) for a trial, given the Tune checkpoint it was (re)started with.

    No pointer: the trial's own dir (resumes by itself when it holds checkpoints). Its own pointer: the dir it
    was reporting from. Another trial's pointer (PBT exploit): a new dir that starts from that checkpoint.
    """
    own = f"{sweep_dir.rstrip('/')}/{TRIALS_DIR}/{trial_id}"
    if pointer is None:
        return own, None
    if pointer["trial_id"] == trial_id:
        return pointer["run_dir"], None
    run_dir = f"{own}-from-{pointer['trial_id']}-step{int(pointer['step'])}"
    return run_dir, (pointer["checkpoint"] if latest_checkpoint(run_dir) is None else None)


def trial_overrides(context: SweepContext, trial_id: str, run_dir: str, start_from: str | None) -> list[str]:
    """Where a trial writes and how it is tracked: appended after the fixed and swept overrides."""
    name = Path(run_dir).name
    return [
        f"exp_manager.explicit_log_dir={json.dumps(run_dir)}",
        "exp_manager.resume_if_exists=true",
        "exp_manager.resume_ignore_no_checkpoint=true",
        f"exp_manager.resume_from_checkpoint={json.dumps(start_from)}",
        "exp_manager.create_mlflow_logger=true",
        f"exp_manager.mlflow_logger_kwargs.tracking_uri={json.dumps(context.tracking_uri)}",
        f"exp_manager.mlflow_logger_kwargs.experiment_name={json.dumps(context.experiment_name)}",
        f"exp_manager.mlflow_logger_kwargs.run_name={json.dumps(name)}",
    ]


class SweepTrial(tune.Trainable):
    """One Tune trial: the base config with this trial's values, trained by `run_training` in a thread.

    Each `step` returns the next validation report (Tune's scheduler acts on it); a Tune checkpoint is a
    pointer to the Train checkpoint of that report. A class trainable, because its `cleanup` runs before
    the process exits when Tune stops the trial: there the Train run is aborted, releasing its workers and
    placement group (left to Train's own cleaner, a stopped trial's resources can stay booked).
    """

    def setup(self, config: dict[str, Any], context: SweepContext) -> None:
        self.context = context
        self.pointer: dict[str, Any] | None = None  # the Tune checkpoint this trial (re)starts from
        self.thread: threading.Thread | None = None
        self.queue = None
        self.controller = None  # the Train controller's handle, once it reported
        self.stop_requested = threading.Event()  # set before Tune's stop aborts the Train run
        self.outcome: dict[str, Any] = {}
        self.last_metrics: dict[str, float] | None = None
        self.last_checkpoint: str | None = None
        self.run_dir: str | None = None
        if Path(context.cwd).is_dir():  # relative data paths in configs mean the launch directory
            os.chdir(context.cwd)

    # Tune checkpoints: a pointer to the Train checkpoint --------------------------------------------
    def save_checkpoint(self, checkpoint_dir: str) -> None:
        pointer = {
            "trial_id": self.trial_id,
            "run_dir": self.run_dir,
            "checkpoint": self.last_checkpoint,
            "step": (self.last_metrics or {}).get("step", 0),
        }
        (Path(checkpoint_dir) / POINTER_FILE).write_text(json.dumps(pointer))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        pointer = json.loads((Path(checkpoint_dir) / POINTER_FILE).read_text())
        self.pointer = pointer if pointer.get("run_dir") else None

    # the trial --------------------------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        if self.thread is None:
            self._start_training()
        while True:
            item = self._next_item()
            if item is None:  # training ended without a report at max_steps (e.g. max_epochs)
                self._raise_if_failed()
                if self.last_metrics is None:
                    self.last_metrics = self._metrics_of_a_finished_run()
                if self.last_metrics is None:
                    raise TrialFailedError(f"trial {self.trial_id} ended without a validation ({self.run_dir})")
                return {**self.last_metrics, "done": True}
            if "controller" in item:
                self.controller = item["controller"]
                continue
            metrics = _finite_numbers(item["metrics"])
            self.last_metrics = metrics
            self.last_checkpoint = item["checkpoint"] or self.last_checkpoint
            if metrics.get("step", 0) >= self.context.loaded.max_steps:
                self.thread.join()  # the run closes its MLflow run and summary; then the trial is done
                self._raise_if_failed()
                return {**metrics, "done": True}
            return metrics

    def cleanup(self) -> None:
        """Tune stopped the trial (scheduler, time budget, Ctrl-C) while it trained: abort the Train run."""
        if self.thread is None or not self.thread.is_alive():
            return
        self.stop_requested.set()
        if self.controller is not None:
            # The controller exits inside abort, so the call ends with an actor error: expected.
            with contextlib.suppress(Exception):
                ray.get(self.controller.abort.remote(), timeout=120)
        self.thread.join(timeout=120)
        trial_runs.settle_stopped_trial(self.context, self.trial_id)

    # helpers ----------------------------------------------------------------------------------------
    def _start_training(self) -> None:
        from ray.util.queue import Queue

        from orchestrator.training.driver import run_training

        loaded, context, trial_id = self.context.loaded, self.context, self.trial_id
        self.run_dir, start_from = trial_run_dir(loaded.sweep_dir, trial_id, self.pointer)
        placement = trial_overrides(context, trial_id, self.run_dir, start_from)
        cfg = loaded.trial_config(self.config, placement).cfg
        _log_attempt(self.run_dir, trial_id, loaded.trial_overrides(self.config) + placement, start_from)
        tags = {
            TRIAL_ID_TAG: trial_id,
            SWEEP_TAG: loaded.spec.name,
            TRIAL_STATUS_TAG: "running",
            **{f"sweep.{p.key}": str(self.config[p.key]) for p in loaded.params},
        }
        self.queue = Queue(actor_options={"num_cpus": 0})
        callbacks = [ForwardValidationReports(self.queue)]

        def train() -> None:
            try:
                self.outcome["result"] = run_training(
                    cfg,
                    source=f"sweep {loaded.source} trial {trial_id}",
                    parent_run_id=context.parent_run_id,
                    extra_tags=tags,
                    callbacks=callbacks,
                    stop_requested=self.stop_requested,
                    allow_finished=True,  # a trial restarted after its last report ends at once
                )
            except BaseException as exc:  # raised from step(), in Tune's thread
                self.outcome["error"] = exc

        self.thread = threading.Thread(target=train, name=f"train-{trial_id}", daemon=True)
        self.thread.start()

    def _next_item(self) -> dict[str, Any] | None:
        """The next report from the Train run; None once training has ended and every report was read."""
        from ray.util.queue import Empty

        while True:
            try:
                return self.queue.get(timeout=1.0)
            except Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    return None

    def _metrics_of_a_finished_run(self) -> dict[str, float] | None:
        """A trial interrupted after its last checkpoint resumes at max_steps and trains nothing: its result is
        what that checkpoint's validation measured (state.json), or None when it never reached max_steps."""
        latest = latest_checkpoint(self.run_dir) if self.run_dir else None
        if latest is None:
            return None
        state = read_saved_state(latest)
        if int(state.get("step", 0)) < self.context.loaded.max_steps:
            return None
        self.last_checkpoint = latest
        metrics = _finite_numbers(state.get("metrics", {}))
        return {**metrics, "step": int(state["step"])}

    def _raise_if_failed(self) -> None:
        if "error" in self.outcome:
            error = self.outcome["error"]
            raise TrialFailedError(f"trial {self.trial_id} ({self.run_dir}) raised: {error!r}") from error
        result = self.outcome["result"]
        if not result.ok:
            raise TrialFailedError(f"trial {self.trial_id} failed; run dir {self.run_dir}: {result.error}")


def _log_attempt(run_dir: str, trial_id: str, overrides: list[str], start_from: str | None) -> None:
    """One JSON line per (re)start of a trial in <run dir>/../<trial id>.attempts.jsonl (local sweep dirs)."""
    if is_url(run_dir):
        return
    path = Path(run_dir).parent / f"{trial_id}.attempts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_dir": run_dir,
        "resumed_from": latest_checkpoint(run_dir) or start_from,
        "overrides": overrides,
    }
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------------------------ callbacks


class TrialStatusCallback(tune.Callback):
    """Driver-side Tune callback: trial status into MLflow, and a live table on the terminal."""

    def __init__(self, context: SweepContext, table_every_s: float = 30.0) -> None:
        self.context = context
        self.table_every_s = table_every_s
        self._last_table = 0.0
        self._dirty = False

    # Tune hooks ------------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        print(
            f"[sweep] trial {trial.trial_id} started: {_param_text(self.context.loaded.params, trial.config)}",
            flush=True,
        )
        self._dirty = True

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        metric = self.context.loaded.spec.metric
        if metric in result:
            print(
                f"[sweep] trial {trial.trial_id} step {int(result.get('step', 0))}: {metric}={result[metric]:.4g}",
                flush=True,
            )
        self._dirty = True

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        step = (trial.last_result or {}).get("step")
        status = trial_status("TERMINATED", step, self.context.loaded)
        print(f"[sweep] trial {trial.trial_id} {status.replace('_', ' ')} at step {int(step or 0)}", flush=True)
        self._mark(trial.trial_id, status, None)
        self._print_table(trials, {trial.trial_id: status})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = _error_text(trial)
        print(f"[sweep] trial {trial.trial_id} FAILED: {error_summary(error) or '?'}", flush=True)
        self._mark(trial.trial_id, "failed", error, config=trial.config)
        self._print_table(trials, {trial.trial_id: "failed"})

    def on_step_end(self, iteration, trials, **info) -> None:
        if self._dirty and time.monotonic() - self._last_table >= self.table_every_s:
            self._print_table(trials)

    # helpers ---------------------------------------------------------------------------------------
    def _print_table(self, trials, status: dict[str, str] | None = None) -> None:
        print(report.live_table(trials, self.context.loaded, status), flush=True)
        self._last_table = time.monotonic()
        self._dirty = False

    def _mark(self, trial_id: str, status: str, error: str | None, config: dict | None = None) -> None:
        """Tag the trial's child runs; close runs the trial could not close; record failures that never
        reached MLflow (e.g. before training started) as a failed child run."""
        try:
            trial_runs.mark_trial_runs(self.context, trial_id, status, error, config)
        except Exception as exc:  # tracking must never stop a sweep
            logger.warning("could not record the status of trial %s in MLflow: %s", trial_id, exc)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        return Path(path).read_text().strip() if path and Path(path).is_file() else ""
    except OSError:
        return ""


def _param_text(params: list[SweptParam], config: dict[str, Any]) -> str:
    return ", ".join(f"{p.key}={config.get(p.key)}" for p in params)


# ------------------------------------------------------------------------------------------------ driver


def plan_concurrency(loaded: LoadedSweep, cluster: dict[str, float]) -> tuple[int, str]:
    """max_concurrent_trials and why: as many trials as the cluster fits, keeping half the CPUs for Ray Data."""
    from orchestrator.training.resources import plan_resources

    if loaded.spec.max_concurrent_trials is not None:
        return loaded.spec.max_concurrent_trials, "from the spec"
    res = plan_resources(loaded.base.cfg, cluster)
    if res.use_gpu:
        fit = int(cluster.get("GPU", 0) // res.num_workers)
        return max(1, fit), f"{int(cluster.get('GPU', 0))} GPUs / {res.num_workers} workers per trial"
    per_trial = res.num_workers * res.cpus_per_worker
    fit = int(cluster.get("CPU", 1) // (2 * per_trial))
    return max(1, fit), f"{cluster.get('CPU', 1):g} CPUs, {per_trial:g} per trial, half kept for Ray Data"


def spec_record(loaded: LoadedSweep) -> dict[str, Any]:
    """What identifies a sweep: the resolved spec plus the fixed overrides (saved; resume compares it)."""
    return {
        "spec": dataclasses.asdict(loaded.spec),
        "fixed_overrides": loaded.fixed_overrides,
        "base": loaded.base_path,
        "smoke": loaded.smoke,
    }


def check_resume(loaded: LoadedSweep, resume: bool) -> None:
    """Refuse to silently mix a new sweep into an old one, or to resume something that is not there."""
    tune_path = f"{loaded.sweep_dir}/{TUNE_DIR}"
    exists = tune.Tuner.can_restore(tune_path)
    if resume and not exists:
        raise ConfigError(
            [f"--resume: no sweep state in {tune_path}; run without --resume to start this sweep"], loaded.source
        )
    if not resume and exists:
        raise ConfigError(
            [
                f"{loaded.sweep_dir} already holds sweep {loaded.spec.name!r}; pass --resume to continue it (finished "
                "trials are kept), or start a new one with name=<new name> or output_dir=<dir>"
            ],
            loaded.source,
        )
    saved = Path(loaded.sweep_dir) / SPEC_FILE
    if resume and not is_url(loaded.sweep_dir) and saved.is_file():
        before = flatten(yaml.safe_load(saved.read_text()))
        now = flatten(redact_data(json.loads(json.dumps(spec_record(loaded)))))  # saved with credentials masked
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise ConfigError(
                [
                    f"--resume: the spec differs from the one this sweep started with ({saved}) in: "
                    f"{', '.join(changed)}; Tune resumes the original search space. Revert the change, or start a "
                    "new sweep with name=<new name>"
                ],
                loaded.source,
            )


def run_sweep(loaded: LoadedSweep, resume: bool = False, retry_failed: bool = False) -> SweepOutcome:
    """Run (or resume) the sweep to its end; write the results table, best config and plot; track in MLflow."""
    from orchestrator.training.driver import connect_ray

    check_resume(loaded, resume)
    # Trials must see the launch directory (relative data paths), and Train workers the same.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Every worker imports torch before its first task (see orchestrator.sweep.worker_setup: stopped trials
    # must not leave broken workers behind).
    connect_ray(runtime_env={"worker_process_setup_hook": "orchestrator.sweep.worker_setup.preload"})
    print(search_space.describe(loaded), flush=True)
    concurrency, why = plan_concurrency(loaded, ray.cluster_resources())
    print(f"max_concurrent_trials: {concurrency} ({why})", flush=True)

    sweep_dir = loaded.sweep_dir
    if not is_url(sweep_dir):
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        if not resume:
            record = redact_data(json.loads(json.dumps(spec_record(loaded))))
            atomic.write_text(Path(sweep_dir) / SPEC_FILE, yaml.safe_dump(record, sort_keys=False))
    tracking_uri, experiment = trial_runs.sweep_tracking(loaded)
    parent_run_id = trial_runs.start_parent_run(loaded, tracking_uri, experiment)
    context = SweepContext(loaded, tracking_uri, experiment, parent_run_id, os.getcwd())

    # The trial function only waits on its Train run; the TorchTrainer's workers hold the real resources.
    trainable = tune.with_resources(tune.with_parameters(SweepTrial, context=context), {"CPU": 0.01})
    callbacks = [TrialStatusCallback(context)]
    tune_path = f"{sweep_dir}/{TUNE_DIR}"
    if resume:
        print(
            f"resuming sweep from {tune_path} (finished trials are kept, unfinished ones continue from their "
            "last checkpoint" + (", failed ones are retried" if retry_failed else "") + ")",
            flush=True,
        )
        tuner = tune.Tuner.restore(
            tune_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=retry_failed,
            param_space=search_space.param_space(loaded),
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space.param_space(loaded),
            tune_config=tune.TuneConfig(
                metric=loaded.spec.metric,
                mode=loaded.spec.mode,
                search_alg=search_space.search_alg(loaded, concurrency),
                scheduler=search_space.scheduler(loaded),
                num_samples=loaded.spec.num_samples,
                time_budget_s=loaded.spec.time_budget_s,
                trial_dirname_creator=lambda trial: trial.trial_id,
                # No actor reuse: a trial stopped by the scheduler must take its Train run down with its process.
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=sweep_dir,
                failure_config=tune.FailureConfig(max_failures=loaded.spec.max_failures),
                # A pointer checkpoint after every validation: what --resume and PBT restart trials from.
                checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1),
                callbacks=callbacks,
                verbose=0,  # the callback prints a compact table; Tune's own would list every val_* column
            ),
        )
    started = time.monotonic()
    tuner.fit()  # failed trials are in the results, not raised; Ctrl-C returns here with the state saved
    elapsed = time.monotonic() - started
    records = report.collect_trials(tune_path, loaded)
    interrupted = any(t.status in ("pending", "running", "paused") for t in records)
    return finish_sweep(context, records, elapsed, interrupted)


def finish_sweep(context: SweepContext, records: list, elapsed: float, interrupted: bool) -> SweepOutcome:
    """Write the sweep's files, attach them to the MLflow parent run, print the summary."""
    loaded = context.loaded
    files = report.write_results(loaded, records)
    trial_runs.close_parent_run(context, records, files.paths, files.best, elapsed, interrupted)
    children = trial_runs.child_runs(context)
    lines = report.summary_text(loaded, records, files, elapsed, interrupted)
    lines.append(
        f"MLflow:        parent run {context.parent_run_id} with {len(children)} child runs in experiment "
        f"{context.experiment_name!r} at {context.tracking_uri}"
    )
    lines.append(f"MLflow UI:     {mlflow_runs.ui_command(context.tracking_uri)}")
    if interrupted:
        lines.append(f"resume with:   speechlm sweep {loaded.source} --resume")
    lines.append("=" * 100)
    print(redact("\n".join(lines)), flush=True)
    all_failed = bool(records) and all(r.status == "failed" for r in records)
    return SweepOutcome(
        ok=not interrupted and not all_failed,
        interrupted=interrupted,
        sweep_dir=loaded.sweep_dir,
        trials=records,
        best_config=str(files.best_config) if files.best_config else None,
        tracking_uri=context.tracking_uri,
        parent_run_id=context.parent_run_id,
    )


def _finite_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics Tune can rank: numbers, finite (a NaN placeholder or a string is left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
