"""`speechlm data estimate-bins` (bins from a sample of a config's data) and `speechlm data plan-batches` (the
largest batch per bucket, measured by training steps on the device; on CPU against a memory budget)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from orchestrator.cli.main import main
from orchestrator.config import load_experiment
from orchestrator.training.batch_planner import _LiveTensorBytes, largest_batch, plan_batches
from speech_models.testing import build_tiny_llm_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny LLM, 30 spoken-ish conversations (tones) and 300 lines of text."""
    out = tmp_path_factory.mktemp("plan")
    build_tiny_llm_dir(out / "llm")
    (out / "audio").mkdir()
    lines = []
    for i in range(30):
        seconds = 0.5 + 0.1 * i
        sf.write(out / "audio" / f"a{i}.wav", np.zeros(round(seconds * 16000), np.float32), 16000)
        lines.append(
            {
                "id": f"c{i}",
                "conversations": [
                    {"from": "User", "type": "audio", "value": f"audio/a{i}.wav", "duration": seconds},
                    {"from": "Assistant", "type": "text", "value": " ".join(["word"] * (1 + i % 7))},
                ],
            }
        )
    (out / "conv.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (out / "text.txt").write_text("".join(" ".join(["the sky is blue"] * (1 + i % 4)) + "\n" for i in range(300)))
    return out


def config_args(data: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "configs" / "demo" / "salm.yaml"),
        f"model.pretrained_llm={data}/llm",
        "model.pretrained_asr=null",  # the tiny random encoder below, not the demo's pretrained one
        "model.perception.encoder.n_layers=1",
        "model.perception.encoder.d_model=32",
        "model.perception.encoder.n_heads=2",
        "model.perception.encoder.subsampling_conv_channels=16",
        f"data.train_ds.input_cfg=[{{type: multimodal_conversation, manifest_filepath: {data}/conv.jsonl, weight: 3}}, "
        f"{{type: txt, paths: {data}/text.txt, weight: 1}}]",
        "+data.train_ds.use_multimodal_sampling=true",
        "+data.train_ds.batch_tokens=400",
        "data.train_ds.token_equivalent_duration=0.08",
        f"data.validation_ds.input_cfg=[{{type: multimodal_conversation, manifest_filepath: {data}/conv.jsonl}}]",
        *extra,
    ]


def test_estimate_bins_prints_token_bins_that_validate(data: Path, capsys) -> None:
    assert main(["data", "estimate-bins", *config_args(data), "--buckets", "4"]) == 0
    out = capsys.readouterr().out
    assert "measured in tokens" in out and "num_buckets: 4" in out
    bins = json.loads(re.search(r"bucket_duration_bins: (\[.*\])", out)[1])
    assert len(bins) == 4 and bins == sorted(bins)
    # What it prints is a valid config, and every example of the sample fits one of its buckets.
    cfg = load_experiment(config_args(data)[0], [*config_args(data)[1:], "data.train_ds.use_bucketing=true",
                                                 f"data.train_ds.bucket_duration_bins={bins}", "data.train_ds.num_buckets=4"]).cfg  # fmt: skip
    assert cfg.data.train_ds.bucket_duration_bins == bins
    assert main(["data", "estimate-bins", *config_args(data), "--buckets", "2", "--sub-buckets", "2"]) == 0
    pairs = json.loads(re.search(r"bucket_duration_bins: (\[.*\])", capsys.readouterr().out)[1])
    assert all(len(p) == 2 for p in pairs) and len({p[0] for p in pairs}) == 2


def test_the_batch_search_finds_the_largest_size_within_the_budget() -> None:
    steps: list[int] = []

    def linear(size: int) -> int | None:  # 100 MB of weights + 7 MB per example; nothing above 3000 MB fits at all
        steps.append(size)
        peak = 100 + 7 * size
        return None if peak > 3000 else peak

    assert largest_batch(linear, budget=1000, max_batch_size=4096) == (128, 996)
    assert len(steps) <= 6, steps  # the measured peaks predict the answer: few steps
    assert largest_batch(linear, budget=50) == (0, 0)
    assert largest_batch(linear, budget=10**9, max_batch_size=64) == (64, 548)


def test_live_tensor_bytes_follow_the_batch() -> None:
    import torch

    layer = torch.nn.Linear(64, 256)
    peaks = []
    for batch in (8, 64, 512):
        with _LiveTensorBytes() as tracker:
            layer(torch.randn(batch, 64)).relu().sum().backward()
        peaks.append(tracker.peak)
    assert peaks[0] < peaks[1] < peaks[2]
    assert peaks[2] >= 512 * 256 * 4  # at least the activation


def test_plan_batches_on_cpu_gives_smaller_batches_to_longer_buckets(data: Path) -> None:
    cfg = load_experiment(config_args(data)[0], config_args(data)[1:]).cfg
    plan = plan_batches(cfg, device="cpu", memory_gb=0.06, bins=[40, 120], max_batch_size=64, threshold=0.1)
    (short, long) = plan.buckets
    assert 1 <= long.batch_size < short.batch_size <= 64
    assert all(b.peak_bytes <= 0.06 * 2**30 for b in plan.buckets)
    bins, sizes = plan.final()
    assert bins == [40, 120] and sizes == [short.batch_size, long.batch_size]
    assert "bucket_batch_size: [" in plan.format()
