"""DuplexS2SModel and DuplexS2SSpeechDecoderModel on a tiny LLM, FastConformer and codec (CPU, no downloads)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from orchestrator.config.schema import DataConfig
from speech_models.config import LoraConfig, ModelConfig
from speech_models.duplex_data import DuplexS2SCollator
from speech_models.duplex_s2s import DuplexS2SModel
from speech_models.duplex_s2s_speech_decoder import DuplexS2SSpeechDecoderModel, TransformerARSpeechDecoder
from speech_models.registry import build_model
from speech_models.testing import (
    build_tiny_codec_dir,
    build_tiny_llm_dir,
    make_duplex_example,
    tiny_duplex_model_config,
)

DATA = DataConfig()  # 80 ms frames, 16 kHz user audio, 22.05 kHz agent audio
SAMPLES_PER_FRAME_OUT = 1764  # 0.08 s x 22050 Hz
MODELS = {"duplex_s2s": DuplexS2SModel, "duplex_s2s_speech_decoder": DuplexS2SSpeechDecoderModel}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("duplex")
    return build_tiny_llm_dir(root / "llm"), build_tiny_codec_dir(root / "codec", "dac")


def make_cfg(assets, model_type: str, **overrides) -> ModelConfig:
    llm, codec = assets
    return tiny_duplex_model_config(llm, codec, speech_decoder=model_type == "duplex_s2s_speech_decoder", **overrides)


def make_model(assets, model_type: str, **overrides):
    torch.manual_seed(0)
    return MODELS[model_type](make_cfg(assets, model_type, **overrides), DATA)


@pytest.fixture(scope="module")
def batch(assets):
    examples = [
        make_duplex_example(
            "a", 1.6, agent_turns=[(0.64, 0.8, "the sky is blue")], user_turns=[(0.0, 0.56, "what colour")]
        ),
        make_duplex_example("b", 1.2, agent_turns=[(0.32, 0.72, "hello how are you")], seed=1),
    ]
    return DuplexS2SCollator(make_cfg(assets, "duplex_s2s"), DATA)(examples)  # frame_lens [20, 15]


@pytest.mark.parametrize("model_type", list(MODELS))
def test_forward_losses_and_weights(assets, batch, model_type):
    model = make_model(assets, model_type).eval()
    out = model(batch)
    assert set(out) == {"loss", "text_loss", "audio_loss", "num_target_tokens"}
    assert all(torch.isfinite(out[k]) for k in ("loss", "text_loss", "audio_loss"))
    assert int(out["num_target_tokens"]) == 19 + 14  # as NeMo: frames - 1 teacher-forced frames per example
    assert out["loss"].requires_grad and not out["text_loss"].requires_grad

    for w_text, w_audio in [(1.0, 1.0), (3.0, 4.0), (0.0, 2.5)]:
        model.cfg = dataclasses.replace(model.cfg, text_loss_weight=w_text, audio_loss_weight=w_audio)
        weighted = model(batch)
        assert torch.equal(weighted["text_loss"], out["text_loss"])
        assert torch.equal(weighted["audio_loss"], out["audio_loss"])
        expected = w_text * weighted["text_loss"] + w_audio * weighted["audio_loss"]
        assert torch.allclose(weighted["loss"].detach(), expected, rtol=1e-6, atol=0)


def test_build_model_names_parameters_and_checkpoints(assets):
    model = build_model(make_cfg(assets, "duplex_s2s"))  # through the registry, DataConfig defaults
    assert isinstance(model, DuplexS2SModel) and model.num_codebooks == 4 and model.speech_vocab_size == 35
    names = [n for n, _ in model.named_parameters()]
    # NeMo's names: `llm` is the decoder stack, the LM head and the embedding sit beside it.
    for prefix in (
        "llm.layers.",
        "llm.norm.",
        "lm_head.",
        "embed_tokens.",
        "perception.encoder.",
        "audio_codec.model.",
    ):
        assert any(n.startswith(prefix) for n in names), prefix
    assert not any(n.startswith(("llm.model.", "llm.lm_head.", "llm.embed_tokens.")) for n in names)
    assert [n for n in names if n.startswith("embed_audio_tokens.")] == [
        f"embed_audio_tokens.{k}.weight" for k in range(4)
    ]
    assert any(n.startswith("audio_head.") for n in names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("audio_codec."))
    state = model.state_dict()
    assert not any(k.startswith("audio_codec.") for k in state)
    model.load_state_dict(state)  # strict load of a codec-less checkpoint

    decoder_model = build_model(make_cfg(assets, "duplex_s2s_speech_decoder"))
    assert isinstance(decoder_model, DuplexS2SSpeechDecoderModel)
    names = [n for n, _ in decoder_model.named_parameters()]
    for name in (
        "speech_generation.input_proj.weight",
        "speech_generation.t5_decoder.layers.0.self_attention.qkv_net.weight",
        "speech_generation.t5_decoder.layers.1.pos_ff.o_net.conv.weight",
        "speech_generation.t5_decoder.position_embeddings.weight",
        "speech_generation.t5_decoder.norm_out.weight",
        "speech_generation.final_proj.bias",
        "speech_generation.audio_embeddings.3.weight",
    ):
        assert name in names, name
    assert not any(n.startswith(("embed_audio_tokens.", "audio_head.")) for n in names)


def test_nemo_freeze_pattern_freezes_the_decoder_stack_only(assets):
    """NeMo's `^llm\\..+$` freezes the decoder stack (2 layers x 9 tensors + the final norm: 19), not the LM head."""
    model = make_model(assets, "duplex_s2s", freeze_params=[r"^llm\..+$"])
    assert model.trainable_summary.frozen_by_pattern == 19
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("audio_codec.")}
    assert len(frozen) == 19 and "llm.norm.weight" in frozen
    assert model.lm_head.weight.requires_grad and model.embed_tokens.weight.requires_grad


