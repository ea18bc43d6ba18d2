"""Sweeps end to end through `python -m orchestrator sweep` on tiny demo data: each trial is a Ray Train run.

The command runs in a subprocess with its own local Ray (not the session fixture): a sweep's Ray gets a worker
setup hook, and Ctrl-C is part of the test. One sweep, run once for the module (trials are the slow part): a
grid over four optimizer presets on the demo SALM, in trial order
- fast: learns; finishes;
- broken: `capturable: true`, which AdamW accepts when built (so the spec validates) but refuses at its first
  step on CPU, so its Train run fails: recorded as failed, and the sweep goes on;
- frozen: lr 0 keeps the initial loss, the worst at the first validation: ASHA stops it there;
- fast_wd: like fast; the `speechlm sweep` process is interrupted (SIGINT, as Ctrl-C) after its first
  validation, and `--resume` continues it from its own checkpoint without re-running the others.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_experiment
from orchestrator.demo.assets import make_demo_assets

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]  # each trial starts Ray Train: minutes in all

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


def attempts(sweep_dir: str | Path, trial_id: str) -> list[dict]:
    path = Path(sweep_dir) / "trials" / f"{trial_id}.attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


PRESETS = {
    "fast": optimizer(3e-3),
    "broken": {**optimizer(3e-3), "capturable": True},
    "frozen": optimizer(0.0),
    "fast_wd": {**optimizer(3e-3), "weight_decay": 1e-4},
}


def run_cli(args: list[str], interrupt: bool = False, timeout: float = 1500) -> tuple[int, str]:
    """`python -m orchestrator ARGS` with its own local Ray (the sweep's worker setup hook needs its own
    ray.init). interrupt: SIGINT (Ctrl-C) once the fast_wd trial has validated at step 2 (a checkpoint)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    target = None  # the trial id of the fast_wd preset, from its "[sweep] trial ID started: ..." line
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            output.append(line)
            if "[sweep] trial " in line and "started: " in line and "model.optimizer=fast_wd" in line:
                target = line.split("[sweep] trial ", 1)[1].split()[0]
            if interrupt and target and f"[sweep] trial {target} step 2:" in line:
                proc.send_signal(signal.SIGINT)
                interrupt = False
            assert time.monotonic() < deadline, "sweep too slow:\n" + "".join(output[-80:])
        returncode = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return returncode, "".join(output)


def results(sweep_dir: Path) -> dict[str, dict]:
    """results.csv by optimizer preset."""
    with (sweep_dir / "results.csv").open() as f:
        return {row["model.optimizer"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def swept(assets, tmp_path_factory):
    """`speechlm sweep` interrupted (SIGINT) once its last trial validated at step 2, then `--resume`."""
    directory = tmp_path_factory.mktemp("sweeps")
    spec = write_spec(directory, assets, "asha_resume", PRESETS, {"type": "asha", "grace_period": 2}, max_steps=6)
    code, first = run_cli(["sweep", str(spec)], interrupt=True)
    sweep_lines = "".join(
        line for line in first.splitlines(keepends=True) if "[sweep]" in line or "Stop signal" in line
    )
    assert code == 1, sweep_lines + first[-3000:]  # 1: interrupted

    code, again = run_cli(["sweep", str(spec)])
    assert code == 2 and "pass --resume to continue it" in again, again[-3000:]
    code, changed = run_cli(["sweep", str(spec), "num_samples=2", "--resume"])
    assert code == 2 and "spec differs" in changed and "spec.num_samples" in changed, changed[-3000:]

    code, resumed = run_cli(["sweep", str(spec), "--resume"])
    assert code == 0, resumed[-6000:]
    sweep_dir = directory / "asha_resume"
    trial_ids = {row["model.optimizer"]: row["trial"] for row in results(sweep_dir).values()}
    return sweep_dir, trial_ids, first, resumed


def test_failing_trial_is_recorded_and_asha_stops_the_weakest(swept):
    sweep_dir, _, _, resumed = swept
    rows = results(sweep_dir)
    assert rows["fast"]["status"] == "finished" and rows["fast"]["last_step"] == "6"
    assert rows["broken"]["status"] == "failed" and "capturable=True" in rows["broken"]["error"]
    # lr 0 keeps the initial loss, worse than every learning trial at the first rung: ASHA stops it there.
    assert rows["frozen"]["status"] == "early_stopped" and rows["frozen"]["last_step"] == "2"
    table = (sweep_dir / "results.md").read_text()
    ranked = [line.split("|")[2].strip() for line in table.splitlines()[4:]]
    assert ranked[-1] == rows["broken"]["trial"]  # no metric: ranked last
    assert "finished in" in resumed and "1 failed" in resumed and "best config:" in resumed

    best = load_experiment(sweep_dir / "best_config.yaml").cfg
    assert best.model.optimizer["lr"] == pytest.approx(3e-3) and best.exp_manager.name == "asha_resume_best"
    assert (sweep_dir / "sweep_comparison.png").stat().st_size > 10_000


def test_mlflow_has_one_parent_and_a_child_per_trial_with_status(swept):
    import mlflow

    sweep_dir, trial_ids, _, _ = swept
    client = mlflow.MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("asha_resume")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("speechlm.kind") == "sweep"]  # resume continued it
    assert parent.info.status == "FINISHED"
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_spec.yaml", "best_config.yaml", "results.md", "sweep_comparison.png"} <= parent_files
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == len(PRESETS)  # the resumed trial continued its own run
    assert {r.data.tags["speechlm.trial_id"] for r in children} == set(trial_ids.values())
    status = {r.data.tags["sweep.model.optimizer"]: r.data.tags["speechlm.trial_status"] for r in children}
    assert {k: status[k] for k in ("fast", "broken", "frozen")} == {
        "fast": "finished",
        "broken": "failed",
        "frozen": "early_stopped",
    }
    assert status["fast_wd"] in ("finished", "early_stopped")
    state = {r.data.tags["sweep.model.optimizer"]: r.info.status for r in children}
    assert state["broken"] == "FAILED" and state["fast"] == state["frozen"] == "FINISHED"
    lrs = {r.data.tags["sweep.model.optimizer"]: float(r.data.params["model.optimizer.lr"]) for r in children}
    assert lrs == {"fast": 3e-3, "broken": 3e-3, "frozen": 0.0, "fast_wd": 3e-3}  # swept values are params
    fast = next(r for r in children if r.data.tags["sweep.model.optimizer"] == "fast")
    assert [m.step for m in client.get_metric_history(fast.info.run_id, "val_loss")] == [2, 4, 6]


def test_resume_keeps_finished_trials_and_continues_the_interrupted_one(swept):
    sweep_dir, trial_ids, interrupted, _ = swept
    assert "INTERRUPTED" in interrupted and "--resume" in interrupted
    for preset in ("fast", "broken", "frozen"):
        assert len(attempts(sweep_dir, trial_ids[preset])) == 1, f"{preset} ran again"
    runs = attempts(sweep_dir, trial_ids["fast_wd"])
    assert len(runs) == 2 and runs[0]["resumed_from"] is None
    assert "step=" in runs[1]["resumed_from"]  # continued from its own checkpoint, not from scratch
    row = results(sweep_dir)["fast_wd"]
    assert row["status"] in ("finished", "early_stopped") and int(row["last_step"]) >= 4
