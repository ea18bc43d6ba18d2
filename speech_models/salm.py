"""SALM: a speech-augmented LLM. Audio embeddings replace each audio placeholder token of a chat prompt.

    audio (N_audio, T) -> AudioPerceptionModule -> (N_audio, T', H) --+
    input_ids (B, L) left-padded, with one placeholder per audio ------+-> splice -> HF causal LM -> CE loss

Parameter names follow NeMo's SALM so freeze patterns mean the same and NeMo checkpoints load by name: the
token embedding is moved out of the LLM (`embed_tokens.weight`, not `llm.model.embed_tokens.weight`), so `llm.*`
is the decoder stack and the LM head, `perception.*` the audio side. During `generate` the embedding is lent back
to the LLM, because Hugging Face's generation loop embeds the tokens it samples.

The audio placeholder is added to the tokenizer but, as in NeMo, the LLM's embedding is not resized for it: its
id may lie past the last embedding row, so it is replaced by id 0 before embedding (the placeholder's embedding
is overwritten by audio frames anyway), and the LM head (as many rows as the embedding) can never predict it.

Batch format (what `SALMCollator` emits and `SALM.forward` / `validation_step` read):
    audios      float32 (N_audio, T_max)  zero-padded waveforms, in placeholder order (batch-major); (0, 0) when
                                          the batch is text only
    audio_lens  int64   (N_audio,)
    input_ids   int64   (B, L)            left-padded prompt + answer (+ EOS); a conversation holds every turn
    loss_mask   bool    (B, L)            True where the token is a target (every assistant answer, its EOS)
    prompt_ids  int64   (B, Lp)           left-padded prompt of the last answer, ending with the assistant header
    answerable  bool    (B,)              the row has a prompt to answer (text for language modelling has none)
    references  list[str]                 the last answers (transcripts: for WER / BLEU)
    cut_ids     list[str]

Examples are plain cuts (audio + transcript, prompted "[context] <audio>" -> transcript) or conversations with any
number of text and audio turns (orchestrator.data.examples); text-only examples have no audio.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from itertools import groupby
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speech_models.audio import AudioInput, as_waveforms
from speech_models.config import ModelConfig, PromptDefaults
from speech_models.freezing import keep_frozen_parts_in_eval
from speech_models.prompts import check_prompt_format, encode_dialog, stop_token_ids

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_MAX_NEW_TOKENS = 128


# ----------------------------------------------------------------------------------------------
# Tokenizer and LLM loading (shared by the model and the collator, so ids always agree)
# ----------------------------------------------------------------------------------------------


def load_tokenizer(source: str, audio_locator_tag: str) -> Any:
    """AutoTokenizer (from `ModelConfig.tokenizer_source`) with the audio placeholder added as one special token,
    which gets NeMo's id (the first free one) when the tokenizer does not have it yet."""
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if audio_locator_tag not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(audio_locator_tag, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def text_pad_id(tokenizer: Any) -> int:
    """The id used for left padding: pad, else unk, else eos."""
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has no pad, unk or eos token to pad with")


def load_llm(pretrained_llm: str, pretrained_weights: bool) -> nn.Module:
    """`AutoModelForCausalLM` from a hub id or a local dir; random init from its config when not pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if pretrained_weights:
        return AutoModelForCausalLM.from_pretrained(pretrained_llm, dtype=torch.float32)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pretrained_llm), dtype=torch.float32)


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"module {type(target).__name__} is not inside {type(root).__name__}")


# ----------------------------------------------------------------------------------------------
# Splicing audio embeddings into the text embeddings
# ----------------------------------------------------------------------------------------------


def _splice(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    padding_id: int,
    placeholder_id: int,
    rep_flat: torch.Tensor,
    rep_lens: torch.Tensor,
    target_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Vectorised splice. `rep_flat` (sum T_k, D) holds the replacements back to back, `rep_lens` (K,) their
    lengths, in batch order. One gather builds the output; no Python loop over rows or placeholders."""
    B = input_ids.size(0)
    D = embeds.size(-1)
    device = input_ids.device
    not_pad = input_ids != padding_id  # (B, L)
    keep = not_pad.cumsum(dim=1) > 0  # (B, L): everything after the left padding
    is_ph = (input_ids == placeholder_id) & keep  # (B, L)
    n_ph = int(is_ph.sum())
    if n_ph != rep_lens.numel():
        raise ValueError(
            f"the batch has {n_ph} audio placeholders (id {placeholder_id}) but {rep_lens.numel()} replacements; "
            "every placeholder needs exactly one audio"
        )
    is_text = keep & ~is_ph
    rep_lens = rep_lens.to(device=device, dtype=torch.long)
    width = keep.long()  # output positions each input position expands to: 1, T_k, or 0 for left padding
    width[is_ph] = rep_lens  # boolean-mask order is row-major = batch order
    ends = width.cumsum(dim=1)  # (B, L)
    row_len = ends[:, -1]  # (B,)
    L_out = int(row_len.max()) if B else 0
    start = ends - width + (L_out - row_len)[:, None]  # (B, L): first output position, left-padded rows
    flat_start = start + torch.arange(B, device=device)[:, None] * L_out  # (B, L) into (B * L_out)
    text_dest = flat_start[is_text]  # (N_text,)
    n_text, n_frames = text_dest.numel(), rep_flat.size(0)
    rep_offsets = torch.cumsum(rep_lens, 0) - rep_lens  # (K,) start of each replacement in rep_flat
    frame_in_rep = torch.arange(n_frames, device=device) - rep_offsets.repeat_interleave(rep_lens, output_size=n_frames)
    frame_dest = flat_start[is_ph].repeat_interleave(rep_lens, output_size=n_frames) + frame_in_rep  # (N_frames,)

    src = torch.cat([embeds[is_text], rep_flat.to(embeds.dtype), embeds.new_zeros(1, D)])  # (N_text+N_frames+1, D)
    index = torch.full((B * L_out,), n_text + n_frames, dtype=torch.long, device=device)  # default: zero row
    index[text_dest] = torch.arange(n_text, device=device)
    index[frame_dest] = torch.arange(n_text, n_text + n_frames, device=device)
    out = src[index].view(B, L_out, D)  # (B, L_out, D)

    attention = torch.zeros(B * L_out, dtype=torch.bool, device=device)
    attention[text_dest] = not_pad[is_text]
    attention[frame_dest] = True
    targets = None
    if target_ids is not None:
        targets = torch.full((B * L_out,), IGNORE_INDEX, dtype=target_ids.dtype, device=device)
        targets[text_dest] = target_ids[is_text]
        targets = targets.view(B, L_out)
    return out, targets, attention.view(B, L_out)


def replace_placeholders_and_build_targets(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    padding_id: int,
    placeholder_id: int,
    replacements: list[torch.Tensor],
    target_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Replace each placeholder with the next replacement sequence (NeMo semantics, vectorised).

    input_ids (B, L) left-padded; embeds (B, L, D); replacements: (T_k, D) tensors, consumed in batch order
    (row by row, left to right); target_ids (B, L) or None.
    Returns embeds (B, L', D), targets (B, L') and attention mask (B, L') bool, left-padded to the longest
    row (L' = longest row after replacement; padding beyond it is removed). Replaced positions get target
    -100 and attention True; kept tokens keep their target and attend unless they are `padding_id`; new
    left padding is zeros / -100 / False. Raises ValueError when placeholders and replacements differ in
    number.
    """
    D = embeds.size(-1)
    rep_flat = torch.cat([r.reshape(-1, D) for r in replacements]) if replacements else embeds.new_zeros(0, D)
    rep_lens = torch.tensor([r.shape[0] for r in replacements], dtype=torch.long, device=input_ids.device)
    return _splice(input_ids, embeds, padding_id, placeholder_id, rep_flat, rep_lens, target_ids)


# ----------------------------------------------------------------------------------------------
# Collator (runs in Ray Data tasks: picklable, imports no model code, loads the tokenizer lazily)
# ----------------------------------------------------------------------------------------------


def _prompt_tags(dataset_cfg: Any) -> tuple[str | None, str | None]:
    """(context, system_prompt) from the first input_cfg entry that has tags."""
    for entry in getattr(dataset_cfg, "input_cfg", None) or []:
        if entry.tags:
            return entry.tags.get("context"), entry.tags.get("system_prompt")
    return None, None


def _left_pad(rows: list[list[int]], value: int, dtype: Any) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row) :] = row
    return out


class SALMCollator:
    """examples (dicts with id, audio, text, ...) -> one SALM batch of numpy arrays and lists.

    Prompt: [system: system_prompt tag] user: "<context> <audio tag>" (or just the tag); assistant: text.
    The context and system prompt come from the dataset's `input_cfg` tags (as in NeMo).
    """

    def __init__(self, model_cfg: ModelConfig, data_cfg: Any, dataset_cfg: Any):
        context, system_prompt = _prompt_tags(dataset_cfg)
        prompt_format = getattr(dataset_cfg, "prompt_format", None)
        self._setup(model_cfg, PromptDefaults(context, system_prompt, prompt_format))

    @classmethod
    def for_prompt(cls, model_cfg: ModelConfig, prompt: PromptDefaults, tokenizer: Any = None) -> SALMCollator:
        """A collator that prompts like `prompt` (inference: free-form prompts), optionally with a loaded tokenizer."""
        collator = cls.__new__(cls)
        collator._setup(model_cfg, prompt)
        collator._tokenizer = tokenizer
        return collator

    def _setup(self, model_cfg: ModelConfig, prompt: PromptDefaults) -> None:
        self.tokenizer_source = model_cfg.tokenizer_source
        self.audio_locator_tag = model_cfg.audio_locator_tag
        self.prompt_format = prompt.prompt_format or model_cfg.prompt_format
        check_prompt_format(self.prompt_format)
        self.context, self.system_prompt = prompt.context, prompt.system_prompt
        self._tokenizer: Any = None

    def prompt_defaults(self) -> PromptDefaults:
        """How this collator prompts the model: what inference repeats unless told otherwise."""
        return PromptDefaults(self.context, self.system_prompt, self.prompt_format)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokenizer"] = None  # reloaded in the worker on first use
        return state

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source, self.audio_locator_tag)
        return self._tokenizer

    def turns(self, text: str) -> list[dict[str, str]]:
        """The prompt of a plain cut with this collator's context and system prompt."""
        return self._single_turn(text, self.context, self.system_prompt)

    def _single_turn(self, text: str, context: str | None, system_prompt: str | None) -> list[dict[str, str]]:
        user = f"{context} {self.audio_locator_tag}" if context else self.audio_locator_tag
        turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": text}]

    def dialog(self, example: dict[str, Any]) -> list[dict[str, str]]:
        """The chat turns of one example. A plain cut: "[context] <audio tag>" -> its transcript. A conversation: its
        own turns, audio turns as the audio tag and consecutive turns of one speaker joined (NeMo's format fn), with
        the context before a first user audio turn and the system prompt first (NeMo's conversation adapters).
        The example's input tags (context, system_prompt) win over the collator's own."""
        tags = example.get("tags") or {}
        context = tags.get("context") if tags else self.context
        system_prompt = tags.get("system_prompt") if tags else self.system_prompt
        if "turns" not in example:
            return self._single_turn(example["text"], context, system_prompt)
        raw = [
            (t["role"], self.audio_locator_tag if "audio" in t else t["text"], "audio" in t) for t in example["turns"]
        ]
        if context and raw and raw[0][0] == "user" and raw[0][2]:
            raw.insert(0, ("user", context, False))
        if system_prompt and (not raw or raw[0][0] != "system"):
            raw.insert(0, ("system", system_prompt, False))
        return [
            {"role": role, "content": " ".join(content for _, content, _ in group)}
            for role, group in groupby(raw, key=lambda turn: turn[0])
        ]

    def encode(self, example: dict[str, Any]) -> tuple[list[int], list[bool]]:
        """(token ids, loss mask) of one example; an example keeps what `token_lengths` computed ("encoded")."""
        if example.get("encoded") is not None:
            return example["encoded"]
        return encode_dialog(self.dialog(example), self.tokenizer, self.prompt_format)

    def token_lengths(
        self, example: dict[str, Any], token_equivalent_duration: float | None
    ) -> tuple[tuple[int, int, int], Any]:
        """NeMo's lengths of an example without its audio (orchestrator.data.examples.measure_example): input = the
        context's text tokens + audio frames (each audio is ceil(duration / token_equivalent_duration) frames in
        place of its one placeholder token), output = the last answer's tokens; text = every text token.
        Returns ((input, output, text), the encoding, which `__call__` reuses)."""
        ids, mask = self.encode(example)
        answer = _last_target_run(mask)
        frames = 0
        if example.get("audio_durations"):
            if not token_equivalent_duration:
                raise ValueError("token_equivalent_duration must be set to count audio frames as tokens")
            frames = sum(max(1, math.ceil(d / token_equivalent_duration)) - 1 for d in example["audio_durations"])
        return (len(ids) - answer + frames, answer, len(ids)), (ids, mask)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("SALMCollator got an empty list of examples")
        tokenizer = self.tokenizer
        pad = text_pad_id(tokenizer)
        ids_rows, mask_rows, prompt_rows = [], [], []
        for ex in examples:
            ids, mask = self.encode(ex)
            ids_rows.append(ids)
            mask_rows.append(mask)
            prompt_rows.append(ids[: len(ids) - _last_target_run(mask)])
        audios = [
            np.asarray(a, dtype=np.float32).reshape(-1)
            for ex in examples
            for a in (ex["audios"] if "turns" in ex else [ex["audio"]])
        ]
        audio_lens = np.array([a.shape[0] for a in audios], dtype=np.int64)
        padded_audio = np.zeros((len(audios), int(audio_lens.max(initial=0))), dtype=np.float32)
        for i, a in enumerate(audios):
            padded_audio[i, : a.shape[0]] = a
        return {
            "audios": padded_audio,
            "audio_lens": audio_lens,
            "input_ids": _left_pad(ids_rows, pad, np.int64),
            "loss_mask": _left_pad(mask_rows, False, np.bool_),
            "prompt_ids": _left_pad(prompt_rows, pad, np.int64),
            "answerable": np.array([len(p) > 0 for p in prompt_rows], dtype=np.bool_),
            "references": [ex["text"] for ex in examples],
            "cut_ids": [str(ex["id"]) for ex in examples],
        }


def _last_target_run(mask: list[bool]) -> int:
    """Tokens in the last run of targets that ends the sequence's targets: the last answer (NeMo's answer_ids)."""
    end = max((i for i, m in enumerate(mask) if m), default=-1)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return end - start + 1 if end >= 0 else 0


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class SALM(nn.Module):
    """Speech-augmented LLM (NeMo speechlm2 SALM) on a Hugging Face causal LM, without NeMo."""

    def __init__(self, cfg: ModelConfig, data_cfg: Any = None):
        """`data_cfg` is accepted for the registry's uniform signature; SALM needs no frame or sample rates."""
        super().__init__()
        from speech_models.freezing import setup_trainable_params
        from speech_models.perception import build_perception

        self.cfg = cfg
        # How `transcribe` prompts by default; set from the training data by whoever loads a trained model.
        self.prompt_defaults = PromptDefaults()
        self.tokenizer = load_tokenizer(cfg.tokenizer_source, cfg.audio_locator_tag)
        self.audio_locator_tag_id = int(self.tokenizer.convert_tokens_to_ids(cfg.audio_locator_tag))
        self.text_pad_id = text_pad_id(self.tokenizer)
        self.stop_token_ids = stop_token_ids(self.tokenizer, cfg.prompt_format)

        llm = load_llm(cfg.pretrained_llm, cfg.pretrained_weights)  # not resized for the audio tag (as NeMo)
        self.llm = llm
        # Move the token embedding out of the LLM (NeMo's layout and parameter names).
        self.embed_tokens = llm.get_input_embeddings()
        owner_path, _, self._embed_attr = _module_path(llm, self.embed_tokens).rpartition(".")  # model.embed_tokens
        self._embed_owner_path = owner_path
        delattr(llm.get_submodule(owner_path), self._embed_attr)

        hidden = llm.config.get_text_config().hidden_size
        self.perception = build_perception(
            cfg.perception, cfg.perception.output_dim or hidden, cfg.pretrained_asr, cfg.pretrained_weights
        )
        self.trainable_summary = setup_trainable_params(self, cfg)
        if cfg.init_from_checkpoint:
            from speech_models.pretrained import init_from_checkpoint

            init_from_checkpoint(self, cfg.init_from_checkpoint)

    def train(self, mode: bool = True) -> SALM:
        """Training mode, except for wholly frozen parts (as NeMo's training step; see keep_frozen_parts_in_eval)."""
        super().train(mode)
        if mode:
            keep_frozen_parts_in_eval(self.perception.preprocessor, self.perception.encoder, self.llm)
        return self

    @classmethod
    def from_pretrained(cls, directory: str, device: str = "cpu", pretrained_llm: str | None = None) -> SALM:
        """Load a model directory: a `speechlm export` or a NeMo `save_pretrained` dir (`config.json` +
        `model.safetensors`, e.g. a released speechlm2 checkpoint), a local path or a hub id.

        `pretrained_llm` replaces a NeMo checkpoint's own (a hub id, usually), which names where the LLM's config
        and tokenizer come from; its weights are never loaded.
        """
        from speech_models.pretrained import from_pretrained

        return from_pretrained(directory, expected_class=cls, device=device, pretrained_llm=pretrained_llm)

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def token_equivalent_duration(self) -> float:
        return self.perception.token_equivalent_duration

    def _causal_lm(self) -> nn.Module:
        """The Hugging Face causal LM, under the peft wrapper when LoRA is installed."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @contextlib.contextmanager
    def _embedding_in_llm(self):
        """Lend `embed_tokens` back to the LLM (HF generation embeds the tokens it samples)."""
        owner = self._causal_lm().get_submodule(self._embed_owner_path)
        setattr(owner, self._embed_attr, self.embed_tokens)
        try:
            yield
        finally:
            delattr(owner, self._embed_attr)

    def _tensor(self, value: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(value).to(device=self.device, dtype=dtype, non_blocking=True)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, H); audio placeholders embed as id 0 (NeMo's: the tag has no row of its own,
        and its positions are replaced by audio frames)."""
        return self.embed_tokens(input_ids.masked_fill(input_ids == self.audio_locator_tag_id, 0))

    def _encode_audio(self, audios: Any, audio_lens: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """-> valid frames of every audio back to back (sum T_k, H), and T_k (K,)."""
        audio = self._tensor(audios, torch.float32)
        lens = self._tensor(audio_lens, torch.long)
        if audio.shape[0] == 0:  # a text-only batch
            width = self.embed_tokens.weight.shape[1]
            return audio.new_zeros(0, width), lens.new_zeros(0)
        chunk = self.cfg.encoder_chunk_size_seconds
        if (
            chunk is not None
            and lens.numel()
            and int(lens.max()) > chunk * self.perception.cfg.preprocessor.sample_rate
        ):
            from speech_models.perception import encode_in_chunks

            return encode_in_chunks(self.perception, audio, lens, chunk)
        embs, emb_lens = self.perception(audio, lens)  # (N_audio, T', H), (N_audio,)
        valid = torch.arange(embs.size(1), device=embs.device)[None, :] < emb_lens[:, None]  # (N_audio, T')
        return embs[valid], emb_lens

    def prepare_inputs(
        self, batch: dict[str, Any], audio: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Spliced, shifted LLM inputs: embeds/attention_mask/position_ids (B, L-1[, H]), targets (B, L-1).

        `audio` is `_encode_audio`'s output when the caller already has it.
        """
        input_ids = self._tensor(batch["input_ids"], torch.long)
        loss_mask = self._tensor(batch["loss_mask"], torch.bool)
        rep_flat, rep_lens = audio if audio is not None else self._encode_audio(batch["audios"], batch["audio_lens"])
        embeds, targets, attention = _splice(
            input_ids,
            self.embed_text(input_ids),  # (B, L, H)
            self.text_pad_id,
            self.audio_locator_tag_id,
            rep_flat,
            rep_lens,
            input_ids.masked_fill(~loss_mask, IGNORE_INDEX),
        )
        # Position t predicts token t + 1.
        attention = attention[:, :-1]
        return {
            "input_embeds": embeds[:, :-1],
            "attention_mask": attention,
            "position_ids": (attention.long().cumsum(dim=-1) - 1).clamp(min=0),
            "target_ids": targets[:, 1:],
        }

    def _target_logits(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """LM logits only at the sequence positions where some row has a target: (B, K, V), targets (B, K).

        Targets sit at the right end of left-padded rows, so K is about the longest answer, not L: the
        (B, L, V) logits tensor, the largest activation for real vocabularies, is never built.
        """
        targets = inputs["target_ids"]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # (K,)
        out = self._causal_lm()(
            inputs_embeds=inputs["input_embeds"],
            attention_mask=inputs["attention_mask"].long(),
            position_ids=inputs["position_ids"],
            logits_to_keep=keep,
            use_cache=False,
        )
        return out.logits, targets[:, keep]

    # -- training / validation interface (speech_models.registry) --------------------------------

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = self.prepare_inputs(batch)
        logits, targets = self._target_logits(inputs)
        num_tokens = (targets != IGNORE_INDEX).sum()
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ) / num_tokens.clamp(min=1)
        if np.shape(batch["audios"])[0] == 0:
            # A text-only batch leaves the audio side out of the graph; DDP needs a gradient for every trainable
            # parameter on every rank, so they join it with a zero weight.
            loss = loss + 0.0 * sum(p.sum() for p in self.perception.parameters() if p.requires_grad)
        return {"loss": loss, "num_target_tokens": num_tokens.detach()}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], max_new_tokens: int | None = None) -> dict[str, Any]:
        """Teacher-forced loss and next-token accuracy on target tokens, plus greedy transcripts."""
        rep_flat, rep_lens = self._encode_audio(batch["audios"], batch["audio_lens"])
        inputs = self.prepare_inputs(batch, audio=(rep_flat, rep_lens))  # teacher forcing
        logits, targets = self._target_logits(inputs)
        valid = targets != IGNORE_INDEX
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        num_correct = ((logits.argmax(dim=-1) == targets) & valid).sum()

        # Generation answers the rows that have a prompt (language-modelling text has none: loss and accuracy only).
        answerable = np.asarray(batch.get("answerable", np.ones(len(batch["references"]), dtype=bool)), dtype=bool)
        references = [r for r, keep in zip(batch["references"], answerable, strict=True) if keep]
        hypotheses: list[str] = []
        if references:
            prompts = self._tensor(np.asarray(batch["prompt_ids"])[answerable], torch.long)
            prompt_embeds, _, prompt_attention = _splice(
                prompts, self.embed_text(prompts), self.text_pad_id, self.audio_locator_tag_id, rep_flat, rep_lens, None
            )
            if max_new_tokens is None:
                # Cap generation at twice the longest reference answer (plus slack): a random or diverging
                # model would otherwise spend DEFAULT_MAX_NEW_TOKENS decoding steps on every batch.
                answer_len = int(torch.as_tensor(batch["loss_mask"]).sum(dim=1).max())
                max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, 2 * answer_len + 8)
            _, hypotheses = self._generate_from_embeds(prompt_embeds, prompt_attention, max_new_tokens=max_new_tokens)
        return {
            "loss_sum": float(loss_sum),
            "num_tokens": int(valid.sum()),
            "num_correct": int(num_correct),
            "hypotheses": hypotheses,
            "references": references,
        }

    def profiling_batch(self, batch_size: int, audio_seconds: float, text_tokens: int, seed: int = 0) -> dict[str, Any]:
        """A synthetic batch for the batch-size planner (NeMo's `oomptimizer_schema`): `batch_size` rows, each a
        short prompt, `audio_seconds` of noise in place of one audio placeholder (none at 0 s), and `text_tokens`
        answer tokens with loss."""
        rng = np.random.default_rng(seed)
        rate = self.cfg.perception.preprocessor.sample_rate
        samples = round(audio_seconds * rate)
        vocab = self.embed_tokens.num_embeddings
        prompt = rng.integers(0, vocab, size=4).tolist() + ([self.audio_locator_tag_id] if samples else [])
        answer = rng.integers(0, vocab, size=max(1, text_tokens)).tolist()
        ids = np.array([prompt + answer] * batch_size, dtype=np.int64)  # (B, L)
        mask = np.array([[False] * len(prompt) + [True] * len(answer)] * batch_size)  # (B, L)
        audios = (rng.standard_normal((batch_size if samples else 0, samples)) * 0.1).astype(np.float32)
        return {
            "audios": audios,  # (N_audio, T)
            "audio_lens": np.full(audios.shape[0], samples, dtype=np.int64),
            "input_ids": ids,
            "loss_mask": mask,
            "prompt_ids": ids[:, : len(prompt)],
            "answerable": np.ones(batch_size, dtype=np.bool_),
            "references": [""] * batch_size,
            "cut_ids": [f"probe-{i}" for i in range(batch_size)],
        }

    # -- inference -----------------------------------------------------------------------------

    def collator(self, prompt: PromptDefaults | None = None) -> SALMCollator:
        """A collator with this model's tokenizer that prompts like `prompt` (default: `self.prompt_defaults`)."""
        return SALMCollator.for_prompt(self.cfg, prompt or self.prompt_defaults, self.tokenizer)

    @torch.no_grad()
    def transcribe(
        self,
        audios: AudioInput | Sequence[AudioInput],
        prompt: str | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str] | str:
        """Generated text (greedy) for each audio: a file path (read and resampled as the data pipeline does) or
        a float32 waveform at the perception's sample rate. One path or 1-D array gives one string, a list a list.

        `prompt` goes before the audio in the user turn, as training's `context` tag did; None keeps the
        prompt the model was trained with (`self.prompt_defaults`).
        """
        audios, single = as_waveforms(audios, int(self.perception.cfg.preprocessor.sample_rate))
        if single:
            return self.transcribe(audios, prompt, system_prompt, max_new_tokens)[0]
        if not audios:
            return []
        defaults = self.prompt_defaults
        chosen = PromptDefaults(
            prompt if prompt is not None else defaults.context,
            system_prompt if system_prompt is not None else defaults.system_prompt,
            defaults.prompt_format,
        )
        batch = self.collator(chosen)([{"id": str(i), "audio": a, "text": ""} for i, a in enumerate(audios)])
        _, texts = self.generate(
            batch["prompt_ids"],
            batch["audios"],
            batch["audio_lens"],
            max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        )
        return texts

    @torch.no_grad()
    def probe_logits(self, audios: list[np.ndarray]) -> torch.Tensor:
        """LM logits over the spliced prompt + a fixed answer for each waveform, flattened (export checks)."""
        texts = ["the quick brown fox", "hello", "speech", "models"]
        batch = self.collator()(
            [{"id": f"probe{i}", "audio": a, "text": texts[i % len(texts)]} for i, a in enumerate(audios)]
        )
        inputs = self.prepare_inputs(batch)
        out = self._causal_lm()(
            inputs_embeds=inputs["input_embeds"],
            attention_mask=inputs["attention_mask"].long(),
            position_ids=inputs["position_ids"],
            use_cache=False,
        )
        keep = inputs["attention_mask"]  # (B, L): left padding has no defined logits to compare
        return out.logits[keep].float().flatten()

    @torch.no_grad()
    def generate(
        self,
        prompts: Any,
        audios: Any = None,
        audio_lens: Any = None,
        **generation_kwargs: Any,
    ) -> tuple[torch.Tensor, list[str]]:
        """Continue left-padded prompts (B, Lp) whose placeholders are filled by `audios` (N_audio, T),
        in batch order (several per row allowed). Greedy unless `generation_kwargs` say otherwise.

        Returns the new token ids (B, N) (padded with the pad id after a stop token) and their text.
        """
        prompts = self._tensor(prompts, torch.long)
        embeds = self.embed_text(prompts)  # (B, Lp, H)
        if audios is not None:
            if audio_lens is None:
                audio_lens = [np.shape(audios)[-1]] * int(np.shape(audios)[0])
            rep_flat, rep_lens = self._encode_audio(audios, audio_lens)
        else:
            rep_flat = embeds.new_zeros(0, embeds.size(-1))
            rep_lens = torch.zeros(0, dtype=torch.long, device=self.device)
        embeds, _, attention = _splice(
            prompts, embeds, self.text_pad_id, self.audio_locator_tag_id, rep_flat, rep_lens, None
        )
        return self._generate_from_embeds(embeds, attention, **generation_kwargs)

    def _generate_from_embeds(
        self, embeds: torch.Tensor, attention: torch.Tensor, **generation_kwargs: Any
    ) -> tuple[torch.Tensor, list[str]]:
        kwargs = {
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
            "do_sample": False,
            "pad_token_id": self.text_pad_id,
            "eos_token_id": self.stop_token_ids,
        }
        kwargs.update(generation_kwargs)
        with self._embedding_in_llm():
            ids = self._causal_lm().generate(inputs_embeds=embeds, attention_mask=attention.long(), **kwargs)
        # Everything after the first stop token is padding.
        stop = torch.zeros_like(ids, dtype=torch.bool)
        for token_id in self.stop_token_ids:
            stop |= ids == token_id
        after_stop = (stop.long().cumsum(dim=1) - stop.long()) > 0
        ids = ids.masked_fill(after_stop, self.text_pad_id)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return ids, [t.strip() for t in texts]