def test_teacher_forcing_trains_text_one_frame_ahead_of_the_codes(assets, batch):
    """NeMo's layout: input frame j holds tokens[j] and codes[j - 1]; its text head learns tokens[j + 1], its audio
    head codes[j]. So a turn's text BOS is predicted one frame before its speech BOS."""
    model = make_model(assets, "duplex_s2s").eval()
    with torch.no_grad():
        inputs = model.prepare_inputs(batch)
    tokens = torch.as_tensor(batch["target_tokens"])  # (B, 20): the collator's text channel
    T = inputs.text_labels.shape[1] + 1
    assert T == 20  # min(user frames 21, codec frames 20)
    assert torch.equal(inputs.text_labels, tokens[:, 1:T])
    bos_frame = int((tokens[0] == model.text_bos_id).nonzero()[0])
    assert int(inputs.text_labels[0].eq(model.text_bos_id).nonzero()[0]) == bos_frame - 1  # text BOS: one frame early
    assert (inputs.audio_labels[0, bos_frame] == model.speech_bos_id).all()  # speech BOS at the BOS frame
    assert (inputs.audio_inputs[:, 0] == model.speech_delay_id).all()
    assert torch.equal(inputs.audio_inputs[:, 1:], inputs.audio_labels[:, :-1])  # codes[j - 1] in, codes[j] out
    assert inputs.mask.sum(1).tolist() == [19, 14]


def train_steps(model, batch, steps: int, optimizer) -> list[tuple[float, float]]:
    history = []
    for _ in range(steps):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append((float(out["text_loss"]), float(out["audio_loss"])))
    return history


@pytest.mark.parametrize("model_type", list(MODELS))
def test_overfitting_one_batch_lowers_both_losses(assets, batch, model_type):
    model = make_model(assets, model_type).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = train_steps(model, batch, 30, optimizer)
    (text_0, audio_0), (text_n, audio_n) = history[0], history[-1]
    assert text_n < 0.5 * text_0, history
    assert audio_n < 0.8 * audio_0, history
    if model_type == "duplex_s2s":  # a little longer and greedy decoding replays the memorised replies
        train_steps(model, batch, 20, optimizer)
        result = model.offline_inference(batch["source_audio"], batch["source_audio_lens"], decode_audio=False)
        assert result["text"] == batch["references"]


@pytest.mark.parametrize("model_type", list(MODELS))
def test_offline_inference_and_validation_step(assets, batch, model_type):
    model = make_model(assets, model_type).train()
    result = model.offline_inference(batch["source_audio"], batch["source_audio_lens"])
    assert model.training  # restored after greedy decoding in eval mode
    assert (
        isinstance(result["text"], list)
        and len(result["text"]) == 2
        and all(isinstance(t, str) for t in result["text"])
    )
    # As NeMo: greedy decoding runs over the whole perception tensor (21 frames for 1.6 s: every STFT frame,
    # subsampled), and the valid frames of each example are its perception length.
    assert result["tokens_text"].shape == (2, 21) and result["tokens_audio"].shape == (2, 21, 4)
    assert result["tokens_len"].tolist() == [20, 15]
    # waveform at target_sample_rate, exactly n_frames x frame_length x rate samples per example
    assert result["audio"].shape == (2, 21 * SAMPLES_PER_FRAME_OUT)
    assert result["audio_len"].tolist() == [20 * SAMPLES_PER_FRAME_OUT, 15 * SAMPLES_PER_FRAME_OUT]
    assert torch.isfinite(result["audio"]).all()

    val = model.validation_step(batch)
    assert val["num_tokens"] == 33 and 0 <= val["num_correct"] <= 33
    assert np.isfinite(val["loss_sum"]) and val["loss_sum"] > 0
    assert val["references"] == ["the sky is blue", "hello how are you"]
    assert len(val["hypotheses"]) == 2
    assert [a.shape for a in val["generated_audio"]] == [(20 * 1764,), (15 * 1764,)]
    assert all(a.dtype == np.float32 for a in val["generated_audio"])


