"""`ray job submit --working-dir . -- python -m orchestrator train ...` against a running, token-protected head.

The head is a real `ray start --head --block` in its own process group, with its own temp dir and free ports,
so it cannot collide with the session's Ray (the `ray_session` fixture) or with anyone else's on the machine.
Teardown ends that process group; `ray stop` is never used because it stops every Ray on the machine.
The test process only talks to the head through the job CLI, as a user would.

Token auth as Ray 2.60 has it: with RAY_AUTH_MODE=token the head, every driver and worker, and every client
need the same token, from RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. The test
uses RAY_AUTH_TOKEN with a fresh random token so it never reads or writes ~/.ray.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.testing import tiny_training_overrides

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 180  # generous: the head starts in ~10 s on an idle machine, much longer on a loaded one


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT, the job server
    env: dict[str, str]  # a client environment that holds the token
    log: Path

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], cwd=ROOT, env=env or self.env, capture_output=True, text=True, timeout=timeout
        )


def client_env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    env["PYTHONUNBUFFERED"] = "1"
    if token is None:
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[Head]:
    token = secrets.token_hex(32)
    env = client_env(token)
    # Short path: Ray's unix sockets live under the temp dir, and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjob-", dir="/tmp"))
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(9)
    log = temp_dir / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                RAY, "start", "--head", "--block", "--num-cpus=4", "--include-dashboard=true",
                f"--temp-dir={temp_dir}", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
                "--disable-usage-stats",
            ],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    head = Head(f"http://127.0.0.1:{dashboard}", env, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if head.ray("job", "list", "--address", head.dashboard, timeout=60).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield head
    finally:
        # `ray start --block` and everything it spawned (GCS, raylet, dashboard, workers) share its session.
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Keep the logs for a post-mortem (pytest keeps the last few tmp_path dirs), drop sockets and spill files.
        with contextlib.suppress(shutil.Error, OSError):
            shutil.copytree(
                temp_dir,
                tmp_path / "ray-head",
                ignore=shutil.ignore_patterns("sockets", "runtime_resources"),
                symlinks=True,
                dirs_exist_ok=True,
            )
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_trains_and_logs_to_mlflow(ray_head: Head, tiny_demo: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    # The head really demands the token: a client without it is turned away.
    refused = ray_head.ray("job", "list", "--address", ray_head.dashboard, env=client_env(None))
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [
        *tiny_training_overrides(tiny_demo, tmp_path / "run", max_steps=3),
        "trainer.devices=1",
        f"exp_manager.mlflow_logger_kwargs.tracking_uri={tracking_uri}",
    ]
    runtime_env = (
        '{"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}'
    )
    submitted = ray_head.ray(
        "job", "submit", "--address", ray_head.dashboard, "--submission-id", "speechlm-test-train",
        "--working-dir", ".", "--runtime-env-json", runtime_env,
        "--", "python", "-m", "orchestrator", "train", "configs/demo/salm.yaml", *overrides,
        timeout=600,
    )  # fmt: skip
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-5000:]
    assert "training finished" in output, output[-5000:]

    status = ray_head.ray("job", "status", "--address", ray_head.dashboard, "speechlm-test-train")
    assert "succeeded" in (status.stdout + status.stderr).lower()

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo_salm").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_wer")] == [3]
    assert run.data.tags["speechlm.last_checkpoint"].endswith("step=0000003")
