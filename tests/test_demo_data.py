"""Demo assets: grammar splits, eSpeak synthesis, the Shar layout, determinism and the tiny LLM dir."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.demo import grammar, synth
from orchestrator.demo.assets import AGENT_SAMPLE_RATE, S2S_FRAME_SECONDS, USER_SAMPLE_RATE, make_demo_assets
from orchestrator.storage.atomic import marker_for
from speech_models.testing import DEFAULT_TINY_CORPUS, build_tiny_llm_dir

REPO = Path(__file__).resolve().parents[1]
# About 15 ASR train cuts and 5 conversations: enough for several shards, a few seconds to build.
SMALL = dict(hours=0.01, s2s_hours=0.005, seed=3, min_heldout_cuts=4, shard_size=4, progress=False)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_assets(out, num_workers=1, **SMALL)
    return out


# ---------------------------------------------------------------------------------------------- grammar


def test_sentence_splits_are_disjoint_and_share_vocabulary():
    train = set(itertools.islice(grammar.generate_sentences("train", 0), 3000))
    vocab = grammar.vocabulary()
    for split in ("val", "test"):
        held = set(itertools.islice(grammar.generate_sentences(split, 0), 200))
        assert not held & train
        assert {w for s in held for w in s.split()} <= vocab
    val = set(itertools.islice(grammar.generate_sentences("val", 0), 200))
    assert not val & set(itertools.islice(grammar.generate_sentences("test", 0), 200))
    assert 250 <= len(vocab) <= 400


def test_qa_splits_are_disjoint_by_question():
    train = {p.question for p in itertools.islice(grammar.generate_qa_pairs("train", 0), 2000)}
    val = {p.question for p in itertools.islice(grammar.generate_qa_pairs("val", 0), 200)}
    test = {p.question for p in itertools.islice(grammar.generate_qa_pairs("test", 0), 200)}
    assert not train & val and not train & test and not val & test


def test_sentences_are_deterministic_and_within_length():
    first = list(itertools.islice(grammar.generate_sentences("train", 7), 300))
    again = list(itertools.islice(grammar.generate_sentences("train", 7), 300))
    other = list(itertools.islice(grammar.generate_sentences("train", 8), 300))
    assert first == again and first != other
    assert len(set(first)) == len(first)
    assert {len(s.split()) for s in first} == set(range(grammar.MIN_WORDS, grammar.MAX_WORDS + 1))


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split 'dev' is unknown"):
        next(grammar.generate_sentences("dev", 0))


# ---------------------------------------------------------------------------------------------- eSpeak


def test_every_demo_voice_speaks_deterministically():
    for voice in synth.all_voices():
        style = synth.VoiceStyle(voice, rate=170, pitch=50)
        audio = synth.synthesize("the red ball", style)
        assert audio.dtype == np.float32 and 0.3 < len(audio) / synth.SAMPLE_RATE < 2.0, voice
        assert 0.1 < np.abs(audio).max() <= 1.0, voice
    style = synth.VoiceStyle("en-gb-x-rp+f3", rate=150, pitch=40, word_gap=3)
    np.testing.assert_array_equal(synth.synthesize("hello anna", style), synth.synthesize("hello anna", style))


def test_unknown_voice_names_the_fix():
    with pytest.raises(ValueError, match="eSpeak voice 'xx-nope' not found"):
        synth.synthesize("hello", synth.VoiceStyle("xx-nope", 150, 50))


# ---------------------------------------------------------------------------------------------- demo layout


def test_demo_layout(demo_dir: Path):
    for task in ("asr", "s2s"):
        for split in ("train", "val", "test"):
            files = sorted(p.name for p in (demo_dir / task / split).iterdir())
            assert "cuts.000000.jsonl.gz" in files and "recording.000000.tar" in files
            assert ("target_audio.000000.tar" in files) == (task == "s2s")
    assert not list(demo_dir.glob("*/.*.partial"))
    done = json.loads((demo_dir / "DONE.json").read_text())
    assert done["seed"] == SMALL["seed"] and done["counts"]["asr"]["val"]["cuts"] >= 4
    assert (demo_dir / "llm" / "config.json").exists()


def test_asr_shar_reads_back_with_plain_lhotse(demo_dir: Path):
    from lhotse import CutSet

    cuts = list(CutSet.from_shar(in_dir=demo_dir / "asr" / "train"))
    assert len(cuts) == json.loads((demo_dir / "DONE.json").read_text())["counts"]["asr"]["train"]["cuts"]
    assert len({c.id for c in cuts}) == len(cuts) and not any("." in c.id for c in cuts)
    assert sum(c.duration for c in cuts) >= SMALL["hours"] * 3600
    for cut in cuts[:5]:
        audio = cut.load_audio()
        assert cut.sampling_rate == USER_SAMPLE_RATE and audio.shape == (1, cut.num_samples)
        assert np.abs(audio).max() > 0.05
        (sup,) = cut.supervisions
        assert sup.text and sup.language == "en" and sup.speaker in synth.all_voices()
        assert 1.0 <= cut.duration <= 6.0


def test_new_voice_split_is_spoken_by_voices_no_training_split_uses(demo_dir: Path):
    """`asr/test_new_voice` (for `speechlm eval`) and its WAVs (for `speechlm infer`) hold test sentences in voices
    outside synth.all_voices(), with a pitch outside the training range."""
    import soundfile as sf
    from lhotse import CutSet

    from orchestrator.demo.grammar import split_of

    cuts = list(CutSet.from_shar(in_dir=demo_dir / "asr" / "test_new_voice"))
    assert len(cuts) == 40
    for cut in cuts:
        (sup,) = cut.supervisions
        assert sup.speaker not in synth.all_voices() and split_of(sup.text) == "test"
    wavs = sorted((demo_dir / "asr" / "new_voice_wav").glob("*.wav"))
    assert len(wavs) == 3
    for wav in wavs:
        audio, rate = sf.read(wav)
        assert rate == USER_SAMPLE_RATE and np.abs(audio).max() > 0.05
        assert split_of(wav.with_suffix(".txt").read_text().strip()) == "test"


def test_s2s_shar_has_user_and_agent_channels(demo_dir: Path):
    from lhotse import CutSet

    cuts = list(CutSet.from_shar(in_dir=demo_dir / "s2s" / "val"))
    assert len(cuts) >= SMALL["min_heldout_cuts"]
    for cut in cuts:
        user_audio, agent_audio = cut.load_audio(), cut.load_target_audio()
        assert cut.sampling_rate == USER_SAMPLE_RATE
        assert cut.target_audio.sampling_rate == AGENT_SAMPLE_RATE
        assert user_audio.shape[1] / USER_SAMPLE_RATE == pytest.approx(cut.duration)
        assert agent_audio.shape[1] / AGENT_SAMPLE_RATE == pytest.approx(cut.duration)
        user, agent = cut.supervisions
        assert (user.speaker, agent.speaker) == ("user", "agent")
        assert user.start == 0 and 0.2 <= agent.start - user.end <= 0.5 + 1e-3
        assert agent.end <= cut.duration and user.text.split()[0] in {"what", "where", "how", "please"}
        # Each channel is silent while the other party speaks.
        assert np.abs(user_audio[0, int((user.end + 0.01) * USER_SAMPLE_RATE) :]).max() == 0
        assert np.abs(agent_audio[0, : int((agent.start - 0.01) * AGENT_SAMPLE_RATE)]).max() == 0


def test_agent_turn_opens_before_the_codec_hears_its_voice(demo_dir: Path):
    """Teacher forcing feeds the model the codes of the frame before; were those codes to stir before the turn's BOS
    frame (the codec's encoder looks ahead), the model would learn to start answering on a cue it never gets when
    it generates. So every code before the BOS frame is the codec's silence."""
    import torch
    from lhotse import CutSet

    from speech_models.codec import AudioCodec
    from speech_models.duplex_data import frame_of

    codec = AudioCodec.from_pretrained(str(demo_dir / "codec"), frame_length=S2S_FRAME_SECONDS)
    for cut in CutSet.from_shar(in_dir=demo_dir / "s2s" / "val"):
        agent_audio = torch.from_numpy(cut.load_target_audio())
        codes, _ = codec.encode(agent_audio, torch.tensor([agent_audio.shape[1]]), AGENT_SAMPLE_RATE)
        bos_at = frame_of(cut.supervisions[1].start, S2S_FRAME_SECONDS)
        assert (codes[0, :bos_at] == codec.silence_codes()).all(), cut.id
        assert (codes[0, bos_at:] != codec.silence_codes()).any(), cut.id  # the voice does come


def test_demo_splits_do_not_share_sentences(demo_dir: Path):
    from lhotse import CutSet

    def texts(task: str, split: str) -> set[str]:
        cuts = CutSet.from_shar(fields={"cuts": sorted(map(str, (demo_dir / task / split).glob("cuts.*")))})
        return {c.supervisions[0].text for c in cuts}

    for task in ("asr", "s2s"):
        train, val, test = (texts(task, s) for s in ("train", "val", "test"))
        assert not train & val and not train & test and not val & test


def _shar_content(root: Path) -> list:
    """Cut manifests and decoded audio of a demo, for comparing two builds."""
    from lhotse import CutSet

    content = []
    for split_dir in sorted([*root.glob("asr/*"), *root.glob("s2s/*")]):  # not llm/ or codec/
        if not list(split_dir.glob("cuts.*")):  # the new-voice WAVs for `speechlm infer`
            content += [(p.name, p.read_bytes()) for p in sorted(split_dir.iterdir())]
            continue
        for path in sorted(split_dir.glob("cuts.*.jsonl.gz")):
            with gzip.open(path, "rt") as f:
                content.append((path.relative_to(root), f.read()))
        for cut in CutSet.from_shar(in_dir=split_dir):
            content.append(cut.load_audio().tobytes())
            if cut.has_custom("target_audio"):
                content.append(cut.load_target_audio().tobytes())
    return content


def test_demo_is_deterministic_across_worker_counts(demo_dir: Path, tmp_path: Path):
    make_demo_assets(tmp_path / "again", num_workers=2, **SMALL)
    assert _shar_content(tmp_path / "again") == _shar_content(demo_dir)


def test_demo_rerun_skips_existing_and_rejects_other_params(demo_dir: Path):
    before = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*.tar")}
    summary = make_demo_assets(demo_dir, num_workers=1, **SMALL)
    assert all(s.skipped for splits in summary.splits.values() for s in splits.values())
    assert summary.audio_hours_made == 0
    assert {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*.tar")} == before
    with pytest.raises(FileExistsError, match="remove the directory or choose another --out"):
        make_demo_assets(demo_dir, num_workers=1, **{**SMALL, "seed": 4})


def test_demo_refuses_assets_of_an_earlier_layout(tmp_path: Path):
    """Same parameters, older data layout: refused with the fix named, so old conversations are not mixed in."""
    (tmp_path / ".demo_params.json").write_text(json.dumps({"seed": 3}))  # no "layout": written before it existed
    with pytest.raises(FileExistsError, match=r"layout 1 .*rm -r "):
        make_demo_assets(tmp_path, num_workers=1, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo_params.json"]  # nothing made, nothing removed


def test_demo_redoes_an_interrupted_split(tmp_path: Path):
    params = dict(SMALL, hours=0.002, s2s_hours=0.002, min_heldout_cuts=1)
    make_demo_assets(tmp_path, num_workers=1, **params)
    (tmp_path / "DONE.json").unlink()
    split = tmp_path / "asr" / "test"
    partial = tmp_path / "asr" / ".test.partial"
    split.rename(partial)  # as if killed while writing: the in-progress marker is still beside it
    marker_for(partial).write_text("{}")
    summary = make_demo_assets(tmp_path, num_workers=1, **params)
    assert not summary.splits["asr"]["test"].skipped and summary.splits["asr"]["train"].skipped
    assert split.is_dir() and (tmp_path / "DONE.json").exists()


# ---------------------------------------------------------------------------------------------- tiny LLM


def test_tiny_llm_dir_loads_offline_in_a_fresh_process(demo_dir: Path):
    """HF_HUB_OFFLINE=1 must be set before transformers is imported, hence the subprocess."""
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "d = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(d)\n"
        "model = AutoModelForCausalLM.from_pretrained(d)\n"
        "ids = tok('the red ball is on the table', return_tensors='pt').input_ids\n"
        "assert tok.decode(ids[0]) == 'the red ball is on the table'\n"
        "assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ('<s>', '</s>', '<pad>', '<unk>')\n"
        "logits = model(ids).logits\n"
        "assert logits.shape == (1, ids.shape[1], model.config.vocab_size)\n"
        "assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(demo_dir / "no-hf-home")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script, str(demo_dir / "llm")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_demo_tokenizer_covers_the_vocabulary_with_whole_words(demo_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "llm")
    for word in sorted(grammar.vocabulary()):
        ids = tok(word, add_special_tokens=False).input_ids
        assert tok.decode(ids) == word
        assert tok.unk_token_id not in ids


def test_build_tiny_llm_dir_is_seeded_and_idempotent(tmp_path: Path):
    from safetensors.numpy import load_file

    a = build_tiny_llm_dir(tmp_path / "a", DEFAULT_TINY_CORPUS, size="small", seed=1)
    b = build_tiny_llm_dir(tmp_path / "b", DEFAULT_TINY_CORPUS, size="small", seed=1)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / "config.json").read_text())["hidden_size"] == 256
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llm_dir(a, DEFAULT_TINY_CORPUS, size="small", seed=1) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by build_tiny_llm_dir"):
        build_tiny_llm_dir(tmp_path / "other")
    with pytest.raises(ValueError, match="llm size 'huge' is unknown"):
        build_tiny_llm_dir(tmp_path / "c", size="huge")
