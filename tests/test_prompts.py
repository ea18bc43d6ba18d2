"""Prompt formats: exact strings per format, loss only on assistant turns, generation prompts are prefixes."""

from __future__ import annotations

import pytest

from speech_models.prompts import PROMPT_FORMATS, encode_dialog, render_dialog, stop_token_ids
from speech_models.testing import build_tiny_llm_dir

TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <a>"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "More"},
    {"role": "assistant", "content": "ok"},
]

EXPECTED = {
    "llama2": [
        ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi <a> [/INST]", False),
        ("hello there </s>", True),
        ("<s>[INST] More [/INST]", False),
        ("ok </s>", True),
    ],
    "llama3": [
        ("<s>", False),
        ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>", False),
        ("<|start_header_id|>user<|end_header_id|>\n\nHi <a><|eot_id|>", False),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("hello there<|eot_id|></s>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nMore<|eot_id|>", False),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("ok<|eot_id|></s>", True),
    ],
    "qwen": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
        ("<|im_start|>user\nHi <a><|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("hello there<|im_end|></s>", True),
        ("\n", False),
        ("<|im_start|>user\nMore<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("ok<|im_end|></s>", True),
    ],
    "plain": [("Be brief.\n", False), ("Hi <a>", False), ("hello there</s>", True), ("More", False), ("ok</s>", True)],
}

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_llm_dir(tmp_path_factory.getbasetemp() / "tiny_llm"))


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_exact_strings(fmt):
    assert render_dialog(TURNS, fmt, bos="<s>", eos="</s>") == EXPECTED[fmt]
    # The generation prompt is the dialog up to the last assistant body.
    prompt = render_dialog(TURNS[:-1], fmt, bos="<s>", eos="</s>", add_generation_prompt=True)
    assert prompt == EXPECTED[fmt][:-1]


def test_llama3_adds_no_eos_when_eot_is_the_eos():
    segments = render_dialog(TURNS[1:3], "llama3", bos="<|begin_of_text|>", eos="<|eot_id|>")
    assert segments[0] == ("<|begin_of_text|>", False)
    assert segments[-1] == ("hello there<|eot_id|>", True)


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_loss_only_on_assistant_tokens(tokenizer, fmt):
    ids, mask = encode_dialog(TURNS, tokenizer, fmt)
    assert len(ids) == len(mask)
    targets = "".join(text for text, target in EXPECTED[fmt] if target)
    prompt_side = "".join(text for text, target in EXPECTED[fmt] if not target)
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == targets
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m]) == prompt_side
    prompt_ids, _ = encode_dialog(TURNS[:-1], tokenizer, fmt, add_generation_prompt=True)
    last_answer = len(ids) - mask[::-1].index(False)  # start of the final answer body
    assert prompt_ids == ids[:last_answer]


def test_chat_template_format(tokenizer):
    from copy import deepcopy

    tok = deepcopy(tokenizer)
    tok.chat_template = CHATML
    ids, mask = encode_dialog(TURNS[1:3], tok, "chat_template")
    assert tok.decode(ids) == "<|im_start|>user\nHi <a><|im_end|>\n<|im_start|>assistant\nhello there<|im_end|></s>\n"
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "hello there<|im_end|></s>"
    prompt_ids, _ = encode_dialog(TURNS[1:2], tok, "chat_template", add_generation_prompt=True)
    assert tok.decode(prompt_ids) == "<|im_start|>user\nHi <a><|im_end|>\n<|im_start|>assistant\n"
    assert prompt_ids == ids[: len(prompt_ids)]


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="did you mean 'llama2'"):
        render_dialog(TURNS, "llama_2")
    with pytest.raises(ValueError, match="has none"):
        encode_dialog(TURNS, tokenizer, "chat_template")
    with pytest.raises(ValueError, match="system turn may only come first"):
        render_dialog([TURNS[1], TURNS[0]], "qwen")
    with pytest.raises(ValueError, match="role 'bot'"):
        render_dialog([{"role": "bot", "content": "x"}], "plain")
    assert set(PROMPT_FORMATS) == {"llama2", "llama3", "qwen", "plain", "chat_template"}


def test_stop_tokens(tokenizer):
    assert stop_token_ids(tokenizer, "llama2") == [tokenizer.eos_token_id]
    assert stop_token_ids(tokenizer, "qwen") == [tokenizer.eos_token_id]  # <|im_end|> is not one token here


def llama2_style_tokenizer():
    """A Llama-2 / TinyLlama tokenizer.json layout (normalizer Prepend('▁') + Replace(' ', '▁'), no pre-tokenizer,
    BPE with byte fallback), trained offline on a few lines."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    corpus = ["TEST the quick brown fox", "Transcribe: TEST TEST", "[INST] hello [/INST] TEST", "seven happy zebras"]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["▁"])
    backend.train_from_iterator(corpus * 50, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens([AddedToken("<|audioplaceholder|>", special=True, normalized=False)], special_tokens=True)
    return tok


def test_llama2_ids_are_nemos():
    """NeMo 3.0.0's llama2 PromptFormatter, run on this tokenizer (recorded for issue #16), gives these tokens: each
    turn tokenised on its own, BOS/EOS as ids, the answer as '{answer} ' + EOS."""
    tok = llama2_style_tokenizer()
    turns = [{"role": "user", "content": "Transcribe: <|audioplaceholder|>"}, {"role": "assistant", "content": "TEST"}]
    ids, mask = encode_dialog(turns, tok, "llama2")
    tokens = tok.convert_ids_to_tokens(ids)
    nemo = ["<s>", "▁[INST]", "▁Tran", "scr", "ibe", ":", "▁", "<|audioplaceholder|>", "▁", "▁[", "/INST]"]
    assert tokens == [*nemo, "▁TEST", "▁", "</s>"]
    assert [t for t, target in zip(tokens, mask, strict=True) if target] == ["▁TEST", "▁", "</s>"]
