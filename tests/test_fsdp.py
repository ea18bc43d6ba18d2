"""FSDP2 on CPU (gloo, 2 processes) against DDP on the same batches: the training loop's own set-up and step
(`orchestrator.testing.train_steps_on_process_group`), a tiny SALM, fixed per-rank batches.

- the same loss curve as DDP over 20 steps (fp32), and with LoRA, a frozen encoder and bf16-mixed
  (MixedPrecisionPolicy: bf16 compute, fp32 master weights and gradients);
- frozen and LoRA parameters share FSDP units; frozen ones never move;
- sharded checkpoints (DCP): every rank writes its own shards, a resumed run continues the loss curve exactly,
  the checkpoint resumes on one process too, and loads into one plain model (what `speechlm export` writes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.storage import checkpoints
from orchestrator.testing import StepRun, _step_run_config, step_batch, train_steps_on_process_group

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from speech_models.testing import build_tiny_llm_dir

    return str(build_tiny_llm_dir(tmp_path_factory.mktemp("fsdp") / "llm"))


def run(llm_dir: str, tmp: Path, strategy: str, steps: int, **kwargs) -> dict:
    name = f"{strategy}_{steps}_{len(list(tmp.iterdir()))}"
    return train_steps_on_process_group(StepRun(llm_dir, strategy, 2, steps, str(tmp / f"{name}.json"), **kwargs))


def test_fsdp2_follows_ddp_loss_curve_over_20_steps(llm_dir: str, tmp_path: Path) -> None:
    ddp = run(llm_dir, tmp_path, "ddp", 20)
    fsdp = run(llm_dir, tmp_path, "fsdp2", 20)
    assert len(fsdp["losses"]) == 20
    assert fsdp["losses"][-1] < fsdp["losses"][0] - 0.5, "the tiny SALM learns"
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5, abs=1e-6)
    units = {u["module"] for u in fsdp["units"]}
    assert {"embed_tokens", "perception", "llm", "llm.model.layers.0", "perception.encoder.layers.0"} <= units


def test_fsdp2_lora_frozen_encoder_bf16_mixed(llm_dir: str, tmp_path: Path) -> None:
    ddp = run(llm_dir, tmp_path, "ddp", 6, lora=True, precision="bf16-mixed")
    fsdp = run(llm_dir, tmp_path, "fsdp2", 6, lora=True, precision="bf16-mixed")
    # MixedPrecisionPolicy: layers compute with bf16 weights; the sharded master weights and gradients are fp32
    assert (fsdp["compute_dtype"], fsdp["param_dtype"], fsdp["grad_dtype"]) == (
        "torch.bfloat16",
        "torch.float32",
        "torch.float32",
    )
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=2e-3)  # bf16 rounding differs, not the maths
    layer = next(u for u in fsdp["units"] if u["module"].endswith("model.layers.0"))
    assert layer["lora"] > 0 and layer["frozen"] > 0, "LoRA adapters share the unit of the weights they adapt"
    encoder_layer = next(u for u in fsdp["units"] if u["module"] == "perception.encoder.layers.0")
    assert encoder_layer["frozen"] > 0 and encoder_layer["trainable"] == 0
    assert fsdp["frozen_change"] == 0.0 and ddp["frozen_change"] == 0.0


def test_sharded_checkpoint_resumes_exactly_and_exports_to_one_model(llm_dir: str, tmp_path: Path) -> None:
    from speech_models.salm import SALM, SALMCollator

    whole = run(llm_dir, tmp_path, "fsdp2", 6)
    first_dir, second_dir = tmp_path / "step3", tmp_path / "step6"
    first = run(llm_dir, tmp_path, "fsdp2", 3, save_dir=str(first_dir))
    files = {p.name: p.stat().st_size for p in first_dir.iterdir()}
    # each rank wrote its own shards (no rank gathered the model), no full weights file
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "complete.json"} <= set(files)
    assert checkpoints.WEIGHTS_FILE not in files
    assert checkpoints.completeness_problem(str(first_dir)) is None
    assert checkpoints.read_saved_state(str(first_dir))["format_version"] == checkpoints.SHARDED_FORMAT_VERSION

    resumed = run(llm_dir, tmp_path, "fsdp2", 6, resume_from=str(first_dir), save_dir=str(second_dir))
    assert resumed["start_step"] == 3
    assert first["losses"] + resumed["losses"] == pytest.approx(whole["losses"], rel=1e-6)

    # DCP reshards: the same checkpoint resumes on one process (another world size, no FSDP)
    alone = train_steps_on_process_group(
        StepRun(llm_dir, "fsdp2", 1, 4, str(tmp_path / "alone.json"), resume_from=str(first_dir))
    )
    assert alone["start_step"] == 3 and len(alone["losses"]) == 1

    # export: one plain model from the shards reproduces the trained model's loss
    cfg = _step_run_config(StepRun(llm_dir, "fsdp2", 1, 0, ""))
    torch.manual_seed(cfg.trainer.seed)
    model = SALM(cfg.model).eval()
    checkpoints.check_weights(second_dir, model)
    checkpoints.load_model_weights(second_dir, model)
    with torch.no_grad():
        loss = float(model(step_batch(SALMCollator(cfg.model, None, None), 0, 10_000))["loss"])
    assert loss == pytest.approx(resumed["final_loss"], rel=1e-5)


def test_sharded_index_is_read_without_unpickling_code(tmp_path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / checkpoints.DCP_METADATA_FILE).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(checkpoints.CheckpointError, match="refused to load"):
        checkpoints._weight_names(tmp_path)


def test_demo_salm_trains_with_fsdp2_on_two_ray_workers_resumes_and_exports(
    ray_session, tiny_demo: Path, tmp_path: Path
) -> None:
    """The real driver and loop: `trainer.strategy=fsdp2` with bf16-mixed and activation checkpointing on 2 CPU
    workers validates (greedy generation on every rank), writes sharded checkpoints, resumes, and exports."""
    from orchestrator.config import load_experiment
    from orchestrator.inference.export import export_model
    from orchestrator.testing import tiny_training_overrides
    from orchestrator.training.driver import run_training

    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / "salm.yaml"
    run_dir = tmp_path / "run"
    extra = ["trainer.strategy=fsdp2", "trainer.precision=bf16-mixed", "trainer.activation_checkpointing=true"]

    def train(max_steps: int):
        overrides = [*tiny_training_overrides(tiny_demo, run_dir, max_steps), "trainer.val_check_interval=2", *extra]
        return run_training(load_experiment(config, overrides).cfg)

    result = train(2)
    assert result.ok, result.error
    assert "val_wer" in result.metrics
    step2 = run_dir / "step=0000002"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in step2.iterdir()}
    assert checkpoints.completeness_problem(str(step2)) is None

    result = train(4)  # the same command with more steps resumes from the sharded checkpoint
    assert result.ok, result.error
    assert [step for step, _ in checkpoints.list_checkpoints(str(run_dir))] == [2, 4]

    exported = export_model(str(run_dir), tmp_path / "export", which="latest")
    assert (Path(exported.out_dir) / "model.safetensors").is_file()
    assert exported.reload_max_diff is not None
