"""A driver killed with -9 while a checkpoint is being written: the re-run resumes from the previous complete
checkpoint, never from the half-written one (issue 17). Integration: two real `python -m orchestrator train`
runs on a local Ray cluster of their own.

The kill lands mid-write deterministically: the step-6 checkpoint's weights file is made a FIFO beforehand, so
the upload blocks inside it (after its first bytes) until the test has killed the driver.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.storage import checkpoints
from orchestrator.testing import tiny_training_overrides

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo" / "salm.yaml"
TIMEOUT_S = 600


def _train_command(demo: Path, run_dir: Path) -> list[str]:
    overrides = [*tiny_training_overrides(demo, run_dir, max_steps=6), "trainer.devices=1"]
    return [sys.executable, "-m", "orchestrator", "train", str(DEMO_CONFIG), *overrides]


def _wait_for_bytes(reader: int, driver: subprocess.Popen) -> bytes:
    """The first bytes the checkpoint upload writes into the FIFO (it then blocks: nobody drains it)."""
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and driver.poll() is None:
        with contextlib.suppress(BlockingIOError):  # a writer is connected but has not written yet
            data = os.read(reader, 4096)
            if data:
                return data
        time.sleep(0.2)
    return b""


@pytest.mark.integration
def test_kill_9_of_the_driver_during_a_checkpoint_write_resumes_from_the_previous_one(
    tiny_demo: Path, tmp_path: Path
) -> None:
    import psutil

    run_dir = tmp_path / "run"
    blocked = run_dir / "step=0000006" / checkpoints.WEIGHTS_FILE
    blocked.parent.mkdir(parents=True)
    os.mkfifo(blocked)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        driver = subprocess.Popen(
            _train_command(tiny_demo, run_dir), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    reader = os.open(blocked, os.O_RDONLY | os.O_NONBLOCK)
    started: list[psutil.Process] = []
    try:
        written = _wait_for_bytes(reader, driver)
        assert written, f"the run never reached its step-6 checkpoint write:\n{first_log.read_text()[-3000:]}"
        started = psutil.Process(driver.pid).children(recursive=True)  # its Ray cluster: ours to clean up
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
        for proc in started:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(started, timeout=30)
        os.close(reader)
    blocked.unlink()  # the partial weights; the other files of step 6 stay as the kill left them

    assert (run_dir / "step=0000003" / checkpoints.COMPLETE_FILE).is_file()
    assert not (run_dir / "step=0000006" / checkpoints.COMPLETE_FILE).exists()
    assert [step for step, _ in checkpoints.list_checkpoints(str(run_dir))] == [3]

    second = subprocess.run(
        _train_command(tiny_demo, run_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert f"resuming from {run_dir}/step=0000003" in output
    assert "resumed from checkpoint at step 3" in output
    assert [step for step, _ in checkpoints.list_checkpoints(str(run_dir))] == [3, 6]
    checkpoints.require_complete(str(run_dir / "step=0000006"))
