"""This project against NVIDIA NeMo 3.0.0's own numbers, on checkpoints and outputs NeMo made (tests/fixtures/nemo).

Every model loads from NeMo's own checkpoint format and must give NeMo's outputs on NeMo's batch:
- a `.nemo` ASR archive: features and FastConformer encoder output;
- SALM (with and without LoRA): perception output, logits with the same target ids, loss, greedy ids, and the
  prompt ids NeMo's llama2 formatter made;
- DuplexS2SModel and DuplexS2SSpeechDecoderModel: perception output, teacher-forcing labels, text and audio logits,
  losses, greedy ids. NeMo's codec is not re-implemented here (README, "Coming from NeMo"), so the batch carries
  the codes NeMo's codec made for it (`target_codes`) instead of target audio to encode.
And a SALM exported here in NeMo's format loads back here and, when NEMO_PYTHON names a NeMo 3.0.0 venv
(bench/nemo_env/setup_nemo_env.sh), in NeMo itself, with the same logits.

Tolerance: 1e-5 everywhere (NeMo's own logits move by ~1e-6 with the CPU thread count; tests run with one thread).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from speech_models.config import ConformerConfig, ModelConfig, PerceptionConfig, PreprocessorConfig, PromptDefaults
from speech_models.perception import build_perception
from speech_models.pretrained import from_pretrained
from speech_models.salm import SALM, SALMCollator
from speech_models.testing import build_tiny_codec_dir

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
NEMO_PYTHON = os.environ.get("NEMO_PYTHON")


def fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(FIXTURES / name / "batch.safetensors"), load_file(FIXTURES / name / "expected.safetensors")


def max_diff(ours: torch.Tensor, nemo: torch.Tensor) -> float:
    assert ours.shape == nemo.shape, (tuple(ours.shape), tuple(nemo.shape))
    return float((ours.float() - nemo.float()).abs().max())


# ---------------------------------------------------------------------------------------------- ASR (.nemo)


def test_nemo_asr_archive_gives_nemo_features_and_encoder_output():
    batch, expected = fixture("asr")
    perception = build_perception(
        PerceptionConfig(), output_dim=8, pretrained_asr=str(FIXTURES / "asr" / "tiny_fastconformer_ctc.nemo")
    ).eval()
    with torch.no_grad():
        features, feature_lens = perception.preprocessor(batch["audios"], batch["audio_lens"])
        encoded, encoded_lens = perception.encoder(features, feature_lens)
    assert torch.equal(feature_lens, expected["feature_lens"]) and torch.equal(encoded_lens, expected["encoder_lens"])
    assert max_diff(encoded.transpose(1, 2), expected["encoder_out"]) <= TOLERANCE  # measured: 1.2e-7
    # The features themselves (every frame, padding included) agree to 5e-5: in a narrow low mel bin where a
    # frame's energy is ~30x below the bin's mean, the FFT's rounding (relative to the frame's total energy, and
    # different between NeMo's torch 2.9 and this torch) is a larger share after log + per-feature normalisation.
    # The encoder output above shows it carries no further.
    assert features.shape == expected["features"].transpose(1, 2).shape
    assert max_diff(features.transpose(1, 2), expected["features"]) <= 1e-4


# ---------------------------------------------------------------------------------------------- SALM


@pytest.fixture(scope="module", params=["salm", "salm_lora"])
def salm_fixture(request):
    name = request.param
    model = SALM.from_pretrained(FIXTURES / name / "nemo_salm", pretrained_llm=str(FIXTURES / name / "llm"))
    return name, model


def salm_logits(model: SALM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NeMo's training-step path: (B, L', V) logits at every position, target ids, attention mask."""
    with torch.no_grad():
        inputs = model.prepare_inputs(batch)
        logits = model._causal_lm()(
            inputs_embeds=inputs["input_embeds"],
            attention_mask=inputs["attention_mask"].long(),
            position_ids=inputs["position_ids"],
            use_cache=False,
        ).logits
    return logits, inputs["target_ids"], inputs["attention_mask"]


