"""Exactly-once training data through a driver kill + re-run and a Train worker SIGKILL (issue #17).

A toy model (`orchestrator.testing.cut_counter_entry`) counts, in a buffer saved with its checkpoints, how often
each cut was trained on; a resumed run restores the counts with the weights, so the final checkpoint holds what
the surviving training history consumed. One epoch (`max_epochs=1`) of 16 shards x 6 cuts in batches of 3 over
2 read lanes is 32 batches, 16 steps per rank on 2 workers (an even count: the equal split drops nothing).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator.config import load_experiment
from orchestrator.demo.synthetic_shar import write_synthetic_shar
from orchestrator.storage import checkpoints
from orchestrator.testing import cut_counter_entry
from orchestrator.training.driver import run_training
from speech_models.registry import MODELS, register

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "salm.yaml"
SHARDS, CUTS_PER_SHARD, BATCH = 16, 6, 3
STEPS_PER_EPOCH = SHARDS * CUTS_PER_SHARD // BATCH // 2  # per rank, 2 ranks
CHECKPOINT_EVERY = 3

# A driver in its own process, so the test can SIGKILL it; it joins the test session's Ray cluster.
DRIVER = """
import json, sys
from orchestrator.config import load_experiment
from orchestrator.testing import cut_counter_entry
from orchestrator.training.driver import run_training
from speech_models.registry import register

config, control, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
register(cut_counter_entry(control))
run_training(load_experiment(config, overrides).cfg)
"""


def overrides(shar: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "model.model_type=cut_counter",
        f"model.pretrained_llm={shar.parent / 'llm'}",
        f"data.train_ds.input_cfg.0.shar_path={shar}",
        "data.train_ds.batch_size=3",
        "data.train_ds.batch_duration=null",
        "data.train_ds.use_bucketing=false",
        "data.train_ds.num_workers=2",
        f"data.validation_ds.input_cfg.0.shar_path={shar}",
        "data.validation_ds.batch_size=8",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.max_steps=1000",
        f"trainer.val_check_interval={CHECKPOINT_EVERY}",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "model.lr_scheduler.warmup_steps=1",
        "exp_manager.create_mlflow_logger=false",
        "exp_manager.checkpoint_callback_params.monitor=val_loss",
        "exp_manager.max_failures=2",
        f"exp_manager.explicit_log_dir={run_dir}",
        *extra,
    ]


def wait_for_pause(
    control: Path, timeout: float = 300, driver: subprocess.Popen | None = None, log: Path | None = None
) -> int:
    """The pid of the Train worker that paused at the armed step. A driver process that ended first fails the
    test at once, with the end of its output."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        paused = list(control.glob("paused_*"))
        if paused:
            return int(paused[0].name.split("_")[1])
        if driver is not None and driver.poll() is not None:
            tail = log.read_text()[-4000:] if log else ""
            raise AssertionError(f"the driver exited ({driver.returncode}) before the armed step:\n{tail}")
        time.sleep(0.1)
    raise AssertionError("no Train worker reached the armed step")


def times_trained(run_dir: Path) -> dict[str, int]:
    """cut id -> times trained, from the last checkpoint."""
    latest = checkpoints.latest_checkpoint(str(run_dir))
    counts = load_file(str(Path(latest) / "weights.safetensors"))["times_trained"]
    return {f"cut-{i:06d}": round(float(counts[i])) for i in range(SHARDS * CUTS_PER_SHARD)}


def exactly_once(counts: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """(cuts never trained on, {cut: times} of those trained on more than once)."""
    return sorted(c for c, n in counts.items() if n == 0), {c: n for c, n in counts.items() if n > 1}


@pytest.fixture
def cut_counter(tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    register(cut_counter_entry(control))
    yield control
    MODELS.pop("cut_counter", None)


@pytest.fixture
def shar(tmp_path, tiny_demo) -> Path:
    """The synthetic shards, next to a link to the session's tiny LLM (its tokenizer labels the cuts)."""
    (tmp_path / "llm").symlink_to(tiny_demo / "llm")
    return write_synthetic_shar(tmp_path / "shar", n_cuts=SHARDS * CUTS_PER_SHARD, n_shards=SHARDS, durations=[1.0])


def random_seed() -> int:
    return int(os.environ.get("EXACT_RESUME_SEED", time.time_ns() % 1_000_000))


def test_every_cut_of_an_epoch_is_trained_once_through_a_driver_kill_and_a_worker_kill(
    ray_session, cut_counter, shar, tmp_path
):
    """Before exact resume (shard-granular positions; a restarted worker group re-read from the run's start
    position) this lost or doubled cuts on every seed tried: see bench/README.md, "Exact resume"."""
    seed = random_seed()
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    args = overrides(shar, run_dir)

    # 1. The driver is killed while step `kill_step` trains (after at least one checkpoint), then re-run.
    kill_step = rng.randint(CHECKPOINT_EVERY + 1, 3 * CHECKPOINT_EVERY)
    (cut_counter / f"pause_at_{kill_step}").touch()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(CONFIG), str(cut_counter), json.dumps(args)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_pause(cut_counter, driver=driver, log=log)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    resumed_at = checkpoints.list_checkpoints(str(run_dir))[-1][0]
    for paused in cut_counter.glob("paused_*"):
        paused.unlink()

    # 2. The re-run loses a Train worker (SIGKILL) at a random step after its first checkpoint; Ray Train
    #    replaces the worker group, which restores that checkpoint, inside the same fit().
    worker_kill = rng.randint(CHECKPOINT_EVERY + 1, STEPS_PER_EPOCH - resumed_at - 1)
    (cut_counter / f"pause_at_{worker_kill}").touch()
    killed: list[int] = []

    def kill_paused_worker() -> None:
        pid = wait_for_pause(cut_counter)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_paused_worker, daemon=True)
    killer.start()
    result = run_training(load_experiment(CONFIG, args).cfg)
    killer.join(timeout=5)
    assert result.ok, result.error
    assert killed, "no worker was killed"

    lost, doubled = exactly_once(times_trained(run_dir))
    story = (
        f"seed {seed}: driver killed at step {kill_step}, resumed from step {resumed_at}, worker killed at step "
        f"{resumed_at + worker_kill}: {len(lost)} cuts lost, {sum(n - 1 for n in doubled.values())} extra "
        f"trainings of {len(doubled)} cuts"
    )
    print(story)
    assert not lost and not doubled, story


def test_a_resume_on_another_number_of_workers_trains_every_cut_once(ray_session, cut_counter, shar, tmp_path):
    """2 workers stop at a random step (the batches in flight are dropped with them), 1 worker finishes the epoch.
    Batches are numbered per epoch lane, not per rank, so the world size does not enter the position."""
    seed = random_seed()
    stop = random.Random(seed).randint(CHECKPOINT_EVERY, STEPS_PER_EPOCH - 2)
    run_dir = tmp_path / "run"
    first = run_training(load_experiment(CONFIG, overrides(shar, run_dir, f"trainer.max_steps={stop}")).cfg)
    assert first.ok, first.error
    second = run_training(load_experiment(CONFIG, overrides(shar, run_dir, "trainer.devices=1")).cfg)
    assert second.ok, second.error
    lost, doubled = exactly_once(times_trained(run_dir))
    story = (
        f"seed {seed}: 2 workers stopped at step {stop}, 1 worker finished the epoch: {len(lost)} cuts lost, "
        f"{sum(n - 1 for n in doubled.values())} extra trainings of {len(doubled)} cuts"
    )
    print(story)
    assert not lost and not doubled, story
