"""`speechlm infer`: SALM text from audio files; duplex text plus the agent's speech as a WAV file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from orchestrator.cli.main import main
from orchestrator.config import experiment_from_dict, to_dict
from orchestrator.config.schema import ExperimentConfig
from orchestrator.demo.synthetic_shar import write_synthetic_shar
from orchestrator.inference.infer import infer, read_audio
from orchestrator.inference.sources import load_model, resolve_source
from orchestrator.testing import write_checkpoint
from speech_models.prompts import encode_dialog
from speech_models.registry import build_model
from speech_models.testing import build_tiny_codec_dir, build_tiny_llm_dir, tiny_duplex_model_config, tiny_salm_config


def make_checkpoint(root: Path, model_cfg, context: str | None = None) -> Path:
    shar = write_synthetic_shar(
        root / "shar", n_cuts=2, n_shards=1, with_target_audio=model_cfg.pretrained_audio_codec is not None
    )
    tags = {"context": context} if context else {}
    cfg = experiment_from_dict(
        {
            "model": to_dict(ExperimentConfig(model=model_cfg))["model"],
            "trainer": {"max_steps": 1, "val_check_interval": 1, "accelerator": "cpu"},
            "exp_manager": {"explicit_log_dir": str(root / "run")},
            "data": {"train_ds": {"input_cfg": [{"shar_path": str(shar), "tags": tags}], "batch_size": 2}},
        }
    ).cfg
    torch.manual_seed(cfg.trainer.seed)
    return write_checkpoint(root / "run" / "step=0000001", build_model(cfg.model, cfg.data), cfg, step=1)


def write_wav(path: Path, seconds: float, rate: int, freq: float = 220.0) -> Path:
    t = np.arange(round(seconds * rate)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return build_tiny_llm_dir(tmp_path_factory.mktemp("llm") / "llm")


def test_duplex_infer_writes_the_agent_speech_as_wav(tmp_path, llm_dir, capsys):
    codec = build_tiny_codec_dir(tmp_path / "codec", "dac")
    ckpt = make_checkpoint(tmp_path, tiny_duplex_model_config(llm_dir, codec))
    user = [write_wav(tmp_path / "hello.wav", 0.5, 16000), write_wav(tmp_path / "other.flac", 0.3, 8000)]
    out_dir = tmp_path / "out"
    assert main(["infer", str(ckpt.parent), *map(str, user), "--out-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and printed[0].startswith(str(user[0])) and "hello.agent.wav" in printed[0]
    for wav, seconds in ((out_dir / "hello.agent.wav", 0.5), (out_dir / "other.agent.wav", 0.3)):
        info = sf.info(str(wav))
        assert info.samplerate == 22050  # data.target_sample_rate
        assert info.frames == round(math.ceil(seconds / 0.08 - 1e-6) * 0.08 * 22050)  # whole 80 ms frames

    # the same speech as offline_inference on the same (resampled) input
    source = resolve_source(str(ckpt))
    model, _ = load_model(source)
    audio = read_audio(user[0], 16000)
    expected = model.offline_inference(audio[None], np.array([len(audio)]))
    written, _ = sf.read(str(out_dir / "hello.agent.wav"), dtype="float32")
    reference = np.clip(expected["audio"][0, : int(expected["audio_len"][0])].numpy(), -1, 1)
    np.testing.assert_allclose(written, reference, atol=1.0 / 32767)  # 16-bit PCM


def test_salm_infer_uses_the_training_prompt_or_the_given_one(tmp_path, llm_dir):
    ckpt = make_checkpoint(tmp_path, tiny_salm_config(llm_dir), context="Transcribe:")
    wav = write_wav(tmp_path / "a.wav", 0.6, 16000)
    source = resolve_source(str(ckpt))
    assert source.prompt.context == "Transcribe:"
    model, autocast = load_model(source)
    audio = read_audio(wav, 16000)
    for prompt in (None, "Answer the question:"):
        turns = [{"role": "user", "content": f"{prompt or 'Transcribe:'} {model.cfg.audio_locator_tag}"}]
        ids, _ = encode_dialog(turns, model.tokenizer, model.cfg.prompt_format, add_generation_prompt=True)
        _, expected = model.generate([ids], audio[None], [len(audio)], max_new_tokens=5)
        (result,) = infer(source, [wav], prompt=prompt, max_new_tokens=5, loaded=(model, autocast))
        assert result.text == expected[0] and result.output_audio is None and result.audio_seconds == pytest.approx(0.6)


def test_infer_bad_input_exits_2(tmp_path, llm_dir):
    ckpt = make_checkpoint(tmp_path, tiny_salm_config(llm_dir))
    assert main(["infer", str(ckpt), str(tmp_path / "missing.wav")]) == 2
    assert main(["infer", str(tmp_path / "not_a_model"), str(tmp_path / "missing.wav")]) == 2
    assert main(["infer", str(ckpt), "x.wav", "--set", "model.no_such_key=1"]) == 2  # config error, named
