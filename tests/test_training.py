"""End-to-end training on a local Ray cluster: MLflow tracking, resume, worker failure, bad data.

Each test trains a tiny SALM on the `tiny_demo` assets for a handful of steps with the real driver
(`run_training`), the real Ray Data pipeline and the real Ray Train worker group.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from orchestrator.config import load_experiment
from orchestrator.demo.synthetic_shar import corrupt_shard
from orchestrator.storage import checkpoints
from orchestrator.testing import tiny_training_overrides
from orchestrator.training.driver import run_training

# A hung run fails in minutes instead of holding the whole suite to the global 15-minute timeout.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "salm.yaml"


def train(demo: Path, run_dir: Path, *extra: str, max_steps: int = 6):
    cfg = load_experiment(DEMO_CONFIG, [*tiny_training_overrides(demo, run_dir, max_steps), *extra]).cfg
    return run_training(cfg)


def mlflow_run(run_dir: Path):
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "demo_salm"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "a run directory maps to exactly one MLflow run"
    return client, runs[0]


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_run_writes_metrics_params_and_artifacts_to_mlflow(ray_session, tiny_demo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = train(tiny_demo, run_dir, "trainer.devices=2")
    assert result.ok, result.error
    assert [step for step, _ in checkpoints.list_checkpoints(str(run_dir))] == [3, 6]

    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_steps"] == "6"
    assert run.data.params["model.pretrained_llm"] == str(tiny_demo / "llm")
    assert run.data.tags["speechlm.version"] and run.data.tags["git.commit"]
    assert steps_of(client, run.info.run_id, "loss") == [1, 2, 3, 4, 5, 6]
    assert steps_of(client, run.info.run_id, "val_wer") == [3, 6]
    for key in (
        "lr",
        "grad_norm",
        "audio_seconds_per_sec",
        "tokens_per_sec",
        "padding_fraction",
        "data_wait_fraction",
        "val_loss",
        "val_acc",
        "val_wer_demo_val",
        "data/cuts_read",
    ):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png"} <= artifacts
    assert run.data.tags["speechlm.last_checkpoint"].endswith("step=0000006")
    # A 2-worker (DDP) checkpoint holds every trainable tensor under the model's own (unwrapped) names.
    weights = load_file(str(run_dir / "step=0000006" / "weights.safetensors"))
    assert any(k.startswith("perception.encoder.") for k in weights)
    assert any(k.startswith("llm.model.layers.") for k in weights) and "embed_tokens.weight" in weights


def test_rerun_resumes_at_the_checkpointed_step(ray_session, tiny_demo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train(tiny_demo, run_dir, "trainer.devices=1", max_steps=6).ok
    # The same command with a higher budget: continues from step 6 instead of starting over.
    second = train(tiny_demo, run_dir, "trainer.devices=1", max_steps=9)
    assert second.ok, second.error
    client, run = mlflow_run(run_dir)  # still one MLflow run, continued
    assert steps_of(client, run.info.run_id, "loss") == list(range(1, 10)), "steps 1-6 must not be trained twice"
    assert [step for step, _ in checkpoints.list_checkpoints(str(run_dir))][-1] == 9


def test_resume_if_exists_false_refuses_to_overwrite(ray_session, tiny_demo: Path, tmp_path: Path) -> None:
    from orchestrator.config import ConfigError

    run_dir = tmp_path / "run"
    assert train(tiny_demo, run_dir, "trainer.devices=1", max_steps=3).ok
    with pytest.raises(ConfigError, match=r"resume_if_exists is false but .* already holds checkpoints"):
        train(tiny_demo, run_dir, "trainer.devices=1", "exp_manager.resume_if_exists=false", max_steps=3)


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes of this test session's own cluster (descendants of this process)."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list[int]) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoints.list_checkpoints(str(run_dir)):
        time.sleep(0.2)
    for pid in _train_worker_pids()[-1:]:
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def test_a_killed_worker_is_replaced_and_the_run_reaches_max_steps(
    ray_session, tiny_demo: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(run_dir, killed), daemon=True)
    killer.start()
    result = train(tiny_demo, run_dir, "trainer.devices=2", "exp_manager.max_failures=2", max_steps=24)
    killer.join(timeout=5)
    assert killed, "no worker was killed: the run finished before its first checkpoint was seen"
    assert result.ok, result.error
    assert [step for step, _ in checkpoints.list_checkpoints(str(run_dir))][-1] == 24
    _, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED"


def test_uneven_shards_and_max_epochs_end_cleanly_on_every_rank(ray_session, tiny_demo: Path, tmp_path: Path) -> None:
    # The tiny demo train split has shards of 20 cuts plus a shorter last one, and duration-bucketed batches
    # differ in count per shard: with 2 ranks, one epoch must end on both ranks at the same step (no DDP hang).
    run_dir = tmp_path / "run"
    result = train(tiny_demo, run_dir, "trainer.devices=2", "trainer.max_epochs=1", max_steps=10_000)
    assert result.ok, result.error
    steps = [step for step, _ in checkpoints.list_checkpoints(str(run_dir))]
    assert 0 < steps[-1] < 10_000, "the run must stop when the single epoch runs out"


def test_a_corrupt_shard_is_skipped_and_counted(ray_session, tiny_demo: Path, tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    shutil.copytree(tiny_demo, demo)
    corrupt_shard(demo / "asr" / "train", shard_index=0)
    run_dir = tmp_path / "run"
    result = train(demo, run_dir, "trainer.devices=1", "trainer.max_epochs=1", max_steps=10_000)
    assert result.ok, result.error
    client, run = mlflow_run(run_dir)
    corrupt = sum(m.value for m in client.get_metric_history(run.info.run_id, "data/corrupt_shards"))
    assert corrupt == 1
