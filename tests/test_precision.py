"""Training precisions on CPU (`trainer.precision`): bf16-true and bf16-mixed train a tiny SALM; modules marked
`keep_fp32` (the mel front end, the audio codec) stay fp32, also when FSDP2 shards the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speech_models.precision import setup_precision
from speech_models.salm import SALM, SALMCollator
from speech_models.testing import build_tiny_llm_dir, tiny_salm_config


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm_dir(tmp_path_factory.mktemp("precision") / "llm")


def train_steps(model: torch.nn.Module, batch: dict, autocast, steps: int = 8) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        with autocast():
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def salm_and_batch(llm_dir: Path):
    from orchestrator.testing import step_batch

    torch.manual_seed(0)
    cfg = tiny_salm_config(llm_dir, prompt_format="plain")
    return SALM(cfg), step_batch(SALMCollator(cfg, None, None), 0, 0)


def test_bf16_true_trains_in_bf16_and_keeps_the_front_end_fp32(llm_dir: Path) -> None:
    model, batch = salm_and_batch(llm_dir)
    autocast = setup_precision(model, "bf16-true", torch.device("cpu"))
    assert model.llm.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.perception.encoder.layers[0].feed_forward1.linear1.weight.dtype == torch.bfloat16
    featurizer = model.perception.preprocessor.featurizer  # keep_fp32: its mel filterbank and window
    assert featurizer.fb.dtype == torch.float32 and featurizer.window.dtype == torch.float32
    losses = train_steps(model, batch, autocast)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5


def test_bf16_mixed_trains_fp32_weights_with_bf16_matmuls(llm_dir: Path) -> None:
    model, batch = salm_and_batch(llm_dir)
    autocast = setup_precision(model, "bf16-mixed", torch.device("cpu"))
    layer = model.llm.model.layers[0].self_attn.q_proj
    dtypes = []
    layer.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    losses = train_steps(model, batch, autocast)
    assert layer.weight.dtype == torch.float32 and dtypes[0] == torch.bfloat16
    assert model.perception.preprocessor.featurizer.fb.dtype == torch.float32
    assert losses[-1] < losses[0] - 0.5


def test_fsdp2_leaves_the_codec_fp32_and_unsharded_and_trains_a_duplex_model(tmp_path: Path) -> None:
    """World size 1 (gloo, in this process): the codec (`keep_fp32`) is no FSDP2 unit and no DTensor, the
    duplex forward encodes the agent audio through it, and a bf16-mixed step trains the sharded rest."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from orchestrator.config.schema import DataConfig
    from orchestrator.training.parallel import shard_model
    from speech_models.duplex_data import DuplexS2SCollator
    from speech_models.duplex_s2s import DuplexS2SModel
    from speech_models.testing import build_tiny_codec_dir, make_duplex_example, tiny_duplex_model_config

    cfg = tiny_duplex_model_config(build_tiny_llm_dir(tmp_path / "llm"), build_tiny_codec_dir(tmp_path / "codec"))
    example = make_duplex_example("a", 1.2, agent_turns=[(0.4, 0.6, "hello there")], user_turns=[(0.0, 0.4, "hi")])
    batch = DuplexS2SCollator(cfg, DataConfig())([example])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DuplexS2SModel(cfg, DataConfig())
        autocast = setup_precision(model, "bf16-mixed", torch.device("cpu"))
        shard_model(model, "bf16-mixed")
        assert all(not isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.audio_codec.parameters())
        assert isinstance(model.lm_head.weight, DTensor)
        losses = train_steps(model, batch, autocast, steps=4)
        assert losses[-1] < losses[0]
    finally:
        dist.destroy_process_group()