def test_salm_loads_a_nemo_checkpoint_and_gives_nemo_outputs(salm_fixture):
    name, model = salm_fixture
    batch, expected = fixture(name)
    assert model.embed_tokens.num_embeddings == 377 and model.audio_locator_tag_id == 377  # not resized
    assert (model.cfg.lora is not None) == (name == "salm_lora")

    logits, targets, attention = salm_logits(model, batch)
    assert torch.equal(targets, expected["target_ids"]) and torch.equal(attention, expected["attention_mask"])
    assert max_diff(logits, expected["logits"]) <= TOLERANCE  # measured: 4.8e-8 (salm), 6.0e-8 (salm_lora)
    with torch.no_grad():
        loss = model(batch)["loss"]
        perception_out, perception_lens = model.perception(batch["audios"], batch["audio_lens"])
        generated, _ = model.generate(batch["prompt_ids"], batch["audios"], batch["audio_lens"], max_new_tokens=8)
    assert abs(float(loss) - float(expected["loss"])) <= TOLERANCE  # measured: 0
    assert torch.equal(perception_lens, expected["perception_lens"])
    assert max_diff(perception_out, expected["perception_out"]) <= TOLERANCE  # measured: 6e-8
    assert torch.equal(generated, expected["generated_ids"])


def test_salm_collator_makes_nemo_llama2_batch():
    """The prompt ids, loss mask and generation prompts NeMo's llama2 PromptFormatter made, from the same dialog."""
    batch, _ = fixture("salm")
    answers = json.loads((FIXTURES / "salm" / "fixture.json").read_text())["answers"]
    cfg = ModelConfig(pretrained_llm=str(FIXTURES / "salm" / "llm"), prompt_format="llama2")
    collator = SALMCollator.for_prompt(cfg, PromptDefaults(context="Transcribe:"))
    examples = [
        {"id": str(i), "audio": batch["audios"][i, : int(batch["audio_lens"][i])].numpy(), "text": answer}
        for i, answer in enumerate(answers)
    ]
    ours = collator(examples)
    for key in ("input_ids", "loss_mask", "prompt_ids", "audios", "audio_lens"):
        np.testing.assert_array_equal(ours[key], batch[key].numpy(), err_msg=key)


# ---------------------------------------------------------------------------------------------- duplex


@pytest.fixture(scope="module")
def fixture_codec(tmp_path_factory):
    """A transformers codec with the fixtures' codebook layout (2 x 16 codes per 80 ms): it sizes the model; the
    codes themselves are NeMo's, from the batch."""
    return build_tiny_codec_dir(tmp_path_factory.mktemp("codec") / "dac_k2", "dac_k2")


@pytest.fixture(scope="module", params=["duplex_s2s", "duplex_s2s_speech_decoder"])
def duplex_fixture(request, fixture_codec):
    name = request.param
    model = from_pretrained(
        FIXTURES / name / "nemo_model",
        pretrained_llm=str(FIXTURES / name / "llm"),
        pretrained_audio_codec=str(fixture_codec),
    )
    batch, expected = fixture(name)
    batch = {**batch, "target_codes": expected["codec_codes"].transpose(1, 2)}  # (B, T_codec, K), NeMo's codec
    return name, model, batch, expected


