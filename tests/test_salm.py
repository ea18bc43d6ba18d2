"""SALM: splicing, batch format, training signal, generation, offline loading, NeMo parameter layout."""

from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torch

from orchestrator.config.schema import DataConfig, DatasetConfig, InputConfig
from speech_models.prompts import encode_dialog
from speech_models.salm import SALM, SALMCollator, replace_placeholders_and_build_targets
from speech_models.testing import build_tiny_llm_dir, tiny_salm_config

PAD, PH = 0, 9


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return build_tiny_llm_dir(tmp_path_factory.getbasetemp() / "tiny_llm")


@pytest.fixture(scope="module")
def cfg(llm_dir):
    return tiny_salm_config(llm_dir)


def make_examples(n=3, seed=0):
    rng = np.random.default_rng(seed)
    texts = ["the quick brown fox", "hello how are you doing this morning", "three birds", "the sky is blue"]
    return [
        {
            "id": f"cut-{i}",
            "duration": 1.0 - 0.2 * i,
            "audio": (rng.standard_normal(16000 - 3200 * i) * 0.1).astype(np.float32),
            "text": texts[i % len(texts)],
            "supervisions": [{"speaker": "user", "start": 0.0, "duration": 1.0 - 0.2 * i, "text": texts[i % 4]}],
        }
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------- splicing


def const_embeds(input_ids: torch.Tensor, D: int = 2) -> torch.Tensor:
    """embeds[b, l] = 10 * b + l on every channel, so expected outputs are easy to write by hand."""
    B, L = input_ids.shape
    values = 10 * torch.arange(B)[:, None] + torch.arange(L)[None, :]
    return values[..., None].expand(B, L, D).float()


def rep(*values: float, D: int = 2) -> torch.Tensor:
    return torch.tensor(values).float()[:, None].expand(len(values), D)


def test_splice_left_padding_and_several_audios_in_one_row():
    input_ids = torch.tensor([[PAD, PAD, 5, PH, 6], [7, PH, 8, PH, 6]])
    targets_in = torch.tensor([[-100, -100, 5, PH, 6], [7, PH, 8, PH, 6]])
    replacements = [rep(100, 101), rep(200), rep(300, 301, 302)]
    embeds, targets, attention = replace_placeholders_and_build_targets(
        input_ids, const_embeds(input_ids), PAD, PH, replacements, targets_in
    )
    expected = torch.tensor([[0, 0, 0, 2, 100, 101, 4], [10, 200, 12, 300, 301, 302, 14]]).float()
    torch.testing.assert_close(embeds, expected[..., None].expand(2, 7, 2))
    assert targets.tolist() == [[-100, -100, -100, 5, -100, -100, 6], [7, -100, 8, -100, -100, -100, 6]]
    assert attention.tolist() == [[False, False, False, True, True, True, True], [True] * 7]


def test_splice_removes_excess_padding():
    input_ids = torch.tensor([[PAD, PAD, PAD, 5, PH], [PAD, PAD, PAD, PH, 6]])
    embeds, targets, attention = replace_placeholders_and_build_targets(
        input_ids, const_embeds(input_ids), PAD, PH, [rep(100), rep(200, 201)], input_ids
    )
    expected = torch.tensor([[0, 3, 100], [200, 201, 14]]).float()
    torch.testing.assert_close(embeds, expected[..., None].expand(2, 3, 2))
    assert targets.tolist() == [[-100, 5, -100], [-100, -100, 6]]
    assert attention.tolist() == [[False, True, True], [True, True, True]]


def test_splice_count_mismatch_names_both_counts():
    input_ids = torch.tensor([[5, PH, PH], [PAD, 6, 7]])
    with pytest.raises(ValueError, match=r"2 audio placeholders.*1 replacements"):
        replace_placeholders_and_build_targets(input_ids, const_embeds(input_ids), PAD, PH, [rep(1)], input_ids)
    with pytest.raises(ValueError, match=r"2 audio placeholders.*3 replacements"):
        replace_placeholders_and_build_targets(
            input_ids, const_embeds(input_ids), PAD, PH, [rep(1), rep(2), rep(3)], input_ids
        )


def reference_splice(input_ids, embeds, pad, ph, replacements, targets):
    """Row-by-row loop with NeMo's semantics (the vectorised version must agree with it)."""
    rows, k = [], 0
    for b in range(input_ids.size(0)):
        nz = (input_ids[b] != pad).nonzero()
        start = int(nz[0]) if len(nz) else input_ids.size(1)
        e, t, a = [], [], []
        for pos in range(start, input_ids.size(1)):
            if input_ids[b, pos] == ph:
                r = replacements[k]
                k += 1
                e.append(r)
                t += [-100] * len(r)
                a += [True] * len(r)
            else:
                e.append(embeds[b, pos : pos + 1])
                t.append(int(targets[b, pos]))
                a.append(bool(input_ids[b, pos] != pad))
        rows.append((torch.cat(e) if e else embeds.new_zeros(0, embeds.size(-1)), t, a))
    L = max(len(t) for _, t, _ in rows)
    out = embeds.new_zeros(len(rows), L, embeds.size(-1))
    tgt = torch.full((len(rows), L), -100)
    att = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, (e, t, a) in enumerate(rows):
        n = len(t)
        if n:
            out[b, L - n :], tgt[b, L - n :], att[b, L - n :] = e, torch.tensor(t), torch.tensor(a)
    return out, tgt, att


def test_splice_matches_reference_loop_and_passes_gradients():
    gen = torch.Generator().manual_seed(0)
    B, L, D = 5, 12, 4
    input_ids = torch.randint(1, 20, (B, L), generator=gen)
    input_ids[input_ids % 5 == 0] = PH
    for b in range(B):
        input_ids[b, : int(torch.randint(0, L // 2, (1,), generator=gen))] = PAD
    targets = torch.where(torch.rand(B, L, generator=gen) < 0.5, input_ids, -100)
    n_ph = int((input_ids == PH).sum())
    embeds = torch.randn(B, L, D, generator=gen, requires_grad=True)
    replacements = [
        torch.randn(int(n), D, generator=gen, requires_grad=True) for n in torch.randint(1, 6, (n_ph,), generator=gen)
    ]
    out, tgt, att = replace_placeholders_and_build_targets(input_ids, embeds, PAD, PH, replacements, targets)
    ref_out, ref_tgt, ref_att = reference_splice(
        input_ids, embeds.detach(), PAD, PH, [r.detach() for r in replacements], targets
    )
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(tgt, ref_tgt) and torch.equal(att, ref_att)
    out.sum().backward()
    assert all(torch.equal(r.grad, torch.ones_like(r)) for r in replacements)
    kept = (input_ids != PAD).cumsum(1).gt(0) & (input_ids != PH)
    assert torch.equal(embeds.grad[..., 0] == 1, kept)


# ---------------------------------------------------------------------------------------------- collator


def test_collator_batch_format(cfg, llm_dir):
    dataset_cfg = DatasetConfig(
        input_cfg=[InputConfig(shar_path="x"), InputConfig(shar_path="y", tags={"context": "transcribe"})]
    )
    collator = SALMCollator(cfg, DataConfig(), dataset_cfg)
    collator = pickle.loads(pickle.dumps(collator))  # what Ray Data does
    examples = make_examples(3)
    batch = collator(examples)
    assert collator._tokenizer is not None  # loaded lazily on first call...
    assert pickle.loads(pickle.dumps(collator))._tokenizer is None  # ...and never shipped with the pickle
    assert set(batch) == {
        "audios",
        "audio_lens",
        "input_ids",
        "loss_mask",
        "prompt_ids",
        "answerable",
        "references",
        "cut_ids",
    }
    assert batch["answerable"].tolist() == [True] * 3
    assert batch["audios"].dtype == np.float32 and batch["audios"].shape == (3, 16000)
    assert batch["audio_lens"].tolist() == [16000, 12800, 9600] and batch["audio_lens"].dtype == np.int64
    np.testing.assert_array_equal(batch["audios"][1, :12800], examples[1]["audio"])
    assert not batch["audios"][1, 12800:].any()
    assert batch["input_ids"].dtype == np.int64 and batch["loss_mask"].dtype == np.bool_
    assert batch["references"] == [e["text"] for e in examples] and batch["cut_ids"] == ["cut-0", "cut-1", "cut-2"]

    tok = collator.tokenizer
    pad = tok.pad_token_id
    for i, ex in enumerate(examples):
        turns = [
            {"role": "user", "content": f"transcribe {cfg.audio_locator_tag}"},
            {"role": "assistant", "content": ex["text"]},
        ]
        ids, mask = encode_dialog(turns, tok, "llama2")
        row, row_mask = batch["input_ids"][i], batch["loss_mask"][i]
        n_pad = row.shape[0] - len(ids)
        assert (row[:n_pad] == pad).all() and row[n_pad:].tolist() == ids  # left padding
        assert not row_mask[:n_pad].any() and row_mask[n_pad:].tolist() == mask
        assert tok.decode(row[row_mask]) == f"{ex['text']} </s>"  # answer + eos, nothing else (NeMo's llama2)
        prompt = encode_dialog(turns[:1], tok, "llama2", add_generation_prompt=True)[0]
        p_row = batch["prompt_ids"][i]
        assert p_row[p_row.shape[0] - len(prompt) :].tolist() == prompt == ids[: mask.index(True)]
        assert (p_row[: p_row.shape[0] - len(prompt)] == pad).all()
        assert row.tolist().count(tok.convert_tokens_to_ids(cfg.audio_locator_tag)) == 1


# ---------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def batch(cfg):
    return SALMCollator(cfg, DataConfig(), DatasetConfig())(make_examples(3))


def test_parameter_names_follow_nemo(cfg):
    model = SALM(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert "embed_tokens.weight" in names and "llm.lm_head.weight" in names
    assert not any("llm.model.embed_tokens" in n for n in names)
    assert any(n.startswith("llm.model.layers.0.self_attn.q_proj") for n in names)
    assert any(n.startswith("perception.encoder.layers.0.self_attn.linear_q") for n in names)
    assert "perception.proj.weight" in names
    assert "perception.preprocessor.featurizer.fb" in model.state_dict()
    # As NeMo: the audio tag gets the next free id and the embedding is not resized for it (never embedded).
    assert model.audio_locator_tag_id == len(model.tokenizer) - 1 == model.embed_tokens.num_embeddings
    assert model.llm.lm_head.out_features == model.embed_tokens.num_embeddings
    assert model.token_equivalent_duration == pytest.approx(0.08)


def test_loss_falls_when_overfitting_one_batch(cfg, batch):
    torch.manual_seed(0)
    model = SALM(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out["loss"].detach()))
    assert int(out["num_target_tokens"]) == int(batch["loss_mask"].sum())
    assert losses[-1] < 0.5 * losses[0], losses

    model.eval()
    val = model.validation_step(batch)
    assert set(val) >= {"loss_sum", "num_tokens", "num_correct", "hypotheses", "references"}
    assert val["num_tokens"] == int(batch["loss_mask"].sum()) and 0 <= val["num_correct"] <= val["num_tokens"]
    with torch.no_grad():
        loss = float(model(batch)["loss"])
    assert val["loss_sum"] / val["num_tokens"] == pytest.approx(loss, rel=1e-4)
    assert len(val["hypotheses"]) == 3 and val["references"] == batch["references"]


def test_generate_ids_inside_vocab_with_several_audios_per_example(cfg):
    torch.manual_seed(0)
    model = SALM(cfg).eval()
    tok, tag = model.tokenizer, cfg.audio_locator_tag
    rows = [
        encode_dialog([{"role": "user", "content": f"{tag} and {tag}"}], tok, "llama2", add_generation_prompt=True)[0],
        encode_dialog([{"role": "user", "content": tag}], tok, "llama2", add_generation_prompt=True)[0],
    ]
    width = max(map(len, rows))
    prompts = torch.tensor([[model.text_pad_id] * (width - len(r)) + r for r in rows])
    audios = torch.randn(3, 8000) * 0.1  # row 0 takes audios 0 and 1, row 1 takes audio 2
    audio_lens = torch.tensor([8000, 4000, 6000])
    ids, texts = model.generate(prompts, audios, audio_lens, max_new_tokens=6)
    assert ids.dtype == torch.long and ids.shape[0] == 2 and 0 < ids.shape[1] <= 6
    assert int(ids.min()) >= 0 and int(ids.max()) < model.embed_tokens.num_embeddings  # never the audio tag
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match=r"3 audio placeholders .*but 2 replacements"):
        model.generate(prompts, audios[:2], audio_lens[:2], max_new_tokens=2)
    assert model.embed_tokens is not None and not hasattr(model.llm.model, "embed_tokens")


def test_llm_loads_offline_from_local_dir(cfg, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = SALM(cfg)
    assert model.llm.config.hidden_size == 64
    random_init = SALM(tiny_salm_config(cfg.pretrained_llm, pretrained_weights=False))
    assert random_init.llm.config.num_hidden_layers == model.llm.config.num_hidden_layers


def test_registry_builds_salm_and_collator(cfg):
    from speech_models.registry import build_collator, build_model

    assert type(build_model(cfg)).__name__ == "SALM"
    assert isinstance(build_collator(cfg, DataConfig(), DatasetConfig()), SALMCollator)


# ---------------------------------------------------------------------------------------------- conversations, text


def conversation_examples(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    audio = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16000, 8000)]
    conversation = {
        "id": "conv",
        "duration": 1.5,
        "text": "fine thanks",
        "turns": [
            {"role": "user", "text": "hi"},
            {"role": "user", "audio": 0},
            {"role": "assistant", "text": "hello"},
            {"role": "user", "audio": 1},
            {"role": "assistant", "text": "fine thanks"},
        ],
        "audios": audio,
        "tags": {},
    }
    text_only = {
        "id": "lm",
        "duration": 0.0,
        "text": "the sky is blue",
        "turns": [{"role": "assistant", "text": "the sky is blue"}],
        "audios": [],
        "tags": {},
    }
    return [conversation, text_only]


def test_collator_trains_every_assistant_turn_of_a_conversation_and_nothing_else(cfg):
    collator = SALMCollator(cfg, DataConfig(), DatasetConfig())
    conversation, text_only = conversation_examples()
    batch = collator([conversation, text_only])
    tok = collator.tokenizer
    tag = tok.convert_tokens_to_ids(cfg.audio_locator_tag)
    assert batch["audios"].shape == (2, 16000) and batch["audio_lens"].tolist() == [16000, 8000]
    assert [row.tolist().count(tag) for row in batch["input_ids"]] == [2, 0]
    assert tok.decode(batch["input_ids"][0][batch["loss_mask"][0]]) == "hello </s>fine thanks </s>"  # both answers
    assert tok.decode(batch["input_ids"][1][batch["loss_mask"][1]]) == "the sky is blue </s>"
    assert batch["answerable"].tolist() == [True, False] and batch["references"] == ["fine thanks", "the sky is blue"]
    prompt = batch["prompt_ids"][0][batch["prompt_ids"][0] != tok.pad_token_id].tolist()
    assert prompt.count(tag) == 2 and tok.decode(prompt).endswith("[/INST]")  # everything before the last answer
    # Token lengths as NeMo counts them: each audio is ceil(seconds / 0.08) frames in place of its placeholder.
    (inputs, outputs, text), (ids, _) = collator.token_lengths(
        {**conversation, "audio_durations": [1.0, 0.5]}, token_equivalent_duration=0.08
    )
    assert ids == batch["input_ids"][0][batch["input_ids"][0] != tok.pad_token_id].tolist()
    answer = len(tok("fine thanks", add_special_tokens=False)["input_ids"]) + 2  # "fine thanks" + " " + eos
    assert outputs == answer and text == len(ids) and inputs == len(ids) - answer + (13 - 1) + (7 - 1)


def test_text_only_batches_train_and_validate_with_every_rank_in_step(cfg):
    """No audio: the perception still joins the graph (DDP needs a gradient for every trainable parameter)."""
    torch.manual_seed(0)
    model = SALM(cfg)
    collator = SALMCollator(cfg, DataConfig(), DatasetConfig())
    _, text_only = conversation_examples()
    batch = collator(
        [text_only, {**text_only, "id": "lm2", "text": "two", "turns": [{"role": "assistant", "text": "two"}]}]
    )
    assert batch["audios"].shape == (0, 0)
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and int(out["num_target_tokens"]) > 0
    assert all(p.grad is not None for p in model.perception.parameters() if p.requires_grad)
    model.eval()
    scored = model.validation_step(batch)
    assert scored["num_tokens"] > 0 and scored["hypotheses"] == [] and scored["references"] == []
    mixed = model.validation_step(collator(conversation_examples()))
    assert mixed["references"] == ["fine thanks"] and len(mixed["hypotheses"]) == 1
