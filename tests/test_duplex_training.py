"""Both duplex models train through the same Ray pipeline as SALM, on 2 CPU workers, and their validation
metrics (text BLEU and ASR-BLEU scored by a SALM checkpoint in a separate actor) reach MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import load_experiment
from orchestrator.testing import tiny_duplex_overrides, tiny_training_overrides
from orchestrator.training.driver import run_training

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


@pytest.fixture(scope="module")
def salm_checkpoint_run(ray_session, tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained SALM run to serve as `scoring_asr` (its latest checkpoint is used)."""
    run_dir = tmp_path_factory.mktemp("scoring_salm") / "run"
    overrides = [*tiny_training_overrides(tiny_demo, run_dir, max_steps=2), "trainer.devices=1"]
    assert run_training(load_experiment(CONFIGS / "salm.yaml", overrides).cfg).ok
    return run_dir


@pytest.mark.parametrize(
    ("config", "experiment"),
    [("s2s_duplex.yaml", "demo_s2s_duplex"), ("s2s_duplex_speech_decoder.yaml", "demo_s2s_duplex_speech_decoder")],
)
def test_duplex_model_trains_on_two_workers_and_reports_asr_bleu(
    salm_checkpoint_run: Path, tiny_demo: Path, tmp_path: Path, config: str, experiment: str
) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_duplex_overrides(tiny_demo, run_dir, max_steps=4),
        "trainer.devices=2",
        f"model.scoring_asr={salm_checkpoint_run}",
        "exp_manager.checkpoint_callback_params.monitor=val_asr_bleu",
        "exp_manager.checkpoint_callback_params.mode=max",
    ]
    result = run_training(load_experiment(CONFIGS / config, overrides).cfg)
    assert result.ok, result.error

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = {
        key: client.get_metric_history(run.info.run_id, key)
        for key in (
            "loss",
            "text_loss",
            "audio_loss",
            "val_loss",
            "val_text_loss",
            "val_audio_loss",
            "val_audio_acc",
            "val_txt_bleu",
            "val_asr_bleu",
            "val_asr_bleu_demo_val",
        )
    }
    assert all(history.values()), {k: len(v) for k, v in history.items()}
    assert [m.step for m in sorted(history["val_asr_bleu"], key=lambda m: m.step)] == [2, 4]
    # The total is the configured mix of its parts (both weights are 1 in the demo configs).
    for parts in ("", "val_"):
        for total, text, audio in zip(
            *(history[f"{parts}{key}"] for key in ("loss", "text_loss", "audio_loss")), strict=True
        ):
            assert total.value == pytest.approx(text.value + audio.value, rel=1e-4)