def nemo_loss(logits: torch.Tensor, labels: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """NeMo's training_step: CE summed over every frame (padding included) / num_frames."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum") / num_frames


def test_duplex_loads_a_nemo_checkpoint_and_gives_nemo_outputs(duplex_fixture):
    name, model, batch, expected = duplex_fixture
    assert type(model).__name__ == {"duplex_s2s": "DuplexS2SModel"}.get(name, "DuplexS2SSpeechDecoderModel")
    assert (model.num_codebooks, model.speech_vocab_size) == (2, 19)
    with torch.no_grad():
        perception_out, perception_lens = model.perception(batch["source_audio"], batch["source_audio_lens"])
        inputs = model.prepare_inputs(batch)
        text_logits, audio_logits = model.teacher_forced_logits(inputs)
        losses = model(batch)
        greedy = model.offline_inference(batch["source_audio"], batch["source_audio_lens"], decode_audio=False)

    assert torch.equal(perception_lens, expected["perception_lens"])
    assert max_diff(perception_out, expected["perception_out"]) <= TOLERANCE  # measured: 7e-7
    # NeMo's teacher forcing: frame j's text head learns tokens[j + 1], its audio head codes[j].
    assert torch.equal(inputs.text_labels, expected["text_labels"])
    assert torch.equal(inputs.audio_labels, expected["audio_labels"])
    assert torch.equal(inputs.mask, expected["valid_mask"])
    assert max_diff(inputs.input_embeds, expected["input_embeds"]) <= TOLERANCE  # measured: 7e-7
    assert max_diff(text_logits, expected["text_logits"]) <= TOLERANCE  # measured: 1.2e-6 / 1.4e-6
    assert max_diff(audio_logits, expected["audio_logits"]) <= TOLERANCE  # measured: 1.1e-6 / 7.7e-7

    # NeMo's loss formula on these logits reproduces NeMo's losses...
    num_frames = inputs.mask.sum()
    assert int(num_frames) == int(expected["num_frames"])
    text_loss = nemo_loss(text_logits, inputs.text_labels, num_frames)
    audio_loss = nemo_loss(audio_logits, inputs.audio_labels, num_frames) / model.num_codebooks
    assert abs(float(text_loss) - float(expected["text_loss"])) <= TOLERANCE
    assert abs(float(audio_loss) - float(expected["audio_loss"])) <= TOLERANCE
    assert abs(float(3 * text_loss + 4 * audio_loss) - float(expected["loss"])) <= TOLERANCE
    # ...and this project's loss, which leaves padded frames out (deliberately), is the same CE on valid frames.
    assert abs(float(losses["text_loss"]) - float(expected["masked_text_loss"])) <= TOLERANCE
    assert abs(float(losses["audio_loss"]) - float(expected["masked_audio_loss"])) <= TOLERANCE
    expected_loss = 3 * expected["masked_text_loss"] + 4 * expected["masked_audio_loss"]
    assert abs(float(losses["loss"]) - float(expected_loss)) <= 3 * TOLERANCE

    assert torch.equal(greedy["tokens_text"], expected["gen_tokens_text"])
    assert torch.equal(greedy["tokens_audio"], expected["gen_tokens_audio"])
    assert torch.equal(greedy["tokens_len"], expected["gen_tokens_len"])


def test_nemo_duplex_codec_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(ValueError, match=r"NeMo AudioCodecModel.*pass pretrained_audio_codec"):
        from_pretrained(FIXTURES / "duplex_s2s" / "nemo_model", pretrained_llm=str(FIXTURES / "duplex_s2s" / "llm"))


# ---------------------------------------------------------------------------------------------- export


def perturbed_copy(model: SALM, seed: int = 0) -> SALM:
    """The model with every weight moved: what an export writes is then this project's, not NeMo's fixture."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    return model


EXPORTED = {  # name -> the fixture whose batch (and tokenizer) it runs on
    "salm": "salm",
    "salm_lora": "salm_lora",
    "no_adapter": "salm",  # this project's adapter-less SALM (the demo's layout): NeMo's IdentityConnector
}


def model_to_export(name: str, tmp_path: Path) -> SALM:
    """The fixture's SALM with every weight moved (so an export carries this project's weights, not NeMo's), or a
    random SALM without a modality adapter on the fixture's LLM."""
    from speech_models.testing import tiny_salm_config

    if name == "no_adapter":
        torch.manual_seed(0)
        return SALM(tiny_salm_config(FIXTURES / "salm" / "llm", pretrained_weights=False)).eval()
    model = SALM.from_pretrained(FIXTURES / name / "nemo_salm", pretrained_llm=str(FIXTURES / name / "llm"))
    return perturbed_copy(model)


@pytest.fixture(scope="module")
def nemo_exports(tmp_path_factory):
    """Models written in NeMo's format, with this project's logits, target mask and greedy ids on a fixture batch."""
    from speech_models.nemo_format import write_nemo_dir

    root = tmp_path_factory.mktemp("nemo_exports")
    exports = {}
    for name, batch_of in EXPORTED.items():
        model = model_to_export(name, root)
        batch, _ = fixture(batch_of)
        logits, _, attention = salm_logits(model, batch)
        with torch.no_grad():
            generated, _ = model.generate(batch["prompt_ids"], batch["audios"], batch["audio_lens"], max_new_tokens=8)
        exports[name] = (write_nemo_dir(model, root / name), logits, attention, generated)
    return exports


def test_nemo_format_export_layout_and_reload(nemo_exports):
    for name, (directory, logits, _, _) in nemo_exports.items():
        config = json.loads((directory / "config.json").read_text())
        assert config["model_type"] == "nemo_speechlm" and config["pretrained_weights"] is False
        mode = (directory / "config.json").stat().st_mode & 0o777
        assert (directory / "model.safetensors").stat().st_mode & 0o777 == mode  # not safetensors' 0600
        assert config["perception"]["preprocessor"]["_target_"].startswith("nemo.collections.asr.modules.")
        assert "init_from_checkpoint" not in config and ("lora" in config) == (name == "salm_lora")
        adapter = config["perception"]["modality_adapter"]
        if name == "no_adapter":  # NeMo projects from the connector's d_model to output_dim, as this model does
            assert adapter == {
                "_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
                "d_model": 32,
            }
        assert json.loads((directory / "llm_backbone" / "config.json").read_text())["vocab_size"] == 377
        assert "<|audioplaceholder|>" not in (directory / "tokenizer.json").read_text()  # NeMo adds the tag itself
        state = load_file(directory / "model.safetensors")
        assert state["embed_tokens.weight"].shape == (377, 64) and "perception.preprocessor.featurizer.fb" in state

        reloaded = SALM.from_pretrained(directory)  # no pretrained_llm: the directory is self-contained
        batch, _ = fixture(EXPORTED[name])
        again, _, _ = salm_logits(reloaded, batch)
        assert max_diff(again, logits) == 0.0


@pytest.mark.skipif(not NEMO_PYTHON, reason="set NEMO_PYTHON to a NeMo 3.0.0 venv's python to run NeMo itself")
@pytest.mark.parametrize("name", list(EXPORTED))
def test_nemo_loads_an_export_made_here_with_the_same_logits(nemo_exports, name, tmp_path):
    directory, logits, attention, generated = nemo_exports[name]
    out = tmp_path / "nemo_outputs.safetensors"
    batch_file = tmp_path / "batch.safetensors"
    batch, _ = fixture(EXPORTED[name])
    save_file({k: v.contiguous() for k, v in batch.items()}, str(batch_file))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)  # NeMo's own packages only
    subprocess.run(
        [
            NEMO_PYTHON,
            str(ROOT / "bench" / "nemo_env" / "nemo_salm_outputs.py"),
            str(directory),
            str(batch_file),
            str(out),
        ],
        check=True,
        cwd=tmp_path,  # any directory: the export is self-contained
        env=env,
        timeout=600,
    )
    nemo = load_file(out)
    assert torch.equal(nemo["attention_mask"], attention)
    assert max_diff(logits, nemo["logits"]) <= TOLERANCE
    assert torch.equal(nemo["generated_ids"], generated)
    print(f"{name}: NeMo's logits on the export vs this project's: max |diff| {max_diff(logits, nemo['logits']):.3g}")


