"""Sweeps end to end on a local Ray cluster and tiny demo data: each Tune trial is a real Ray Train run.

One sweep, run once for the module (trials are the slow part): a grid over four optimizer presets on the demo
SALM, in trial order
- fast: learns; finishes;
- broken: a negative learning rate, so its Train run fails: recorded as failed, and the sweep goes on;
- frozen: lr 0 keeps the initial loss, the worst at the first validation: ASHA stops it there;
- fast_wd: like fast; the `speechlm sweep` process is interrupted (SIGINT, as Ctrl-C) after its first
  validation, and `--resume` continues it from its own checkpoint without re-running the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_experiment
from orchestrator.data.demo import make_demo_assets
from orchestrator.sweep.spec import load_sweep

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """About 70 s of demo speech and the tiny LLM: a few seconds to build."""
    out = tmp_path_factory.mktemp("sweep_demo")
    make_demo_assets(
        out, hours=0.02, s2s_hours=0.003, seed=1, min_heldout_cuts=8, shard_size=10, num_workers=1, progress=False
    )
    return out


def optimizer(lr: float) -> dict:
    return {"_target_": "torch.optim.AdamW", "lr": lr, "weight_decay": 0.0}


def write_spec(directory: Path, assets: Path, name: str, presets: dict, scheduler: dict, max_steps: int) -> Path:
    """A grid over named optimizer presets on the demo SALM, made tiny (2 encoder layers, 10 s batches)."""
    spec = {
        "name": name,
        "base": str(ROOT / "configs" / "demo" / "salm.yaml"),
        "overrides": [
            f"model.pretrained_llm={assets / 'llm'}",
            f"data.train_ds.input_cfg.0.shar_path={assets / 'asr' / 'train'}",
            f"data.validation_ds.input_cfg.0.shar_path={assets / 'asr' / 'val'}",
            "model.perception.encoder.n_layers=2",
            "model.perception.encoder.conv_norm_type=layer_norm",  # no BatchNorm statistics: lr 0 changes nothing
            "model.lr_scheduler=null",
            f"trainer.max_steps={max_steps}",
            "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=2",
            "trainer.limit_val_batches=1",
            "data.train_ds.batch_duration=10",
            "data.validation_ds.batch_size=8",
        ],
        "search_space": {"model.optimizer": {"grid": presets}},
        "metric": "val_loss",
        "mode": "min",
        "scheduler": scheduler,
        "search_alg": {"type": "grid"},
        "max_concurrent_trials": 1,
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
        "output_dir": str(directory / name),
        "mlflow": {"experiment_name": name},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def attempts(sweep_dir: str, trial_id: str) -> list[dict]:
    path = Path(sweep_dir) / "trials" / f"{trial_id}.attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


PRESETS = {
    "fast": optimizer(3e-3),
    "broken": optimizer(-1.0),
    "frozen": optimizer(0.0),
    "fast_wd": {**optimizer(3e-3), "weight_decay": 1e-4},
}


@pytest.fixture(scope="module")
def swept(ray_session, assets, tmp_path_factory):
    """Run the sweep in a `speechlm sweep` process, interrupt it during its last trial, resume it here."""
    from orchestrator.sweep.run import run_sweep

    directory = tmp_path_factory.mktemp("sweeps")
    spec = write_spec(directory, assets, "asha_resume", PRESETS, {"type": "asha", "grace_period": 2}, max_steps=6)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started: list[str] = []
    output: list[str] = []
    deadline = time.monotonic() + 1200
    try:
        for line in proc.stdout:
            output.append(line)
            if line.startswith("[sweep] trial ") and " started: " in line:
                started.append(line.split()[2])
            # The last trial has written its step-2 checkpoint: interrupt the sweep like Ctrl-C would.
            if len(started) == len(PRESETS) and line.startswith(f"[sweep] trial {started[-1]} step 2:"):
                proc.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "the sweep did not reach its last trial:\n" + "".join(output[-80:])
        output += proc.stdout.readlines()
        returncode = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    interrupted_output = "".join(output)
    assert returncode == 1, interrupted_output[-6000:]  # 1: interrupted

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")  # what run_sweep sets; restored afterwards
    try:
        with pytest.raises(ConfigError, match="pass --resume to continue it"):
            run_sweep(load_sweep(spec))
        with pytest.raises(ConfigError, match=r"spec differs .* in: spec\.num_samples"):
            run_sweep(load_sweep(spec, ["num_samples=2"]), resume=True)
        outcome = run_sweep(load_sweep(spec), resume=True)
    finally:
        mp.undo()
    trial_ids = dict(zip(PRESETS, started, strict=True))
    return spec, outcome, trial_ids, interrupted_output


def test_failing_trial_is_recorded_and_asha_stops_the_weakest(swept):
    _, outcome, _, _ = swept
    by_preset = {r.config["model.optimizer"]: r for r in outcome.trials}
    assert by_preset["fast"].status == "finished" and [s for s, _ in by_preset["fast"].history] == [2, 4, 6]
    assert by_preset["broken"].status == "failed" and "Invalid learning rate" in by_preset["broken"].error
    # lr 0 keeps the initial loss, worse than every learning trial at the first rung: ASHA stops it there.
    assert by_preset["frozen"].status == "early_stopped" and by_preset["frozen"].last_step == 2
    assert outcome.ok and outcome.trials[0].config["model.optimizer"] in ("fast", "fast_wd")
    assert outcome.trials[-1].config["model.optimizer"] == "broken"  # no metric: ranked last

    sweep_dir = Path(outcome.sweep_dir)
    best = load_experiment(sweep_dir / "best_config.yaml").cfg
    assert best.model.optimizer["lr"] == pytest.approx(3e-3) and best.exp_manager.name == "asha_resume_best"
    table = (sweep_dir / "results.md").read_text()
    assert "| 1    |" in table and "failed" in table and "early_stopped" in table
    assert (sweep_dir / "sweep_comparison.png").stat().st_size > 10_000


def test_mlflow_has_one_parent_and_a_child_per_trial_with_status(swept):
    import mlflow

    _, outcome, trial_ids, _ = swept
    client = mlflow.MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("asha_resume")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("speechlm.kind") == "sweep"]  # resume continued it
    assert parent.info.run_id == outcome.parent_run_id and parent.info.status == "FINISHED"
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_spec.yaml", "best_config.yaml", "results.md", "sweep_comparison.png"} <= parent_files
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == len(PRESETS)  # the resumed trial continued its run
    assert {r.data.tags["speechlm.trial_id"] for r in children} == set(trial_ids.values())
    status = {r.data.tags["sweep.model.optimizer"]: r.data.tags["speechlm.trial_status"] for r in children}
    assert {k: status[k] for k in ("fast", "broken", "frozen")} == {
        "fast": "finished",
        "broken": "failed",
        "frozen": "early_stopped",
    }
    assert status["fast_wd"] in ("finished", "early_stopped")
    params = {r.data.tags["sweep.model.optimizer"]: r.data.params["model.optimizer.lr"] for r in children}
    assert params["fast"] != params["frozen"] != params["broken"]  # swept values are params of the children
    assert all(r.info.status in ("FINISHED", "FAILED") for r in children)
    fast = next(r for r in children if r.data.tags["sweep.model.optimizer"] == "fast")
    assert [m.step for m in client.get_metric_history(fast.info.run_id, "val_loss")] == [2, 4, 6]


def test_resume_keeps_finished_trials_and_continues_the_interrupted_one(swept):
    spec, outcome, trial_ids, interrupted_output = swept
    assert "INTERRUPTED" in interrupted_output and f"speechlm sweep {spec} --resume" in interrupted_output
    for preset in ("fast", "broken", "frozen"):
        assert len(attempts(outcome.sweep_dir, trial_ids[preset])) == 1, f"{preset} ran again"
    runs = attempts(outcome.sweep_dir, trial_ids["fast_wd"])
    assert len(runs) == 2 and runs[0]["resumed_from"] is None
    assert "step=" in runs[1]["resumed_from"]  # continued from its own checkpoint, not from scratch
    resumed = next(r for r in outcome.trials if r.trial_id == trial_ids["fast_wd"])
    assert resumed.status in ("finished", "early_stopped") and resumed.last_step >= 4
