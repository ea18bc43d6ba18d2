"""`speechlm export` and `speech_models.pretrained`: exported dirs load offline and match the checkpoint."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from orchestrator.cli.main import main
from orchestrator.config import experiment_from_dict, to_dict
from orchestrator.config.schema import ExperimentConfig
from orchestrator.demo.synthetic_shar import write_synthetic_shar
from orchestrator.inference.export import export_model, probe_audios
from orchestrator.inference.sources import load_model, resolve_source
from orchestrator.testing import write_checkpoint
from speech_models.config import LoraConfig
from speech_models.duplex_s2s import DuplexS2SModel
from speech_models.duplex_s2s_speech_decoder import DuplexS2SSpeechDecoderModel
from speech_models.pretrained import AudioFrames, from_pretrained, save_pretrained
from speech_models.registry import build_model
from speech_models.salm import SALM
from speech_models.testing import build_tiny_codec_dir, build_tiny_llm_dir, tiny_duplex_model_config, tiny_salm_config


@contextlib.contextmanager
def moved_away(*paths: Path):
    """Hide the pretrained sources, as on a machine that only has the exported directory."""
    for p in paths:
        p.rename(p.with_name(p.name + ".hidden"))
    try:
        yield
    finally:
        for p in paths:
            p.with_name(p.name + ".hidden").rename(p)


def experiment(model_cfg, shar: Path, run_dir: Path) -> ExperimentConfig:
    data = {
        "name": "tiny",
        "model": to_dict(ExperimentConfig(model=model_cfg))["model"],
        "trainer": {"max_steps": 2, "val_check_interval": 2, "accelerator": "cpu"},
        "exp_manager": {"explicit_log_dir": str(run_dir)},
        "data": {
            "train_ds": {"input_cfg": [{"shar_path": str(shar), "tags": {"context": "Transcribe:"}}], "batch_size": 2}
        },
    }
    return experiment_from_dict(data).cfg


def model_with_nonzero_lora(cfg: ExperimentConfig):
    """The model of `cfg` with random LoRA B matrices: peft starts them at zero, and merging zeros changes nothing."""
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model, cfg.data)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SALM with LoRA whose adapters are non-zero (so merging changes the weights), as a checkpoint."""
    root = tmp_path_factory.mktemp("export")
    llm = build_tiny_llm_dir(root / "llm")
    shar = write_synthetic_shar(root / "shar", n_cuts=2, n_shards=1)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    cfg = experiment(tiny_salm_config(llm, lora=lora), shar, root / "run")
    model = model_with_nonzero_lora(cfg)
    ckpt = write_checkpoint(root / "run" / "step=0000002", model, cfg, step=2, metrics={"val_loss": 1.0})
    return ckpt, llm


def test_export_loads_without_pretrained_sources_and_matches_the_checkpoint(tmp_path, lora_checkpoint):
    ckpt, llm = lora_checkpoint
    result = export_model(str(ckpt), tmp_path / "export")
    out = Path(result.out_dir)
    assert result.reload_max_diff == 0.0 and not result.merged_lora
    assert {p.name for p in out.iterdir()} == {"config.json", "speechlm_config.yaml", "model.safetensors", "llm"}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (out / "llm").iterdir()}
    # safetensors writes 0600; the export gives its weights the mode of every other file it wrote (issue 20)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777
    info = json.loads((out / "config.json").read_text())
    assert info["architectures"] == ["SALM"] and info["lora"] == "unmerged"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    # every weight, frozen pretrained ones included (the checkpoint only held the trainable ones)
    assert any(k.startswith("perception.encoder.") for k in keys) and "embed_tokens.weight" in keys
    assert any(".base_layer." in k for k in keys) and any("lora_A" in k for k in keys)

    source = resolve_source(str(ckpt))
    original, _ = load_model(source)
    probe = probe_audios(original)
    batch = original.collator()([{"id": str(i), "audio": a, "text": ""} for i, a in enumerate(probe)])
    prompts, audios, lens = batch["prompt_ids"], batch["audios"], batch["audio_lens"]
    expected_ids, expected_texts = original.generate(prompts, audios, lens, max_new_tokens=6)
    with moved_away(llm):
        exported = SALM.from_pretrained(str(out))
        ids, texts = exported.generate(prompts, audios, lens, max_new_tokens=6)
        assert torch.equal(exported.probe_logits(probe), original.probe_logits(probe))
    assert torch.equal(ids, expected_ids) and texts == expected_texts
    with pytest.raises(TypeError, match="holds a SALM, not a DuplexS2SModel"):
        DuplexS2SModel.from_pretrained(str(out))


