"""Sweeps end to end on a local Ray cluster and tiny demo data: each Tune trial is a real Ray Train run.

- a sweep with a good, a failing and a never-learning trial: the failure is recorded and the sweep goes on,
  ASHA stops the never-learning trial at its first validation, MLflow holds one parent and a child per trial;
- an interrupted sweep (Ctrl-C in a `speechlm sweep` process) continues with --resume: the finished trial is
  not run again, the interrupted one continues from its own checkpoint.
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


@pytest.fixture
def sweep_env(monkeypatch):
    monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")  # what run_sweep sets; restored after the test


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


def test_failing_trial_is_recorded_asha_stops_early_and_mlflow_nests_trials(ray_session, sweep_env, assets, tmp_path):
    import mlflow

    from orchestrator.sweep.run import run_sweep

    presets = {"fast": optimizer(3e-3), "broken": optimizer(-1.0), "frozen": optimizer(0.0)}
    spec = write_spec(tmp_path, assets, "asha_failure", presets, {"type": "asha", "grace_period": 2}, max_steps=4)
    outcome = run_sweep(load_sweep(spec))

    by_preset = {r.config["model.optimizer"]: r for r in outcome.trials}
    assert by_preset["fast"].status == "finished" and [s for s, _ in by_preset["fast"].history] == [2, 4]
    assert by_preset["broken"].status == "failed" and "Invalid learning rate" in by_preset["broken"].error
    # lr 0 keeps the initial loss, worse than the fast trial at the first rung: ASHA stops it there.
    assert by_preset["frozen"].status == "early_stopped" and by_preset["frozen"].last_step == 2
    assert outcome.ok and outcome.trials[0].config["model.optimizer"] == "fast"

    sweep_dir = Path(outcome.sweep_dir)
    best = load_experiment(sweep_dir / "best_config.yaml").cfg
    assert best.model.optimizer["lr"] == pytest.approx(3e-3) and best.exp_manager.name == "asha_failure_best"
    table = (sweep_dir / "results.md").read_text()
    assert "| 1    |" in table and "failed" in table and "early_stopped" in table
    assert (sweep_dir / "sweep_comparison.png").stat().st_size > 10_000

    client = mlflow.MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("asha_failure")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("speechlm.kind") == "sweep"]
    assert parent.info.run_id == outcome.parent_run_id and parent.info.status == "FINISHED"
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_spec.yaml", "best_config.yaml", "results.md", "sweep_comparison.png"} <= parent_files
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    status = {r.data.tags["sweep.model.optimizer"]: r.data.tags["speechlm.trial_status"] for r in children}
    assert status == {"fast": "finished", "broken": "failed", "frozen": "early_stopped"}
    lrs = {r.data.tags["sweep.model.optimizer"]: r.data.params["model.optimizer.lr"] for r in children}
    assert len(set(lrs.values())) == 3  # the swept value is a param of each child run
    assert all(r.info.status in ("FINISHED", "FAILED") for r in children)
    fast = next(r for r in children if r.data.tags["sweep.model.optimizer"] == "fast")
    assert [m.step for m in client.get_metric_history(fast.info.run_id, "val_loss")] == [2, 4]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, sweep_env, assets, tmp_path):
    """Ctrl-C a `speechlm sweep` process while its second trial runs, then --resume in this process."""
    from orchestrator.sweep.run import run_sweep

    presets = {"a": optimizer(3e-3), "b": optimizer(1e-3)}
    spec = write_spec(tmp_path, assets, "resume", presets, {"type": "fifo"}, max_steps=6)
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
    deadline = time.monotonic() + 420
    try:
        for line in proc.stdout:
            output.append(line)
            if line.startswith("[sweep] trial ") and " started: " in line:
                started.append(line.split()[2])
            # The second trial has written its step-2 checkpoint: interrupt the sweep like Ctrl-C would.
            if len(started) == 2 and line.startswith(f"[sweep] trial {started[1]} step 2:"):
                proc.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "sweep did not reach its second trial:\n" + "".join(output[-60:])
        output += proc.stdout.readlines()
        assert proc.wait(timeout=120) == 1, "".join(output[-60:])  # 1: interrupted
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(output)
    assert "INTERRUPTED" in text and f"speechlm sweep {spec} --resume" in text

    with pytest.raises(ConfigError, match="pass --resume to continue it"):
        run_sweep(load_sweep(spec))
    with pytest.raises(ConfigError, match=r"spec differs .* in: spec\.num_samples"):
        run_sweep(load_sweep(spec, ["num_samples=2"]), resume=True)

    outcome = run_sweep(load_sweep(spec), resume=True)
    first, second = started
    assert {r.trial_id: r.status for r in outcome.trials} == {first: "finished", second: "finished"}
    assert len(attempts(outcome.sweep_dir, first)) == 1  # not run again
    runs = attempts(outcome.sweep_dir, second)
    assert len(runs) == 2 and runs[0]["resumed_from"] is None
    assert "step=" in runs[1]["resumed_from"]  # continued from its own checkpoint, not from scratch
    second_record = next(r for r in outcome.trials if r.trial_id == second)
    assert second_record.history[-1][0] == 6

    from orchestrator.sweep.run import child_runs

    children = child_runs(outcome.tracking_uri, "resume", outcome.parent_run_id)
    assert sorted(r.data.tags["speechlm.trial_id"] for r in children) == sorted(started)  # continued, not duplicated
