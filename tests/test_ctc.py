"""The CTC ASR model that makes the demo's pretrained encoder: NeMo archive layout, loading into a SALM, the
demo-parts recipe, and the shipped encoder transcribing demo speech."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speech_models.config import ConformerConfig, PerceptionConfig, PreprocessorConfig, SpecAugmentConfig
from speech_models.ctc import CTCModel, CTCModelConfig, load_nemo_ctc, nemo_config, save_nemo
from speech_models.perception import build_perception, load_nemo_asr

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "demo" / "pretrained"


def _tiny_ctc(vocabulary_size: int = 7, label_frames: int = 1) -> CTCModel:
    torch.manual_seed(0)
    encoder = ConformerConfig(feat_in=16, n_layers=1, d_model=32, n_heads=2, subsampling_conv_channels=8,
                              conv_kernel_size=3)  # fmt: skip
    cfg = CTCModelConfig(
        PreprocessorConfig(features=16), encoder, SpecAugmentConfig(), vocabulary_size, label_frames=label_frames
    )
    return CTCModel(cfg)


def test_archive_has_nemo_names_and_loads_back_exactly(tmp_path):
    model = _tiny_ctc().eval()
    vocabulary = [f"t{i}" for i in range(7)]
    path = save_nemo(tmp_path / "asr.nemo", model, nemo_config(model.cfg, vocabulary), {"tokenizer.json": b"{}"})
    assert not list(tmp_path.glob("*.partial"))
    state = model.state_dict()
    # NeMo's EncDecCTCModel names: the front end's buffers, the encoder, the ConvASRDecoder head (blank last).
    assert state["decoder.decoder_layers.0.weight"].shape == (8, 32, 1)
    assert "preprocessor.featurizer.fb" in state and "encoder.layers.0.self_attn.linear_q.weight" in state

    loaded, config, members = load_nemo_ctc(path)
    assert config["target"].endswith("EncDecCTCModelBPE") and config["decoder"]["vocabulary"] == vocabulary
    assert members["tokenizer.json"] == b"{}"
    audio, lens = torch.randn(2, 8000), torch.tensor([8000, 5000])
    torch.testing.assert_close(loaded(audio, lens)[0], model(audio, lens)[0], rtol=0, atol=0)


def test_salm_perception_takes_the_encoder_from_the_archive(tmp_path):
    model = _tiny_ctc().eval()
    path = save_nemo(tmp_path / "asr.nemo", model, nemo_config(model.cfg, ["a"] * 7))
    assert load_nemo_asr(path).encoder["d_model"] == 32  # the architecture comes from the archive
    perception = build_perception(PerceptionConfig(), output_dim=24, pretrained_asr=str(path)).eval()
    audio, lens = torch.randn(2, 8000), torch.tensor([8000, 6000])
    feats, flens = model.preprocessor(audio, lens)
    expected, _ = model.encoder(feats, flens)
    got_feats, got_lens = perception.preprocessor(audio, lens)
    got, _ = perception.encoder(got_feats, got_lens)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_label_frames_give_several_ctc_frames_per_encoder_frame():
    model = _tiny_ctc(vocabulary_size=5, label_frames=2).eval()
    audio, lens = torch.randn(1, 16000), torch.tensor([16000])
    log_probs, out_lens = model(audio, lens)
    feats, flens = model.preprocessor(audio, lens)
    _, enc_lens = model.encoder(feats, flens)
    assert log_probs.shape[-1] == 6 and int(out_lens[0]) == 2 * int(enc_lens[0])
    assert torch.isfinite(model.loss(audio, lens, [[1, 2, 3]]))


def test_demo_parts_recipe_runs_and_refuses_to_overwrite(tmp_path, tiny_demo):
    """The command that re-makes configs/demo/pretrained/, at toy scale: both parts load as users load them."""
    from transformers import AutoModelForCausalLM

    from orchestrator.cli.main import main
    from orchestrator.demo.parts import EncoderRecipe, LMRecipe, make_demo_parts

    work = tmp_path / "work" / "asr"
    work.mkdir(parents=True)
    for split in ("train", "val"):  # the session's tiny demo speech instead of synthesising hours of it
        (work / split).symlink_to(tiny_demo / "asr" / split)
    out = tmp_path / "parts"
    recipe = EncoderRecipe(train_hours=0.01, char_steps=2, token_steps=2, eval_every=2)
    summary = make_demo_parts(out, tmp_path / "work", lm=LMRecipe(steps=2), encoder=recipe, num_workers=1)
    assert [h["stage"] for h in summary["encoder"]["history"]] == ["characters", "llm_tokens"]
    assert AutoModelForCausalLM.from_pretrained(out / "llm").config.model_type == "llama"
    assert load_nemo_asr(out / "asr_ctc.nemo").state_dict
    before = (out / "asr_ctc.nemo").read_bytes()
    code = main(["data", "demo-parts", "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 2 and (out / "asr_ctc.nemo").read_bytes() == before


@pytest.mark.skipif(not (SHIPPED / "asr_ctc.nemo").exists(), reason="configs/demo/pretrained/ not built")
def test_shipped_encoder_transcribes_demo_speech(tiny_demo):
    """The encoder the demo starts from already transcribes demo speech it never saw (the val split)."""
    import jiwer
    from lhotse import CutSet
    from transformers import AutoTokenizer

    model, _, _ = load_nemo_ctc(SHIPPED / "asr_ctc.nemo")
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED / "llm")
    cuts = list(CutSet.from_shar(in_dir=str(tiny_demo / "asr" / "val")))
    refs, hyps = [], []
    for cut in cuts:
        audio = torch.from_numpy(cut.load_audio().reshape(1, -1))
        ids = model.greedy_ids(audio, torch.tensor([audio.shape[1]]))[0]
        refs.append(" ".join(s.text for s in cut.supervisions))
        hyps.append(" ".join(tokenizer.decode(ids, skip_special_tokens=True).split()))
    assert jiwer.wer(refs, hyps) < 0.15, list(zip(refs, hyps, strict=True))[:5]
