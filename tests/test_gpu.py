"""The GPU path. `gpu`-marked tests (skipped without CUDA): a DDP step, bf16 training and FSDP2 with world size 1
on one GPU (NCCL). Unmarked: `bench/gpu.py --dry-run` at tiny shapes, so the GPU benchmark cannot rot between
the runs that have a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run_runs_on_torch_transformers_peft_only() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| plain |" in out.stdout and "| activation checkpointing |" in out.stdout
    assert "tokens/s" in out.stdout and "MFU" in out.stdout
    assert "imports: torch, transformers, peft" in out.stdout  # the script checks it imported no Ray/lhotse/MLflow


@pytest.fixture
def cuda_group(tmp_path: Path):
    """A one-process NCCL group on GPU 0 (what a Ray Train worker has, at world size 1)."""
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield torch.device("cuda", 0)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def salm_parts(tmp_path_factory: pytest.TempPathFactory):
    from orchestrator.testing import step_batch
    from speech_models.salm import SALMCollator
    from speech_models.testing import build_tiny_llm_dir, tiny_salm_config

    cfg = tiny_salm_config(build_tiny_llm_dir(tmp_path_factory.mktemp("gpu") / "llm"), prompt_format="plain")
    return cfg, step_batch(SALMCollator(cfg, None, None), 0, 0)


def train(model, batch, autocast, steps: int = 6) -> list[float]:
    from orchestrator.training.loop import clip_gradients
    from orchestrator.training.worker_io import to_device

    device = next(model.parameters()).device
    batch = to_device(batch, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        with autocast():
            loss = model(batch)["loss"]
        loss.backward()
        clip_gradients([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def build(cfg, device, precision: str):
    from speech_models.precision import setup_precision
    from speech_models.salm import SALM

    torch.manual_seed(0)
    model = SALM(cfg).to(device)
    return model, setup_precision(model, precision, device)


@pytest.mark.gpu
def test_cuda_ddp_step(cuda_group, salm_parts) -> None:
    cfg, batch = salm_parts
    model, autocast = build(cfg, cuda_group, "32")
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0], broadcast_buffers=False)
    losses = train(ddp, batch, autocast)
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_cuda_bf16_training(salm_parts, precision: str) -> None:
    cfg, batch = salm_parts
    model, autocast = build(cfg, torch.device("cuda", 0), precision)
    assert model.perception.preprocessor.featurizer.fb.dtype == torch.float32  # keep_fp32
    losses = train(model, batch, autocast)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5


@pytest.mark.gpu
def test_cuda_fsdp2_world_size_one_trains_and_checkpoints(cuda_group, salm_parts, tmp_path: Path) -> None:
    from torch.distributed.tensor import DTensor

    from orchestrator.storage import checkpoints
    from orchestrator.training.parallel import full_parameters, shard_model

    cfg, batch = salm_parts
    model, autocast = build(cfg, cuda_group, "bf16-mixed")
    shard_model(model, "bf16-mixed")
    assert isinstance(model.llm.model.layers[0].self_attn.q_proj.weight, DTensor)
    losses = train(model, batch, autocast)
    assert losses[-1] < losses[0] - 0.5
    with torch.no_grad(), full_parameters(model), autocast():
        model.eval()
        out = model.validation_step({k: v for k, v in batch.items()}, max_new_tokens=4)
    assert len(out["hypotheses"]) == len(batch["references"])

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    state = checkpoints.TrainingState(step=6)
    checkpoints.save_checkpoint(tmp_path / "ckpt", model, optimizer, None, state, "{}", True, 0)
    checkpoints.mark_complete(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / checkpoints.DCP_METADATA_FILE).is_file()
    restored = checkpoints.load_checkpoint(tmp_path / "ckpt", model, optimizer, None, 0)
    assert restored.step == 6
