"""Both duplex models train through the same Ray pipeline as SALM, on 2 CPU workers, and their validation
metrics (text BLEU and ASR-BLEU scored by a SALM checkpoint in a separate actor) reach MLflow."""

from __future__ import annotations

import shutil
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


def test_duplex_model_trains_on_cached_codes_and_refuses_another_codecs(
    ray_session, tiny_demo: Path, tmp_path: Path
) -> None:
    """Codes cached by `speechlm data add-codes` flow through the Ray pipeline into the model in place of the agent
    audio; codes that another codec made stop the run with the fix named."""
    from orchestrator.data.codes import add_codes
    from speech_models.testing import build_tiny_codec_dir

    data = tmp_path / "s2s"
    shutil.copytree(tiny_demo / "s2s", data, ignore=shutil.ignore_patterns("test"))
    add_codes(str(data), str(tiny_demo / "codec"), workers=1, progress=lambda _: None)
    overrides = [
        *tiny_duplex_overrides(tiny_demo, tmp_path / "run", max_steps=2),
        f"data.train_ds.input_cfg.0.shar_path={data}/train",
        f"data.validation_ds.datasets.demo_val.shar_path={data}/val",
        "trainer.devices=1",
    ]
    result = run_training(load_experiment(CONFIGS / "s2s_duplex.yaml", overrides).cfg)
    assert result.ok, result.error
    client = MlflowClient(f"sqlite:///{tmp_path}/run/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("demo_s2s_duplex").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_audio_loss")] == [1, 2]

    other_codec = build_tiny_codec_dir(tmp_path / "other_codec", seed=1)
    overrides = [
        *overrides,
        f"model.pretrained_audio_codec={other_codec}",
        f"exp_manager.explicit_log_dir={tmp_path}/run2",
    ]
    result = run_training(load_experiment(CONFIGS / "s2s_duplex.yaml", overrides).cfg)
    assert not result.ok
    assert "another codec" in str(result.error) and "speechlm data add-codes" in str(result.error)
