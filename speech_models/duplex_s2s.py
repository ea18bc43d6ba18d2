"""DuplexS2SModel: full-duplex speech-to-speech on one causal LLM, one step per 80 ms frame.

Per frame t (frame grid and text channel: `speech_models.duplex_data`):

    input_t  = perception(user audio)[t] + E_text(text[t-1]) + sum_k E_k(codes[t-1, k])
    h_t      = LLM(input_<=t)                                     (causal; KV cache at inference)
    text[t]  = argmax lm_head(h_t)            codes[t, k] = argmax audio_head_k(h_t)

with text[-1] = PAD and codes[-1] = the speech "delay" code (start of session). Agent audio is encoded by a
frozen codec (`speech_models.codec`) into K codebooks per frame; at frames where the text channel holds BOS/EOS
the codes are replaced by extra ids speech-BOS/EOS (ids `codebook_size`, `+1`; `+2` is delay), so each
codebook's vocabulary is `codebook_size + 3`.

    loss = text_loss_weight * CE(text) + audio_loss_weight * CE(codes)

Both CEs are means over valid frames (audio also over the K codebooks); frames past `frame_lens` are excluded.
The audio head is one fused Linear (H -> K * V): K independent per-codebook heads in one matmul (NeMo's
layout). DuplexS2SSpeechDecoderModel subclasses this and overrides the three `_..._audio_...` hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speech_models.codec import AudioCodec
from speech_models.config import AudioFrames, ModelConfig
from speech_models.duplex_data import DuplexS2SCollator, num_frames, text_channel_to_str, text_special_ids
from speech_models.freezing import setup_trainable_params
from speech_models.perception import build_perception
from speech_models.salm import load_llm

__all__ = ["DuplexS2SCollator", "DuplexS2SModel"]  # the registry looks the collator up here

# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _module_path(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def split_causal_lm(llm: nn.Module) -> tuple[nn.Embedding, str, str]:
    """Move the token embedding out of a HF causal LM (NeMo's layout) and return it with the paths of the
    decoder stack and the LM head inside `llm` (e.g. "model", "lm_head"), which the model runs separately."""
    embed, decoder, head = llm.get_input_embeddings(), llm.get_decoder(), llm.get_output_embeddings()
    decoder_path, head_path = _module_path(llm, decoder), _module_path(llm, head)
    owner, _, attr = _module_path(llm, embed).rpartition(".")
    delattr(llm.get_submodule(owner), attr)
    return embed, decoder_path, head_path


def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def _fit_frames(x: torch.Tensor, n: int, value: float | int = 0) -> torch.Tensor:
    """Cut or pad dim 1 of `x` (B, T, ...) to `n` frames."""
    if x.shape[1] >= n:
        return x[:, :n]
    pad = x.new_full((x.shape[0], n - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def _pad_waveforms(audios: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Waveforms of different lengths -> zero-padded (B, T) float32 and lengths (B,)."""
    lens = np.array([len(a) for a in audios], dtype=np.int64)
    signal = np.zeros((len(audios), int(lens.max())), dtype=np.float32)  # (B, T)
    for row, a in enumerate(audios):
        signal[row, : len(a)] = a
    return signal, lens


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily switch `module` to eval mode (greedy decoding must not see dropout)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# ----------------------------------------------------------------------------------------------
# The composed model
# ----------------------------------------------------------------------------------------------


class DuplexS2SModel(nn.Module):
    """Duplex S2S model. `data_cfg` supplies frame_length and the sample rates (AudioFrames defaults if None)."""

    def __init__(self, cfg: ModelConfig, data_cfg: Any | None = None) -> None:
        super().__init__()
        data_cfg = data_cfg if data_cfg is not None else AudioFrames()
        if cfg.pretrained_audio_codec is None:
            raise ValueError(
                "model.pretrained_audio_codec is required for duplex models: give a hub id or local directory of "
                "a transformers Mimi, EnCodec or DAC model"
            )
        self.cfg = cfg
        self.frame_length = float(data_cfg.frame_length)
        self.source_sample_rate = int(data_cfg.source_sample_rate)
        self.target_sample_rate = int(data_cfg.target_sample_rate)

        # LLM with the token embedding moved out, as in SALM (params llm.model.*, llm.lm_head.*, embed_tokens.*)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained_llm)
        self.text_bos_id, self.text_eos_id, self.text_pad_id = text_special_ids(self.tokenizer)
        self.llm = load_llm(cfg.pretrained_llm, cfg.pretrained_weights)
        self.embed_tokens, self._decoder_path, self._lm_head_path = split_causal_lm(self.llm)
        hidden = self.llm.config.get_text_config().hidden_size

        self.perception = self._build_perception(cfg, hidden)
        self.audio_codec = AudioCodec.from_pretrained(cfg.pretrained_audio_codec, frame_length=self.frame_length)
        self.num_codebooks = self.audio_codec.num_codebooks
        self.codebook_size = self.audio_codec.codebook_size
        self._build_audio_modules(hidden)
        self.trainable_summary = setup_trainable_params(self, cfg)  # LoRA on `llm`, then freeze_params

    @classmethod
    def from_pretrained(cls, directory: str, device: str = "cpu") -> DuplexS2SModel:
        """Load a directory written by `speech_models.pretrained.save_pretrained` (no pretrained sources needed)."""
        from speech_models.pretrained import from_pretrained

        return from_pretrained(directory, expected_class=cls, device=device)

    def _build_perception(self, cfg: ModelConfig, hidden: int) -> nn.Module:
        if cfg.perception.output_dim not in (None, hidden):
            raise ValueError(
                f"model.perception.output_dim={cfg.perception.output_dim} must be null or the LLM hidden size "
                f"({hidden}): duplex models add the user's frames to the LLM's input embeddings"
            )
        perception = build_perception(cfg.perception, hidden, cfg.pretrained_asr, cfg.pretrained_weights)
        if abs(perception.token_equivalent_duration - self.frame_length) > 1e-6:
            raise ValueError(
                f"the perception module emits one vector per {perception.token_equivalent_duration:g} s but "
                f"data.frame_length is {self.frame_length:g} s; duplex models need one per frame (make "
                "preprocessor.window_stride x encoder.subsampling_factor equal data.frame_length)"
            )
        if perception.cfg.preprocessor.sample_rate != self.source_sample_rate:
            raise ValueError(
                f"model.perception.preprocessor.sample_rate={perception.cfg.preprocessor.sample_rate} differs "
                f"from data.source_sample_rate={self.source_sample_rate}; set them equal"
            )
        return perception

    # -- speech vocabulary ------------------------------------------------------------------------

    @property
    def speech_vocab_size(self) -> int:
        """Codec ids plus speech BOS, EOS and delay."""
        return self.codebook_size + 3

    @property
    def speech_bos_id(self) -> int:
        """Start of an agent utterance (at the text channel's BOS frame)."""
        return self.codebook_size

    @property
    def speech_eos_id(self) -> int:
        """End of an agent utterance (at the text channel's EOS frame)."""
        return self.codebook_size + 1

    @property
    def speech_delay_id(self) -> int:
        """Codes 'before' the first frame: the previous-frame input at t = 0."""
        return self.codebook_size + 2

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # -- hooks the speech-decoder variant overrides ----------------------------------------------

    def _build_audio_modules(self, hidden: int) -> None:
        self.embed_audio_tokens = nn.ModuleList(
            nn.Embedding(self.speech_vocab_size, hidden) for _ in range(self.num_codebooks)
        )
        self.audio_head = nn.Linear(hidden, self.num_codebooks * self.speech_vocab_size)

    def _frame_inputs(self, source: torch.Tensor, prev_text: torch.Tensor, prev_codes: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings (B, T, H) from user frames (B, T, H), previous text (B, T), codes (B, T, K)."""
        x = self.embed_tokens(prev_text)  # (B, T, H)
        for k, embed in enumerate(self.embed_audio_tokens):
            x = x + embed(prev_codes[..., k])
        return x + source.to(x.dtype)

    def _audio_logits(self, hidden: torch.Tensor, prev_codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training: audio logits (N, K, V) for the N valid frames selected by `mask` (B, T)."""
        return self.audio_head(hidden[mask]).view(-1, self.num_codebooks, self.speech_vocab_size)

    def _new_audio_state(self, batch_size: int) -> Any:
        return None

    def _audio_step(self, hidden: torch.Tensor, prev_codes: torch.Tensor, state: Any) -> torch.Tensor:
        """Inference: audio logits (B, K, V) for one frame from h_t (B, 1, H) and codes[t-1] (B, 1, K)."""
        return self.audio_head(hidden[:, -1]).view(-1, self.num_codebooks, self.speech_vocab_size)

    # -- shared computation -----------------------------------------------------------------------

    def _causal_lm(self) -> nn.Module:
        """The HF causal LM, under the peft wrapper when LoRA is installed (LoRA layers sit inside it)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._causal_lm().get_submodule(self._lm_head_path)(hidden)

    def _llm_hidden(self, input_embeds: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Decoder stack only (no LM head): hidden states (B, T, H) and the updated KV cache."""
        out = self._causal_lm().get_submodule(self._decoder_path)(
            inputs_embeds=input_embeds, cache=cache, use_cache=cache is not None
        )
        return out.last_hidden_state, out.cache

    def _encode_source(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """User audio -> exactly `n` frames (B, n, H) and valid lengths (B,) (perception output cut/padded)."""
        encoded, lens = self.perception(audio, audio_lens)  # (B, T', H)
        return _fit_frames(encoded, n), lens.clamp(max=n)

    def prepare_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Teacher-forced inputs and labels on the text channel's frame grid (see the module docstring)."""
        device = self.device
        tokens = _as_tensor(batch["target_tokens"], device, torch.long)  # (B, T)
        B, T = tokens.shape
        source, source_lens = self._encode_source(
            _as_tensor(batch["source_audio"], device, torch.float32),
            _as_tensor(batch["source_audio_lens"], device, torch.long),
            T,
        )
        lens = torch.minimum(_as_tensor(batch["frame_lens"], device, torch.long), source_lens)  # (B,)
        codes, _ = self.audio_codec.encode(
            _as_tensor(batch["target_audio"], device, torch.float32),
            _as_tensor(batch["target_audio_lens"], device, torch.long),
            self.target_sample_rate,
            n_frames=T,
        )  # (B, T, K)
        codes = torch.where(tokens[..., None] == self.text_bos_id, self.speech_bos_id, codes)
        codes = torch.where(tokens[..., None] == self.text_eos_id, self.speech_eos_id, codes)
        prev_text = torch.cat([tokens.new_full((B, 1), self.text_pad_id), tokens[:, :-1]], dim=1)  # (B, T)
        prev_codes = torch.cat([codes.new_full((B, 1, self.num_codebooks), self.speech_delay_id), codes[:, :-1]], 1)
        return {
            "input_embeds": self._frame_inputs(source, prev_text, prev_codes),  # (B, T, H)
            "prev_codes": prev_codes,  # (B, T, K)
            "text_labels": tokens,  # (B, T)
            "audio_labels": codes,  # (B, T, K)
            "mask": torch.arange(T, device=device)[None] < lens[:, None],  # (B, T)
        }

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = self.prepare_inputs(batch)
        mask = inputs["mask"]
        hidden, _ = self._llm_hidden(inputs["input_embeds"])  # (B, T, H)
        text_logits = self._lm_head(hidden[mask])  # (N, V_text)
        audio_logits = self._audio_logits(hidden, inputs["prev_codes"], mask)  # (N, K, V)
        text_labels = inputs["text_labels"][mask]  # (N,)
        audio_labels = inputs["audio_labels"][mask]  # (N, K)
        n = mask.sum().clamp(min=1)
        text_loss = F.cross_entropy(text_logits.float(), text_labels, reduction="sum") / n
        audio_loss = F.cross_entropy(audio_logits.flatten(0, 1).float(), audio_labels.flatten(), reduction="sum") / (
            n * self.num_codebooks
        )
        loss = self.cfg.text_loss_weight * text_loss + self.cfg.audio_loss_weight * audio_loss
        return {
            "loss": loss,
            "text_loss": text_loss,
            "audio_loss": audio_loss,
            "num_frames": mask.sum(),
            "text_correct": (text_logits.argmax(-1) == text_labels).sum(),
            "audio_correct": (audio_logits.argmax(-1) == audio_labels).sum(),
        }

    # -- the registry interface -------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training forward: weighted loss (mean per valid frame) and its detached parts."""
        out = self._losses(batch)
        return {
            "loss": out["loss"],
            "text_loss": out["text_loss"].detach(),
            "audio_loss": out["audio_loss"].detach(),
            "num_target_tokens": out["num_frames"].detach(),
        }

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Teacher-forced loss sums plus greedy `offline_inference` text (BLEU) and audio (ASR-BLEU).

        `loss_sum / num_tokens` is the mean training loss; `num_correct` counts text frames predicted right.
        `generated_audio` holds one float32 array per example at data.target_sample_rate.
        """
        with eval_mode(self):
            out = self._losses(batch)
            result = self.offline_inference(batch["source_audio"], batch["source_audio_lens"])
        n = int(out["num_frames"])
        audio = result["audio"].float().cpu().numpy()
        return {
            "loss_sum": float(out["loss"]) * n,
            "text_loss_sum": float(out["text_loss"]) * n,
            "audio_loss_sum": float(out["audio_loss"]) * n,
            "num_tokens": n,
            "num_correct": int(out["text_correct"]),
            "num_audio_correct": int(out["audio_correct"]),
            "num_audio_tokens": n * self.num_codebooks,
            "hypotheses": result["text"],
            "references": list(batch["references"]),
            "cut_ids": list(batch.get("cut_ids", [])),
            "generated_audio": [a[:length] for a, length in zip(audio, result["audio_len"].tolist(), strict=True)],
        }

    @torch.no_grad()
    def offline_inference(
        self,
        input_signal: torch.Tensor | np.ndarray,
        input_signal_lens: torch.Tensor | np.ndarray,
        decode_audio: bool = True,
    ) -> dict[str, Any]:
        """Greedy frame-by-frame generation over the whole user signal, with the LLM's KV cache.

        `input_signal` (B, T) at data.source_sample_rate. Returns "text" (list[str]), "tokens_text" (B, F),
        "tokens_audio" (B, F, K), "tokens_len" (B,) with F = ceil(T / samples per frame), and when
        `decode_audio` "audio" (B, F * frame_length * target_sample_rate) float32 and "audio_len" (B,).
        """
        device = self.device
        signal = _as_tensor(input_signal, device, torch.float32)
        signal_lens = _as_tensor(input_signal_lens, device, torch.long)
        B = signal.shape[0]
        n = num_frames(signal.shape[1], self.source_sample_rate, self.frame_length)
        frame_lens = torch.tensor(
            [num_frames(int(x), self.source_sample_rate, self.frame_length) for x in signal_lens], device=device
        )
        with eval_mode(self):
            source, source_lens = self._encode_source(signal, signal_lens, n)  # (B, n, H)
            lens = torch.minimum(frame_lens, source_lens)
            gen_text = torch.full((B, n), self.text_pad_id, dtype=torch.long, device=device)
            gen_codes = torch.full((B, n, self.num_codebooks), self.speech_delay_id, dtype=torch.long, device=device)
            prev_text = torch.full((B, 1), self.text_pad_id, dtype=torch.long, device=device)
            prev_codes = torch.full((B, 1, self.num_codebooks), self.speech_delay_id, dtype=torch.long, device=device)
            cache = self._new_llm_cache()
            state = self._new_audio_state(B)
            for t in range(n):
                x = self._frame_inputs(source[:, t : t + 1], prev_text, prev_codes)  # (B, 1, H)
                hidden, cache = self._llm_hidden(x, cache)  # (B, 1, H)
                gen_text[:, t] = self._lm_head(hidden[:, -1]).argmax(-1)
                gen_codes[:, t] = self._audio_step(hidden, prev_codes, state).argmax(-1)  # (B, K)
                prev_text, prev_codes = gen_text[:, t : t + 1], gen_codes[:, t : t + 1]

        result: dict[str, Any] = {
            "text": [
                text_channel_to_str(
                    ids[:length].tolist(), self.tokenizer, self.text_bos_id, self.text_eos_id, self.text_pad_id
                )
                for ids, length in zip(gen_text.cpu(), lens.tolist(), strict=True)
            ],
            "tokens_text": gen_text,
            "tokens_audio": gen_codes,
            "tokens_len": lens,
        }
        if decode_audio:
            audio, audio_lens = self.decode_codes(gen_codes, lens)
            result["audio"], result["audio_len"] = audio, audio_lens
        return result

    @torch.no_grad()
    def respond(self, audios: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
        """The agent's text and speech (float32 at data.target_sample_rate) for each user waveform."""
        signal, lens = _pad_waveforms(audios)
        output = self.offline_inference(signal, lens, decode_audio=True)
        waves = output["audio"].float().cpu().numpy()
        return output["text"], [w[:n] for w, n in zip(waves, output["audio_len"].tolist(), strict=True)]

    @torch.no_grad()
    def probe_logits(self, audios: list[np.ndarray]) -> torch.Tensor:
        """Text logits and the audio logits of every frame (fed PAD text and delay codes), flattened (export
        checks)."""
        signal, lens = _pad_waveforms(audios)
        signal, lens = _as_tensor(signal, self.device), _as_tensor(lens, self.device)
        n = num_frames(signal.shape[1], self.source_sample_rate, self.frame_length)
        with eval_mode(self):
            source, _ = self._encode_source(signal, lens, n)  # (B, n, H)
            B = signal.shape[0]
            prev_text = torch.full((B, n), self.text_pad_id, dtype=torch.long, device=self.device)
            prev_codes = torch.full(
                (B, n, self.num_codebooks), self.speech_delay_id, dtype=torch.long, device=self.device
            )
            hidden, _ = self._llm_hidden(self._frame_inputs(source, prev_text, prev_codes))  # (B, n, H)
            mask = torch.ones(B, n, dtype=torch.bool, device=self.device)
            text = self._lm_head(hidden)  # (B, n, V)
            audio = self._audio_logits(hidden, prev_codes, mask)  # (B * n, K, V_audio)
        return torch.cat([text.float().flatten(), audio.float().flatten()])

    def _new_llm_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._causal_lm().config)

    def decode_codes(self, codes: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (B, T, K) -> waveform (B, T * frame_length * target_sample_rate); control ids become silence."""
        silence = self.audio_codec.silence_codes().to(codes.device)  # (K,)
        codes = torch.where(codes >= self.codebook_size, silence, codes)
        return self.audio_codec.decode(codes, lens, self.target_sample_rate)
