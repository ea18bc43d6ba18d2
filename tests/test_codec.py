"""AudioCodec: frame alignment with 80 ms frames, encode/decode shapes, frozen fp32, checkpoints, resampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from speech_models.codec import AudioCodec, resample
from speech_models.testing import build_tiny_codec_dir, build_tiny_llm_dir

FRAME = 0.08


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tmp_path_factory.mktemp("codec")


def load(assets, kind: str) -> AudioCodec:
    return AudioCodec.from_pretrained(str(build_tiny_codec_dir(assets / kind, kind)), frame_length=FRAME)


@pytest.mark.parametrize(
    ("kind", "group", "num_codebooks"),
    [("dac", 2, 4), ("encodec", 2, 4), ("mimi", 2, 4), ("dac_16k", 4, 8)],
)
def test_aligned_codec_encodes_onto_the_frame_grid(assets, kind, group, num_codebooks):
    codec = load(assets, kind)
    assert codec.codec_frames_per_frame == group and codec.num_codebooks == num_codebooks
    sr = 22050  # agent audio rate; the 16 kHz codecs resample it
    lens = torch.tensor([sr, sr * 6 // 10])  # 1.0 s (12.5 frames) and 0.6 s (7.5 frames)
    audio = torch.randn(2, sr) * 0.1
    codes, frame_lens = codec.encode(audio, lens, sr)
    assert codes.shape == (2, 13, num_codebooks) and codes.dtype == torch.long
    assert frame_lens.tolist() == [13, 8]
    assert int(codes.min()) >= 0 and int(codes.max()) < codec.codebook_size
    assert len(torch.unique(codes)) > 1  # the tiny codecs' codebooks are spread, not all zeros

    wav, wav_lens = codec.decode(codes, frame_lens, sr)
    assert wav.shape == (2, 13 * 1764) and wav.dtype == torch.float32
    assert wav_lens.tolist() == [13 * 1764, 8 * 1764]
    assert torch.isfinite(wav).all() and wav[1, 8 * 1764 :].abs().max() == 0

    # a fixed number of frames pads or cuts the audio to exactly that grid
    assert codec.encode(audio, lens, sr, n_frames=20)[0].shape == (2, 20, num_codebooks)
    assert codec.encode(audio, lens, sr, n_frames=5)[0].shape == (2, 5, num_codebooks)


def test_misaligned_codec_names_both_rates(assets):
    with pytest.raises(ValueError) as err:
        load(assets, "dac_misaligned")  # 16 kHz / hop 512 = 31.25 Hz: 2.5 codec frames per 80 ms frame
    message = str(err.value)
    assert "31.25 Hz" in message and "12.5 Hz" in message and "data.frame_length=0.08" in message


def test_codec_rate_that_aligns_with_other_frame_lengths(assets):
    path = str(build_tiny_codec_dir(assets / "dac", "dac"))  # 25 Hz
    assert AudioCodec.from_pretrained(path, frame_length=0.04).codec_frames_per_frame == 1
    with pytest.raises(ValueError, match="25 Hz"):
        AudioCodec.from_pretrained(path, frame_length=0.02)  # half a codec frame per model frame


def test_codec_stays_frozen_fp32_eval_and_out_of_checkpoints(assets):
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 2)
            self.audio_codec = load(assets, "mimi")

    parent = Parent().to(torch.bfloat16).train()
    codec = parent.audio_codec
    assert parent.head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in codec.parameters())
    assert not codec.training and not codec.model.training
    state = parent.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    before = {k: v.clone() for k, v in codec.model.state_dict().items()}
    parent.load_state_dict(state)  # strict: the codec's absence is not an error, and it keeps its weights
    assert all(torch.equal(before[k], v) for k, v in codec.model.state_dict().items())
    codes, _ = codec.encode(torch.randn(1, 16000).to(torch.bfloat16), torch.tensor([16000]), 16000)
    assert codes.shape == (1, 13, 4)


def test_silence_codes_are_real_codec_ids(assets):
    codec = load(assets, "dac")
    silence = codec.silence_codes()
    assert silence.shape == (codec.num_codebooks,) and int(silence.max()) < codec.codebook_size


def test_from_pretrained_rejects_non_codecs(tmp_path):
    llm = build_tiny_llm_dir(tmp_path / "llm")
    with pytest.raises(ValueError, match="'llama' model"):
        AudioCodec.from_pretrained(str(llm), frame_length=FRAME)
    with pytest.raises(ValueError, match="pretrained_audio_codec="):
        AudioCodec.from_pretrained(str(tmp_path / "missing"), frame_length=FRAME)


def test_resample_keeps_a_tone_and_gives_ceil_length():
    t = torch.arange(22050) / 22050
    tone = torch.sin(2 * math.pi * 440 * t)[None]
    down = resample(tone, 22050, 16000)
    assert down.shape == (1, 16000)
    expected = torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000)
    assert (down[0, 200:-200] - expected[200:-200]).abs().max() < 1e-2
    assert resample(tone[:, :1001], 22050, 24000).shape == (1, math.ceil(1001 * 24000 / 22050))
    assert resample(tone, 22050, 22050) is tone
