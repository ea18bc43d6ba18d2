"""The demo recipe learns because it starts from pretrained parts: the same short run of configs/demo/salm.yaml
from the shipped parts and from random weights, side by side (a regression in the learning path fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.loader import load_experiment
from orchestrator.training.driver import run_training

REPO = Path(__file__).resolve().parents[1]
DEMO_SALM = REPO / "configs" / "demo" / "salm.yaml"
STEPS = 500  # the first 500 steps of the demo's 1500-step schedule (its learning rate is still high there)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def demo_speech(tmp_path_factory) -> Path:
    """The demo's own speech set size (1 h of train, 68 val cuts): about 20 s to synthesise. Less data (0.25 h)
    lets the whole-LLM recipe memorise the training sentences instead of learning to listen."""
    from orchestrator.demo.assets import make_demo_assets

    out = tmp_path_factory.mktemp("recipe_demo")
    make_demo_assets(out, hours=1.0, s2s_hours=0.005, progress=False)
    return out


def _short_run(demo_speech: Path, tmp_path: Path, name: str, *extra: str) -> float:
    overrides = [
        f"name={name}",
        f"exp_manager.explicit_log_dir={tmp_path / name}",
        f"data.train_ds.input_cfg.0.shar_path={demo_speech / 'asr' / 'train'}",
        f"data.validation_ds.input_cfg.0.shar_path={demo_speech / 'asr' / 'val'}",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "model.lr_scheduler.max_steps=1500",
        "exp_manager.create_mlflow_logger=false",
        *extra,
    ]
    result = run_training(load_experiment(DEMO_SALM, overrides).cfg)
    assert result.ok, result.error
    return float(result.metrics["val_wer"])


def test_pretrained_parts_learn_to_transcribe_where_random_ones_do_not(ray_session, demo_speech, tmp_path, capsys):
    from orchestrator.cli.main import main

    pretrained = _short_run(demo_speech, tmp_path, "from_pretrained")
    random_init = _short_run(demo_speech, tmp_path, "from_random", "model.pretrained_weights=false")
    with capsys.disabled():
        print(
            f"\nval WER after {STEPS} steps: from the pretrained parts {pretrained:.3f}, from random {random_init:.3f}"
        )
    assert pretrained < 0.35
    assert pretrained < 0.4 * random_init

    # What `make demo` ends with: the checkpoint transcribes a new sentence in a voice no split has.
    wav = sorted((demo_speech / "asr" / "new_voice_wav").glob("*.wav"))[0]
    capsys.readouterr()
    assert main(["infer", str(tmp_path / "from_pretrained"), str(wav)]) == 0
    transcript = capsys.readouterr().out
    with capsys.disabled():
        print(f"infer {wav.name}: said {wav.with_suffix('.txt').read_text().strip()!r}; heard: {transcript.strip()}")
    assert transcript.strip()
