"""Off the training ranks' critical path: checkpoints uploaded in Ray Train's background thread
(`exp_manager.checkpoint_callback_params.async_save`) and validation as a Ray task of its own on each
checkpoint (`trainer.async_validation`), with the real driver, loop and data pipeline on 2 CPU workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import load_experiment
from orchestrator.storage import checkpoints
from orchestrator.testing import tiny_training_overrides
from orchestrator.training.driver import run_training

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "salm.yaml"


def test_async_upload_and_validation_beside_training(ray_session, tiny_demo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_training_overrides(tiny_demo, run_dir, max_steps=4),
        "trainer.val_check_interval=2",
        "trainer.async_validation=true",
        "exp_manager.checkpoint_callback_params.async_save=true",
        "trainer.devices=2",
    ]
    result = run_training(load_experiment(DEMO_CONFIG, overrides).cfg)
    assert result.ok, result.error

    # every checkpoint is complete (both ranks' uploads waited for in storage, not with a collective) and holds
    # the metrics of the validation that ran on it after it was written
    assert [step for step, _ in checkpoints.list_checkpoints(str(run_dir))] == [2, 4]
    for step in (2, 4):
        path = run_dir / f"step={step:07d}"
        assert {"uploaded.rank0", "uploaded.rank1"} <= {p.name for p in path.iterdir()}
        validated = json.loads((path / checkpoints.VALIDATION_FILE).read_text())
        assert validated["step"] == step and "val_wer" in validated
        assert checkpoints.read_saved_state(str(path))["metrics"]["val_wer"] == validated["val_wer"]

    # MLflow has the validation metrics at their steps; the best checkpoint is ranked by them
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    history = client.get_metric_history(result.mlflow_run_id, "val_wer")
    assert sorted(m.step for m in history) == [2, 4]
    assert result.best_checkpoint is not None
    assert checkpoints.pick_checkpoint(str(run_dir), "best", "val_wer", "min") is not None
