"""The duplex frame grid, the per-frame text channel and DuplexS2SCollator."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest

from orchestrator.config.schema import DataConfig
from speech_models.config import ModelConfig
from speech_models.duplex_data import (
    DuplexS2SCollator,
    build_text_channel,
    frame_of,
    num_frames,
    text_channel_to_str,
    text_special_ids,
)
from speech_models.registry import build_collator
from speech_models.testing import build_tiny_llm_dir, make_duplex_example

P, B, E = 0, 1, 2  # pad, bos, eos ids used in the pinned channels


def channel(turns, ids, n_frames, frame_length=0.08):
    return build_text_channel(turns, ids, n_frames, frame_length, bos_id=B, eos_id=E, pad_id=P)


def test_text_channel_two_turns_pinned():
    # turn 1: 0.16 s -> frame 2 (BOS), ends 0.80 s -> frame 10 (EOS); turn 2: 1.04 s -> frame 13, ends past the end.
    tokens, dropped = channel([(0.16, 0.64), (1.04, 0.8)], [[11, 12, 13], [21, 22]], n_frames=20)
    assert tokens.dtype == np.int64
    assert tokens.tolist() == [P, P, B, 11, 12, 13, P, P, P, P, E, P, P, B, 21, 22, P, P, P, P]
    assert dropped == 0


def test_text_channel_truncates_text_that_does_not_fit_before_eos():
    # 0.24 s turn = 3 frames: BOS at 0, EOS at 3, room for 2 text tokens.
    tokens, dropped = channel([(0.0, 0.24)], [[5, 6, 7, 8]], n_frames=6)
    assert tokens.tolist() == [B, 5, 6, E, P, P]
    assert dropped == 2


def test_text_channel_rounds_to_nearest_frame_and_handles_edges():
    assert frame_of(0.11, 0.08) == 1 and frame_of(0.12, 0.08) == 2 and frame_of(0.24, 0.08) == 3
    # a zero-length turn still gets BOS then EOS on the next frame
    assert channel([(0.12, 0.0)], [[9]], n_frames=5)[0].tolist() == [P, P, B, E, P]
    # a turn that starts after the conversation is skipped, its tokens counted as dropped
    tokens, dropped = channel([(1.0, 0.5)], [[7, 8]], n_frames=5)
    assert tokens.tolist() == [P] * 5 and dropped == 2
    # a turn cut by the end of the conversation keeps its text but has no EOS
    assert channel([(0.08, 1.0)], [[7, 8, 9, 10]], n_frames=4)[0].tolist() == [P, B, 7, 8]
    # overlapping turns: the later one wins where they collide
    assert channel([(0.0, 0.4), (0.24, 0.16)], [[3, 4, 5, 6], [7]], n_frames=7)[0].tolist() == [B, 3, 4, B, 7, E, P]


def test_num_frames_counts_a_partial_last_frame():
    assert num_frames(16000, 16000, 0.08) == 13  # 12.5 frames
    assert num_frames(1280 * 4, 16000, 0.08) == 4
    assert num_frames(1764 * 4, 22050, 0.08) == 4


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return build_tiny_llm_dir(tmp_path_factory.mktemp("duplex_data") / "llm")


def test_collator_batch_keys_shapes_and_alignment(llm_dir, caplog):
    model_cfg = ModelConfig(pretrained_llm=str(llm_dir), pretrained_audio_codec="unused")
    data_cfg = DataConfig()
    collator = build_collator(model_cfg, data_cfg, data_cfg.train_ds)
    assert isinstance(collator, DuplexS2SCollator)
    examples = [
        make_duplex_example(
            "a", 2.0, agent_turns=[(0.8, 0.96, "the sky is blue")], user_turns=[(0.0, 0.64, "what colour")]
        ),
        make_duplex_example("b", 1.5, agent_turns=[(0.16, 0.24, "three birds sit on the old green tree")], seed=1),
    ]
    with caplog.at_level(logging.WARNING, logger="speech_models.duplex_data"):
        batch = pickle.loads(pickle.dumps(collator))(examples)

    assert batch["source_audio"].dtype == np.float32 and batch["source_audio"].shape == (2, 32000)
    assert batch["source_audio_lens"].tolist() == [32000, 24000]
    assert batch["target_audio"].dtype == np.float32 and batch["target_audio"].shape == (2, 44100)
    assert batch["target_audio_lens"].tolist() == [44100, 33075]
    assert batch["frame_lens"].dtype == np.int64 and batch["frame_lens"].tolist() == [25, 19]
    assert batch["target_tokens"].dtype == np.int64 and batch["target_tokens"].shape == (2, 25)
    assert batch["references"] == ["the sky is blue", "three birds sit on the old green tree"]
    assert batch["cut_ids"] == ["a", "b"]

    tok = collator.tokenizer
    bos, eos, pad = text_special_ids(tok)
    row = batch["target_tokens"][0].tolist()
    ids = tok("the sky is blue", add_special_tokens=False)["input_ids"]
    assert row == [pad] * 10 + [bos, *ids] + [pad] * (22 - 11 - len(ids)) + [eos, pad, pad]
    assert text_channel_to_str(row, tok, bos, eos, pad) == "the sky is blue"
    # example b: a 3-frame turn cannot hold its text; the rest is dropped and logged with the cut id
    assert batch["target_tokens"][1, 2] == bos and batch["target_tokens"][1, 5] == eos
    assert batch["target_tokens"][1, 19:].tolist() == [pad] * 6  # past frame_lens: padding
    assert any("cut b" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)
    # the tokenizer is loaded lazily and never pickled
    assert pickle.loads(pickle.dumps(collator))._tokenizer is None


def test_collator_uses_configured_roles(llm_dir, caplog):
    model_cfg = ModelConfig(pretrained_llm=str(llm_dir))
    ex = make_duplex_example("c", 1.0, agent_turns=[(0.16, 0.64, "hello")])
    for sup in ex["supervisions"]:
        sup["speaker"] = "Assistant"
    batch = DuplexS2SCollator(model_cfg, DataConfig())([ex])
    assert batch["references"] == ["hello"]
    with caplog.at_level(logging.WARNING, logger="speech_models.duplex_data"):
        batch = DuplexS2SCollator(model_cfg, DataConfig(output_roles=["agent"]))([ex])
    assert batch["references"] == [""] and set(batch["target_tokens"][0].tolist()) == {collator_pad(llm_dir)}
    assert any("Assistant" in r.getMessage() for r in caplog.records)


def collator_pad(llm_dir) -> int:
    from transformers import AutoTokenizer

    return text_special_ids(AutoTokenizer.from_pretrained(llm_dir))[2]
