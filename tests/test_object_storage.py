"""Object storage: Shar shards read from, checkpoints written to and resumed from an S3-compatible server.

The server is moto's standalone one on 127.0.0.1 (real HTTP, real boto/s3fs/pyarrow clients). Only the
pytest process (the driver) sets AWS_ENDPOINT_URL: the session Ray cluster was started without it, so the
test also proves that the endpoint reaches Ray processes through the objects the driver hands them
(`storage_filesystem`, the read plan's storage options), not through their environment.
"""

from __future__ import annotations

import pickle
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config import load_experiment
from orchestrator.storage import checkpoints, filesystems
from orchestrator.testing import tiny_training_overrides

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "salm.yaml"
FAKE_ENV = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "AWS_ACCESS_KEY_ID": "minio",
    "AWS_SECRET_ACCESS_KEY": "minio123",
    "AWS_DEFAULT_REGION": "eu-west-1",
}


# ------------------------------------------------------------------------------------------- unit tests


def test_custom_endpoint_becomes_explicit_fsspec_options() -> None:
    options = filesystems.fsspec_options(FAKE_ENV)
    assert options["s3"] == {
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "key": "minio",
        "secret": "minio123",
    }
    # The service-specific variable wins, as in botocore.
    env = {**FAKE_ENV, "AWS_ENDPOINT_URL_S3": "http://minio:9000"}
    assert filesystems.fsspec_options(env)["s3"]["endpoint_url"] == "http://minio:9000"
    # Plain AWS: nothing spelled out, every process uses its own credential chain (instance profile, ...).
    assert filesystems.fsspec_options({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}) == {}


def test_pyarrow_filesystem_survives_pickling_with_the_endpoint() -> None:
    fs, inner = filesystems.pyarrow_filesystem("s3://bucket/runs/a/", FAKE_ENV)
    assert inner == "bucket/runs/a"
    # What a Ray worker without the env receives:
    (kwargs,) = pickle.loads(pickle.dumps(fs)).__reduce__()[1]
    assert kwargs["endpoint_override"] == "http://127.0.0.1:9000"
    assert kwargs["scheme"] == "http"
    assert (kwargs["access_key"], kwargs["secret_key"], kwargs["region"]) == ("minio", "minio123", "eu-west-1")


def test_storage_filesystem_and_urls_round_trip() -> None:
    assert filesystems.storage_filesystem("/data/runs") == (None, "/data/runs")
    assert filesystems.to_url("bucket/run/step=0000003", "s3://bucket/run") == "s3://bucket/run/step=0000003"
    assert filesystems.to_url("/local/run/step=1", "/local/run") == "/local/run/step=1"
    assert filesystems.to_url(None, "s3://bucket/run") is None


# ------------------------------------------------------------------------------------ S3 server tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free local port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with the driver's env pointing at the server; yields s3://bucket."""
    import boto3
    import fsspec

    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    bucket = f"speechlm-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # no client bound to an earlier server
    return f"s3://{bucket}"


def upload_dir(local: Path, url: str) -> None:
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def test_shards_are_listed_and_read_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    from orchestrator.data.shar import discover_dir, read_shard
    from orchestrator.demo.synthetic_shar import write_synthetic_shar

    shar = write_synthetic_shar(tmp_path / "shar", n_cuts=6, n_shards=2, with_target_audio=True)
    upload_dir(shar, f"{s3_bucket}/s2s")
    local, remote = discover_dir(str(shar)), discover_dir(f"{s3_bucket}/s2s")
    assert [sorted(s.fields) for s in remote] == [["recording", "target_audio"]] * 2
    assert remote[1].cuts == f"{s3_bucket}/s2s/cuts.000001.jsonl.gz"
    # As a read task does it: endpoint and credentials passed in, not taken from the env.
    options = filesystems.fsspec_options()
    for here, there in zip(local, remote, strict=True):
        from_s3 = read_shard(there, storage_options=options)
        assert [(c.id, c.audio) for c in from_s3] == [(c.id, c.audio) for c in read_shard(here)]


def test_checkpoints_are_listed_on_s3(s3_bucket: str) -> None:
    """What decide_resume sees: complete step=N dirs (complete.json last), oldest first, as s3:// URLs."""
    import fsspec

    fs = fsspec.filesystem("s3")
    run = f"{s3_bucket}/runs/a"
    for step in (30, 6):
        fs.pipe(f"{run}/step={step:07d}/state.json", b'{"format_version": 2, "step": %d}' % step)
        checkpoints.mark_complete(f"{run}/step={step:07d}")
    fs.pipe(f"{run}/step=0000040/model.safetensors", b"an upload cut short: no state.json")
    fs.pipe(f"{run}/step=0000050/state.json", b'{"format_version": 2, "step": 50}')  # no complete.json yet
    assert checkpoints.list_checkpoints(run) == [(6, f"{run}/step=0000006"), (30, f"{run}/step=0000030")]
    assert checkpoints.latest_checkpoint(run) == f"{run}/step=0000030"
    assert checkpoints.latest_checkpoint(f"{s3_bucket}/runs/none") is None
    assert filesystems.exists(run) and not filesystems.exists(f"{s3_bucket}/runs/none")


@pytest.mark.integration
def test_train_reads_shar_and_checkpoints_on_s3_then_resumes(
    ray_session, s3_bucket: str, tiny_demo: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from orchestrator.training.driver import decide_resume, run_training

    for split in ("train", "val"):
        upload_dir(tiny_demo / "asr" / split, f"{s3_bucket}/demo/asr/{split}")
    run_dir = f"{s3_bucket}/runs/salm"
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"

    def config(max_steps: int):
        overrides = [
            *tiny_training_overrides(tiny_demo, run_dir, max_steps),
            f"data.train_ds.input_cfg.0.shar_path={s3_bucket}/demo/asr/train",
            f"data.validation_ds.input_cfg.0.shar_path={s3_bucket}/demo/asr/val",
            f"exp_manager.mlflow_logger_kwargs.tracking_uri={tracking_uri}",
            "trainer.devices=1",
        ]
        return load_experiment(DEMO_CONFIG, overrides).cfg

    first = run_training(config(max_steps=3))
    assert first.ok, first.error
    assert first.last_checkpoint == f"{run_dir}/step=0000003"
    assert [step for step, _ in checkpoints.list_checkpoints(run_dir)] == [3]

    second_cfg = config(max_steps=6)
    assert decide_resume(second_cfg, run_dir) == f"{run_dir}/step=0000003"
    second = run_training(second_cfg)
    assert second.ok, second.error
    assert [step for step, _ in checkpoints.list_checkpoints(run_dir)] == [3, 6]
    assert second.last_checkpoint == f"{run_dir}/step=0000006"
    assert second.metrics["step"] == 6

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo_salm").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == [1, 2, 3, 4, 5, 6], "the second run must continue at step 3, not start over"
