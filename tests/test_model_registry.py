"""A model is one registry entry: the README's toy model trains through the real pipeline, and nothing outside
its entry knows its name."""

from __future__ import annotations

import re
import subprocess
import types
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_experiment
from orchestrator.config.checks import produced_metrics
from orchestrator.testing import tiny_training_overrides
from speech_models.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "salm.yaml"


def readme_toy_model() -> types.ModuleType:
    """The README's "Add a model" code block, run as a module of its own (it registers `word_counter`).

    The module is not in sys.modules, so Ray pickles its classes by value into the workers and read tasks.
    """
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Add a model") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("readme_toy_model")
    exec(compile(code, "README.md#add-a-model", "exec"), module.__dict__)
    return module


@pytest.fixture
def word_counter():
    readme_toy_model()
    yield MODELS["word_counter"]
    MODELS.pop("word_counter", None)


def test_no_orchestrator_module_branches_on_a_model_name():
    found = subprocess.run(
        ["grep", "-rnE", '"(salm|duplex_s2s[a-z_]*)"', "orchestrator/"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert found == ""


def test_speech_models_does_not_import_the_orchestrator():
    found = subprocess.run(
        ["grep", "-rnE", r"^\s*(from|import) orchestrator", "speech_models/"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert found == ""


def test_a_registered_model_is_validated_against_its_own_metrics(word_counter, tiny_demo, tmp_path):
    overrides = [*tiny_training_overrides(tiny_demo, tmp_path / "run"), "model.model_type=word_counter"]
    with pytest.raises(ConfigError, match="monitor: 'val_wer' is not a metric this run reports"):
        load_experiment(CONFIG, overrides)  # the demo config monitors WER, which a word counter never reports
    cfg = load_experiment(CONFIG, [*overrides, "exp_manager.checkpoint_callback_params.monitor=val_loss"]).cfg
    assert produced_metrics(cfg) == ["val_loss"]
    with pytest.raises(ConfigError, match=r"model\.model_type: 'word_countr' is not a registered model.*word_counter"):
        load_experiment(CONFIG, [*overrides, "model.model_type=word_countr"])


@pytest.mark.integration
def test_the_readme_toy_model_trains_two_steps_on_ray(ray_session, word_counter, tiny_demo, tmp_path):
    from mlflow import MlflowClient

    from orchestrator.storage.checkpoints import list_checkpoints
    from orchestrator.training.driver import run_training

    run_dir = tmp_path / "run"
    overrides = [
        *tiny_training_overrides(tiny_demo, run_dir, max_steps=2),
        "model.model_type=word_counter",
        "exp_manager.checkpoint_callback_params.monitor=val_loss",
        "model.optimizer.lr=0.05",
    ]
    result = run_training(load_experiment(CONFIG, overrides).cfg)
    assert result.ok, result.error
    assert [step for step, _ in list_checkpoints(str(run_dir))] == [2]
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["speechlm.model_type"] == "word_counter"
    losses = [m.value for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert len(losses) == 2 and all(v > 0 for v in losses)
    assert client.get_metric_history(result.mlflow_run_id, "val_loss")