def test_export_refuses_what_nemo_cannot_load(tmp_path):
    """A duplex model's codec is a transformers one; NeMo's duplex models load only NeMo's own codec."""
    from types import SimpleNamespace

    from speech_models.nemo_format import write_nemo_dir

    duplex = SimpleNamespace(cfg=ModelConfig(pretrained_audio_codec="kyutai/mimi"))
    with pytest.raises(ValueError, match="NeMo AudioCodecModel"):
        write_nemo_dir(duplex, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_keys_of_nemo_classes_fill_in_nemo_defaults():
    """A NeMo-written config leaves keys at NeMo's class defaults out; they must not take this schema's defaults."""
    from speech_models.nemo_format import read_nemo_dir

    checkpoint = read_nemo_dir(FIXTURES / "salm" / "nemo_salm", pretrained_llm=str(FIXTURES / "salm" / "llm"))
    assert checkpoint.model.pretrained_weights is False and checkpoint.model.pretrained_asr is None
    assert checkpoint.model.perception.preprocessor.preemph == 0.97  # not in config.json: NeMo's default
    assert checkpoint.frames.frame_length == pytest.approx(0.08)
    assert checkpoint.model.perception.preprocessor.log_zero_guard_value == 2**-24
    assert checkpoint.model.perception.modality_adapter.dropout_att == 0.0  # NeMo's class default, not 0.1
    assert ConformerConfig().dropout_att == 0.1 and PreprocessorConfig().pad_to == 0  # this schema's defaults
