"""Shared fixtures: one local Ray cluster per test session, offline Hugging Face, marker handling."""

from __future__ import annotations

import os
import signal

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# MLflow 3.13+ refuses a plain file store; tests use sqlite, but keep stray file stores from erroring.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
# Ray 2.60 token auth for local clusters: tests drive local clusters only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread: the CPU tier runs tiny models, where thread contention costs more than it gives."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests on machines without CUDA instead of failing them."""
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster started once for the whole test session.

    num_cpus is larger than the machine's 2 cores on purpose: Train workers take fractional CPUs and Ray Data
    tasks need logical CPUs to be scheduled at all; the OS shares the real cores.
    """
    import ray

    # A suite started in the background by a non-interactive shell (`pytest ... &`) inherits SIGINT ignored, and
    # so would every Ray process it starts; `ray.cancel` interrupts a running task with SIGINT, so cancellations
    # would never land. A Python handler here is reset to the default in the processes Ray execs.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory):
    """Demo assets at toy scale (a few minutes of eSpeak speech, tiny LLM), made once per test session.

    Layout as `speechlm data demo`: llm/, asr/{train,val,test}/, s2s/{train,val,test}/. Shards of 20 cuts so
    multi-shard behaviour (shuffling, uneven splits, corruption) is exercised.
    """
    from orchestrator.demo.assets import make_demo_assets

    out = tmp_path_factory.mktemp("tiny_demo")
    make_demo_assets(out, hours=0.04, s2s_hours=0.03, min_heldout_cuts=12, shard_size=20, progress=False)
    return out
