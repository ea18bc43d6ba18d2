"""Prompt formats: a list of chat turns -> token ids and a loss mask that is True on assistant tokens only.

Formats (`model.prompt_format`, or a dataset's `prompt_format`): llama2, llama3, qwen, plain, and
chat_template (the tokenizer's own Jinja chat template). `{bos}` / `{eos}` below are the tokenizer's BOS
and EOS strings (empty when it has none); the exact strings are pinned in tests/test_prompts.py.

    llama2  user        "{bos}[INST] {user} [/INST]"   (a leading system turn folds in:
                        "{bos}[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]")
            assistant   "{answer} {eos}"                (NeMo's "|message| |eos|")
    llama3  preamble    "{bos}"
            system/user "<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>"
            assistant   "<|start_header_id|>assistant<|end_header_id|>\\n\\n" + "{answer}<|eot_id|>"
    qwen    system/user "<|im_start|>{role}\\n{content}<|im_end|>\\n"
            assistant   "<|im_start|>assistant\\n" + "{answer}<|im_end|>"   ("\\n" before a following turn)
    plain   system      "{system}\\n";  user "{user}";  assistant "{answer}{eos}"

Every assistant turn is split into a *header* (part of the prompt, no loss: it is what generation is
primed with) and a *body* (the answer and its end-of-turn marker, with loss). When the end-of-turn marker
is not the tokenizer's EOS (llama3, qwen and chat templates with a base-model tokenizer), EOS is appended
to the body so generation always has a token to stop on. Each segment is tokenized on its own, so the
prompt used for generation is exactly a prefix of the training sequence.

As in NeMo's PromptFormatter, BOS and EOS are emitted as ids, never run through the tokenizer with the text
around them: `{bos}` and `{eos}` split a segment, the text pieces are tokenized on their own (without the
tokenizer's own special tokens) and the ids go in between. For llama2 this gives NeMo's ids exactly: the answer
"TEST" is ['▁TEST', '▁', '</s>'] with a Llama-2 tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PROMPT_FORMATS = ("llama2", "llama3", "qwen", "plain", "chat_template")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class _Template:
    preamble: str  # once, at the very start
    system: str | None  # None: folded into the first user turn (llama2)
    user: str
    user_with_system: str | None
    assistant_header: str  # prompt side (no loss)
    assistant_body: str  # target side (loss)
    end_of_turn: str  # the marker that closes an assistant turn, "{eos}" when it is EOS itself
    after_assistant: str = ""  # separator before a turn that follows an assistant turn (no loss)


_TEMPLATES: dict[str, _Template] = {
    "llama2": _Template(
        preamble="",
        system=None,
        user="{bos}[INST] {content} [/INST]",
        user_with_system="{bos}[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
        assistant_header="",
        assistant_body="{content} {eos}",
        end_of_turn="{eos}",
    ),
    "llama3": _Template(
        preamble="{bos}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        user_with_system=None,
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_body="{content}<|eot_id|>",
        end_of_turn="<|eot_id|>",
    ),
    "qwen": _Template(
        preamble="",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        user_with_system=None,
        assistant_header="<|im_start|>assistant\n",
        assistant_body="{content}<|im_end|>",
        end_of_turn="<|im_end|>",
        after_assistant="\n",
    ),
    "plain": _Template(
        preamble="",
        system="{content}\n",
        user="{content}",
        user_with_system=None,
        assistant_header="",
        assistant_body="{content}{eos}",
        end_of_turn="{eos}",
    ),
}

# End-of-turn markers that chat templates commonly use; each one that is a single token is a stop token.
_CHAT_TEMPLATE_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        import difflib

        close = difflib.get_close_matches(prompt_format, PROMPT_FORMATS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"prompt_format {prompt_format!r} is not one of {list(PROMPT_FORMATS)}{hint}")


def _check_turns(turns: list[dict[str, str]], add_generation_prompt: bool) -> None:
    if not turns:
        raise ValueError("a dialog needs at least one turn")
    for i, turn in enumerate(turns):
        if turn.get("role") not in ROLES:
            raise ValueError(f"turn {i} has role {turn.get('role')!r}; expected one of {list(ROLES)}")
        if turn["role"] == "system" and i != 0:
            raise ValueError(f"turn {i}: a system turn may only come first")
    if add_generation_prompt and turns[-1]["role"] == "assistant":
        raise ValueError("add_generation_prompt needs a dialog that ends with a user (or system) turn")


def render_dialog(
    turns: list[dict[str, str]],
    prompt_format: str,
    bos: str = "",
    eos: str = "",
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """Render turns into text segments `(text, is_target)` for one of the fixed formats.

    Concatenating the texts gives the full prompt string; `is_target` marks assistant bodies.
    With `add_generation_prompt` the assistant header of the next (generated) turn is appended.
    """
    check_prompt_format(prompt_format)
    if prompt_format == "chat_template":
        raise ValueError("render_dialog does not handle chat_template; use encode_dialog with a tokenizer")
    _check_turns(turns, add_generation_prompt)
    t = _TEMPLATES[prompt_format]
    eot = t.end_of_turn.format(eos=eos)
    segments: list[tuple[str, bool]] = []
    if t.preamble:
        segments.append((t.preamble.format(bos=bos), False))
    system: str | None = None
    previous = None
    for turn in turns:
        role, content = turn["role"], turn["content"]
        if previous == "assistant" and t.after_assistant:
            segments.append((t.after_assistant, False))
        if role == "system":
            if t.system is None:
                system = content  # folded into the next user turn
            else:
                segments.append((t.system.format(content=content), False))
        elif role == "user":
            if system is not None:
                segments.append((t.user_with_system.format(bos=bos, system=system, content=content), False))
                system = None
            else:
                segments.append((t.user.format(bos=bos, content=content), False))
        else:
            if t.assistant_header:
                segments.append((t.assistant_header, False))
            body = t.assistant_body.format(content=content, eos=eos)
            if eos and eot != eos:
                body += eos
            segments.append((body, True))
        previous = role
    if system is not None:  # a lone system turn (llama2)
        segments.append((t.user_with_system.format(bos=bos, system=system, content=""), False))
    if add_generation_prompt and t.assistant_header:
        segments.append((t.assistant_header, False))
    return [(text, target) for text, target in segments if text]


def _chat_template_segments(
    turns: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool
) -> list[tuple[str, bool]]:
    """Split the tokenizer's chat template into prompt and assistant-body segments by rendering prefixes."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "prompt_format 'chat_template' needs a tokenizer with a chat template, and this one has none; "
            f"use one of {[f for f in PROMPT_FORMATS if f != 'chat_template']}"
        )
    _check_turns(turns, add_generation_prompt)

    def render(prefix: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=gen)

    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = render(turns[:k], True)
        full = render(turns[: k + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "the tokenizer's chat template does not render dialog prefixes as string prefixes, so "
                "assistant turns cannot be isolated for the loss mask; use a fixed prompt_format instead"
            )
        body = full[len(prompt) :]
        # Keep trailing whitespace/newlines after the end-of-turn marker on the prompt side.
        stripped = body.rstrip()
        segments += [(prompt[len(done) :], False), (stripped, True)]
        if eos and not stripped.endswith(eos):
            segments.append((eos, True))
        if len(stripped) < len(body):
            segments.append((body[len(stripped) :], False))
        done = full
    rest = render(turns, add_generation_prompt) if turns[-1]["role"] != "assistant" else done
    if not rest.startswith(done):
        raise ValueError("the tokenizer's chat template does not render dialog prefixes as string prefixes")
    segments.append((rest[len(done) :], False))
    return [(text, target) for text, target in segments if text]


def encode_dialog(
    turns: list[dict[str, str]],
    tokenizer: Any,
    prompt_format: str,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Turns -> (token ids, loss mask); the mask is True on assistant answer tokens (and their end marker)."""
    check_prompt_format(prompt_format)
    if prompt_format == "chat_template":
        segments = _chat_template_segments(turns, tokenizer, add_generation_prompt)
    else:
        segments = render_dialog(
            turns, prompt_format, tokenizer.bos_token or "", tokenizer.eos_token or "", add_generation_prompt
        )
    ids: list[int] = []
    mask: list[bool] = []
    for text, target in segments:
        piece = _encode_segment(text, tokenizer)
        ids += piece
        mask += [target] * len(piece)
    return ids, mask


def _encode_segment(text: str, tokenizer: Any) -> list[int]:
    """Token ids of one segment, with the tokenizer's BOS / EOS strings emitted as their ids (see the module
    docstring) and the text between them tokenized on its own."""
    specials = {
        token: token_id
        for token, token_id in (
            (tokenizer.bos_token, tokenizer.bos_token_id),
            (tokenizer.eos_token, tokenizer.eos_token_id),
        )
        if token and token_id is not None
    }
    if not specials:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    pattern = "(" + "|".join(re.escape(token) for token in specials) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(int(specials[part]))
        elif part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids


def stop_token_ids(tokenizer: Any, prompt_format: str) -> list[int]:
    """EOS plus the format's end-of-turn marker when the tokenizer has it as a single token."""
    check_prompt_format(prompt_format)
    markers = _CHAT_TEMPLATE_MARKERS if prompt_format == "chat_template" else (_TEMPLATES[prompt_format].end_of_turn,)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for marker in markers:
        if marker in vocab and vocab[marker] not in ids:
            ids.append(vocab[marker])
    return ids