def test_merge_lora_export_matches_unmerged_logits(tmp_path, lora_checkpoint):
    ckpt, llm = lora_checkpoint
    result = export_model(str(ckpt), tmp_path / "merged", merge_lora=True, atol=1e-5, rtol=1e-5)
    assert result.merged_lora and 0.0 < result.merge_max_diff < 1e-4
    out = Path(result.out_dir)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    assert "lora: null" in (out / "speechlm_config.yaml").read_text()

    source = resolve_source(str(ckpt))
    unmerged, _ = load_model(source)
    probe = probe_audios(unmerged)
    with moved_away(llm):
        merged = SALM.from_pretrained(str(out))
    torch.testing.assert_close(merged.probe_logits(probe), unmerged.probe_logits(probe), atol=1e-4, rtol=1e-4)


def test_export_cli_registers_the_model_in_mlflow(tmp_path, lora_checkpoint):
    import mlflow

    ckpt, _ = lora_checkpoint
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "registered"
    argv = ["export", str(ckpt.parent), "--out", str(out), "--merge-lora", "--register", "tiny-salm"]
    assert main([*argv, "--tracking-uri", uri]) == 0
    versions = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name='tiny-salm'")
    assert len(versions) == 1 and versions[0].tags["speechlm.step"] == "2"
    assert main(["export", str(ckpt), "--out", str(out)]) == 2  # not empty: refused


def test_duplex_speech_decoder_export_round_trip_and_lora_merge(tmp_path):
    llm = build_tiny_llm_dir(tmp_path / "llm")
    codec = build_tiny_codec_dir(tmp_path / "codec", "dac")
    shar = write_synthetic_shar(tmp_path / "shar", n_cuts=2, n_shards=1, with_target_audio=True)
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    cfg = experiment(tiny_duplex_model_config(llm, codec, speech_decoder=True, lora=lora), shar, tmp_path / "run")
    model = model_with_nonzero_lora(cfg)
    ckpt = write_checkpoint(tmp_path / "run" / "step=0000001", model, cfg, step=1)
    plain = export_model(str(ckpt), tmp_path / "plain")
    merged = export_model(str(ckpt), tmp_path / "merged", merge_lora=True, atol=1e-5, rtol=1e-5)
    assert plain.reload_max_diff == 0.0 and merged.merged_lora and merged.merge_max_diff < 1e-4
    assert (Path(plain.out_dir) / "audio_codec" / "config.json").is_file()

    source = resolve_source(str(ckpt))
    original, _ = load_model(source)
    probe = probe_audios(original)
    signal = np.random.default_rng(0).standard_normal((1, 8000)).astype(np.float32) * 0.1
    expected = original.offline_inference(signal, np.array([8000]))
    with moved_away(llm, codec):
        loaded = DuplexS2SModel.from_pretrained(plain.out_dir)  # the subclass comes back
        assert type(loaded) is DuplexS2SSpeechDecoderModel
        got = loaded.offline_inference(signal, np.array([8000]))
        merged_model = DuplexS2SSpeechDecoderModel.from_pretrained(merged.out_dir)
        torch.testing.assert_close(merged_model.probe_logits(probe), original.probe_logits(probe), atol=1e-4, rtol=1e-4)
    for key in ("tokens_text", "tokens_audio", "audio"):
        assert torch.equal(got[key], expected[key]), key
    assert got["text"] == expected["text"]
    with pytest.raises(TypeError, match="not a SALM"):
        SALM.from_pretrained(plain.out_dir)


def test_perception_options_of_a_pretrained_asr_survive_export(tmp_path, lora_checkpoint):
    """A perception taken from a .nemo / Parakeet checkpoint may have no pre-emphasis and no encoder biases (NeMo's
    `preemph` and `use_bias` keys); the exported config keeps them."""
    import dataclasses

    _, llm = lora_checkpoint
    cfg = tiny_salm_config(llm)
    perception = dataclasses.replace(
        cfg.perception,
        preprocessor=dataclasses.replace(cfg.perception.preprocessor, preemph=None),
        encoder=dataclasses.replace(cfg.perception.encoder, use_bias=False),
    )
    torch.manual_seed(0)
    model = SALM(dataclasses.replace(cfg, perception=perception)).eval()
    assert model.perception.encoder.layers[0].feed_forward1.linear1.bias is None
    out = save_pretrained(model, tmp_path / "export", data=AudioFrames())
    loaded = from_pretrained(out)
    audio = torch.randn(1, 16000) * 0.1
    lens = torch.tensor([16000])
    assert loaded.perception.preprocessor.preemph is None and not loaded.perception.cfg.encoder.use_bias
    assert torch.equal(loaded.perception(audio, lens)[0], model.perception(audio, lens)[0])


def test_missing_or_foreign_directories_are_bad_input(tmp_path, lora_checkpoint):
    ckpt, _ = lora_checkpoint
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2  # no checkpoints in it
    empty = tmp_path / "empty_ckpt"
    shutil.copytree(ckpt, empty)
    from safetensors.torch import save_file

    save_file({}, str(empty / "weights.safetensors"))  # what multi-worker runs wrote before the DDP fix
    assert main(["export", str(empty), "--out", str(tmp_path / "o3")]) == 2