def test_speech_decoder_cached_greedy_decoding_matches_uncached(assets, batch):
    model = make_model(assets, "duplex_s2s_speech_decoder")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    train_steps(model, batch, 5, optimizer)  # move away from the init so the codes are not trivially constant
    cached = model.offline_inference(batch["source_audio"], batch["source_audio_lens"], decode_audio=False)
    model.cfg = dataclasses.replace(
        model.cfg, speech_decoder=dataclasses.replace(model.cfg.speech_decoder, use_cache=False)
    )
    uncached = model.offline_inference(batch["source_audio"], batch["source_audio_lens"], decode_audio=False)
    assert torch.equal(cached["tokens_audio"], uncached["tokens_audio"])
    assert torch.equal(cached["tokens_text"], uncached["tokens_text"])
    assert len(torch.unique(cached["tokens_audio"])) > 1


def test_speech_decoder_kv_cache_matches_full_sequence():
    cfg = make_cfg(("unused", "unused"), "duplex_s2s_speech_decoder").speech_decoder
    torch.manual_seed(0)
    decoder = TransformerARSpeechDecoder(cfg, input_dim=48, num_codebooks=3, vocab_size=11).eval()
    hidden, codes = torch.randn(2, 9, 48), torch.randint(0, 11, (2, 9, 3))
    full = decoder(hidden, codes)  # (B, T, K, V)
    cache = decoder.new_cache()
    steps = [decoder(hidden[:, :4], codes[:, :4], cache)]  # a chunk, then frame by frame
    steps += [decoder(hidden[:, t : t + 1], codes[:, t : t + 1], cache) for t in range(4, 9)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    longest = cfg.max_length_causal_mask
    with pytest.raises(ValueError, match="max_length_causal_mask"):
        decoder(torch.randn(1, longest + 1, 48), torch.zeros(1, longest + 1, 3, dtype=torch.long))


def test_frame_length_must_match_the_perception_frames(assets):
    with pytest.raises(ValueError, match=r"data\.frame_length"):
        DuplexS2SModel(make_cfg(assets, "duplex_s2s"), DataConfig(frame_length=0.04))
    with pytest.raises(ValueError, match="pretrained_audio_codec is required"):
        DuplexS2SModel(dataclasses.replace(make_cfg(assets, "duplex_s2s"), pretrained_audio_codec=None), DATA)


def test_lora_and_freeze_params_apply(assets, batch):
    model = make_model(
        assets,
        "duplex_s2s",
        lora=LoraConfig(target_modules=["q_proj", "v_proj"]),
        freeze_params=[r"^perception\.encoder\..+$"],
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("llm.") and ".lora_" not in n for n in trainable)
    assert any(".lora_A." in n for n in trainable) and "embed_tokens.weight" in trainable
    assert not any(n.startswith(("perception.encoder.", "audio_codec.")) for n in trainable)
    model(batch)["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_B." in n)
    assert model.offline_inference(batch["source_audio"], batch["source_audio_lens"])["audio"].shape[0] == 2


@pytest.mark.parametrize("model_type", list(MODELS))
def test_frozen_parts_run_in_eval_mode_while_training(assets, model_type):
    """NeMo's training step keeps the wholly frozen preprocessor, encoder, LLM (and speech decoder) in eval mode."""
    frozen = [r"^perception\.encoder\..+$", r"^llm\..+$", r"^speech_generation\..+$"]
    model = make_model(assets, model_type, freeze_params=frozen).train()
    assert not model.perception.encoder.training and not model.llm.training and not model.audio_codec.training
    assert model.lm_head.training and model.perception.proj.training
    unfrozen = make_model(assets, model_type).train()
    assert unfrozen.llm.training and unfrozen.perception.encoder.training
    if model_type == "duplex_s2s_speech_decoder":
        assert not model.speech_generation.training and unfrozen.speech_generation.training
