"""Perception: lengths, masking, SpecAugment, context limits, and loading .nemo / transformers checkpoints."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch
import yaml

from speech_models.config import ConformerConfig, PerceptionConfig, PreprocessorConfig
from speech_models.perception import AudioPerceptionModule, ConformerEncoder, build_perception
from speech_models.testing import tiny_conformer_config, tiny_perception_config


def audio_batch(lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    audio = torch.randn(len(lens), max(lens), generator=gen) * 0.1
    for i, n in enumerate(lens):
        audio[i, n:] = 0
    return audio, torch.tensor(lens)


def subsampled(frames: int, stages: int = 3) -> int:
    """Frames after `stages` stride-2 convolutions: floor((n + 2 - 3) / 2) + 1 each."""
    for _ in range(stages):
        frames = (frames - 1) // 2 + 1
    return frames


def expected_frames(samples: int, hop: int = 160, n_fft: int = 512) -> int:
    """Valid feature frames floor((n + 2 * (n_fft // 2) - n_fft) / hop), subsampled."""
    return subsampled((samples + 2 * (n_fft // 2) - n_fft) // hop)


def test_output_length_follows_the_subsampling_formula():
    torch.manual_seed(0)
    module = AudioPerceptionModule(tiny_perception_config(), output_dim=24).eval()
    lens = [64000, 16000, 12345, 1280 * 7 + 1, 1280 * 7, 2000]
    audio, audio_lens = audio_batch(lens)
    with torch.no_grad():
        embeds, embed_lens = module(audio, audio_lens)
    expected = [expected_frames(n) for n in lens]
    assert expected[:2] == [50, 13]  # 4 s -> 50 x 80 ms frames; ~ceil(samples / 1280)
    assert embed_lens.tolist() == expected == module.output_lengths(audio_lens).tolist()
    # NeMo's tensor length: every STFT frame (1 + samples // hop, one more than the valid ones) subsampled.
    assert embeds.shape == (len(lens), subsampled(1 + max(lens) // 160), 24) == (6, 51, 24)
    assert module.token_equivalent_duration == pytest.approx(0.08)


def test_padding_does_not_change_valid_frames():
    torch.manual_seed(0)
    module = AudioPerceptionModule(tiny_perception_config(adapter=True), output_dim=24).eval()
    audio, lens = audio_batch([16000, 9000, 5000])
    with torch.no_grad():
        batched, blens = module(audio, lens)
        for i in range(3):
            alone, alens = module(audio[i : i + 1, : lens[i]], lens[i : i + 1])
            assert alens.item() == blens[i].item()
            torch.testing.assert_close(batched[i, : blens[i]], alone[0, : alens[0]], atol=1e-4, rtol=1e-4)


def test_spec_augment_only_in_training():
    torch.manual_seed(0)
    module = AudioPerceptionModule(tiny_perception_config(spec_augment=True), output_dim=24)
    plain = AudioPerceptionModule(tiny_perception_config(spec_augment=False), output_dim=24)
    plain.load_state_dict(module.state_dict())
    audio, lens = audio_batch([16000, 12000])
    feats = torch.randn(2, 100, 80)
    feat_lens = torch.tensor([100, 80])

    module.train()
    masked = module.spec_augmentation(feats, feat_lens)
    assert (masked == 0).any() and not torch.equal(masked, feats)
    module.eval()
    plain.eval()
    assert torch.equal(module.spec_augmentation(feats, feat_lens), feats)
    with torch.no_grad():
        torch.testing.assert_close(module(audio, lens)[0], plain(audio, lens)[0])


def test_causal_encoder_ignores_the_future():
    """Causal subsampling + causal convs + att_context_size [-1, 0]: output frame t sees input frames <= 8t."""
    torch.manual_seed(0)
    cfg = tiny_conformer_config(causal_downsampling=True, conv_context_size="causal", att_context_size=[-1, 0])
    encoder = ConformerEncoder(cfg).eval()
    feats = torch.randn(1, 96, 80)
    lens = torch.tensor([96])
    changed = feats.clone()
    changed[:, 41:] = torch.randn(1, 55, 80)  # frames > 8 * 5
    with torch.no_grad():
        a, _ = encoder(feats, lens)
        b, _ = encoder(changed, lens)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize(
    "overrides",
    [
        dict(conv_norm_type="layer_norm"),
        dict(conv_norm_type="group_norm"),
        dict(self_attention_model="abs_pos"),
        dict(self_attention_model="rel_pos_local_attn", att_context_size=[4, 4]),
        dict(att_context_size=[8, 2], att_context_style="chunked_limited"),
        dict(subsampling="striding", subsampling_factor=4, untie_biases=False, feat_out=48),
    ],
)
def test_encoder_variants_run_and_train(overrides):
    torch.manual_seed(0)
    encoder = ConformerEncoder(tiny_conformer_config(**overrides)).train()
    out, _ = encoder(torch.randn(2, 64, 80), torch.tensor([64, 40]))
    factor = overrides.get("subsampling_factor", 8)
    assert out.shape == (2, 64 // factor, overrides.get("feat_out", 32))
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def write_nemo_archive(path, encoder_cfg: dict, state: dict) -> None:
    config = {
        "sample_rate": 16000,
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "normalize": "per_feature",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": 80,
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 1.0e-05,
            "pad_to": 0,
            "pad_value": 0.0,
        },
        "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", **encoder_cfg},
        "decoder": {"_target_": "nemo.collections.asr.modules.RNNTDecoder"},
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with tarfile.open(path, "w:") as tar:
        for name, data in (
            ("./model_config.yaml", yaml.safe_dump(config).encode()),
            ("./model_weights.ckpt", buffer.getvalue()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_nemo_archive_loads_into_the_encoder(tmp_path):
    torch.manual_seed(0)
    nemo_encoder = dict(
        feat_in=80,
        n_layers=2,
        d_model=48,
        n_heads=4,
        subsampling="dw_striding",
        subsampling_factor=8,
        subsampling_conv_channels=16,
        ff_expansion_factor=2,
        self_attention_model="rel_pos",
        att_context_size=[[70, 13], [70, 1]],
        conv_kernel_size=5,
        conv_norm_type="batch_norm",
        conv_context_size="causal",
        causal_downsampling=True,
        xscaling=True,
        untie_biases=True,
        dropout=0.1,
        dropout_pre_encoder=0.1,
        dropout_emb=0.0,
        dropout_att=0.1,
        stochastic_depth_drop_prob=0.0,
        use_bias=True,
        pos_emb_max_len=5000,
        feat_out=-1,
    )
    source_cfg = ConformerConfig(
        **{k: v for k, v in nemo_encoder.items() if k not in ("stochastic_depth_drop_prob", "use_bias")}
        | {"att_context_size": [70, 13]}
    )
    source = ConformerEncoder(source_cfg)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    state = {f"encoder.{k}": v for k, v in source.state_dict().items()}
    # NeMo names, written out by hand: the archive must look like NeMo's, not just like ours.
    for name in (
        "encoder.pre_encode.conv.0.weight",
        "encoder.pre_encode.conv.2.weight",
        "encoder.pre_encode.conv.3.bias",
        "encoder.pre_encode.out.weight",
        "encoder.layers.1.self_attn.linear_q.weight",
        "encoder.layers.1.self_attn.linear_pos.weight",
        "encoder.layers.1.self_attn.pos_bias_u",
        "encoder.layers.0.conv.depthwise_conv.weight",
        "encoder.layers.0.conv.batch_norm.running_var",
        "encoder.layers.0.feed_forward1.linear1.weight",
        "encoder.layers.0.norm_out.bias",
    ):
        assert name in state
    state["preprocessor.featurizer.fb"] = torch.rand(1, 80, 257)
    state["preprocessor.featurizer.window"] = torch.rand(400)
    state["decoder.prediction.embed.weight"] = torch.randn(10, 4)  # not ours: ignored
    path = tmp_path / "asr.nemo"
    write_nemo_archive(path, nemo_encoder, state)

    # The user's encoder keys at their defaults take the archive's values; changed keys override.
    user = tiny_perception_config()
    user = dataclasses.replace(
        user, encoder=ConformerConfig(att_context_size=[70, 0]), preprocessor=PreprocessorConfig()
    )
    module = build_perception(user, output_dim=24, pretrained_asr=str(path))
    enc_cfg = module.encoder.cfg
    assert (enc_cfg.d_model, enc_cfg.n_layers, enc_cfg.conv_kernel_size) == (48, 2, 5)
    assert enc_cfg.att_context_size == [70, 0] and enc_cfg.causal_downsampling
    ours = module.state_dict()
    for key, value in state.items():
        if key.startswith("encoder."):
            assert torch.equal(ours[key], value), key
    assert torch.equal(ours["preprocessor.featurizer.fb"], state["preprocessor.featurizer.fb"])

    # As NeMo: without pretrained weights the archive is not read; model.perception is the whole architecture.
    random_init = build_perception(user, output_dim=24, pretrained_asr=str(path), pretrained_weights=False)
    assert random_init.encoder.cfg == user.encoder


def test_transformers_parakeet_checkpoint_gives_the_same_outputs(tmp_path):
    from transformers import ParakeetEncoder, ParakeetEncoderConfig, ParakeetFeatureExtractor

    torch.manual_seed(0)
    hf_cfg = ParakeetEncoderConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        subsampling_conv_channels=16,
        num_mel_bins=80,
        dropout=0.0,
        layerdrop=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    hf = ParakeetEncoder(hf_cfg).eval()
    for m in hf.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    hf.save_pretrained(tmp_path / "parakeet")
    fe = ParakeetFeatureExtractor()
    fe.save_pretrained(tmp_path / "parakeet")

    module = build_perception(PerceptionConfig(), output_dim=24, pretrained_asr=str(tmp_path / "parakeet")).eval()
    wavs = [np.random.default_rng(i).standard_normal(n).astype(np.float32) * 0.1 for i, n in enumerate((16000, 11000))]
    inputs = fe(wavs, sampling_rate=16000, return_tensors="pt", padding="longest")
    audio, lens = audio_batch([16000, 11000])
    for i, w in enumerate(wavs):
        audio[i, : len(w)] = torch.from_numpy(w)
    with torch.no_grad():
        feats, feat_lens = module.preprocessor(audio, lens)
        ref = hf(inputs.input_features, attention_mask=inputs.attention_mask)
        ours, out_lens = module.encoder(feats, feat_lens)
    assert feat_lens.tolist() == inputs.attention_mask.sum(1).tolist()
    for i in range(2):
        n = int(feat_lens[i])
        torch.testing.assert_close(feats[i, :n], inputs.input_features[i, :n], atol=1e-4, rtol=1e-4)
        m = int(out_lens[i])
        assert m == int(ref.attention_mask[i].sum())
        torch.testing.assert_close(ours[i, :m], ref.last_hidden_state[i, :m], atol=1e-4, rtol=1e-4)
