"""DuplexS2SModel: full-duplex speech-to-speech on one causal LLM, one step per 80 ms frame (NeMo's).

Teacher forcing on the frame grid of the user's perception output (T frames: the perception tensor, cut to the
agent codec's length when that is shorter), with the text channel `tokens` (`speech_models.duplex_data`) and the
agent codes `codes` (B, T, K), exactly as NeMo's `DuplexS2SModel.prepare_inputs`:

    codes[t]   = speech BOS / EOS (ids codebook_size, +1) where tokens[t] is text BOS / EOS, else the codec's
    input_j    = E_text(tokens[j]) + sum_k E_k(codes[j - 1, k]) + w * perception(user)[j]     (codes[-1] = delay,
                                                                                               id codebook_size + 2)
    h_j        = LLM(input_<=j)       text head(h_j) -> tokens[j + 1]       audio head_k(h_j) -> codes[j, k]

for j = 0 .. T - 2 (T - 1 frames), w = `duplex_user_channel_weight`. The text head is trained one frame ahead of
the audio heads: a turn's text BOS is predicted at the frame before its speech BOS, so each frame's codes are
predicted with that frame's text token already in the input. Greedy decoding (`offline_inference`) runs the same
recurrence over all T perception frames, feeding back its own text and codes (KV cache).

    loss = text_loss_weight * CE(text) + audio_loss_weight * CE(codes)

Both CEs are sums over the valid frames (`t < min(user frames, text channel frames) - 1`) divided by their count
(audio also by K). NeMo divides by the same count but sums over every frame, padding of shorter examples included;
masking it here is deliberate (see README, "Coming from NeMo"); on batches without padding the two are equal.

Parameter names are NeMo's: `llm.*` is the decoder stack (e.g. `llm.layers.0...`, `llm.norm`), `lm_head.*` the text
head, `embed_tokens.*` the token embedding, `embed_audio_tokens.K.*` / `audio_head.*` the audio embeddings and the
fused audio head (H -> K * V, codebook k = slice k). DuplexS2SSpeechDecoderModel subclasses this and overrides the
`_..._audio_...` hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speech_models.audio import AudioInput, as_waveforms
from speech_models.codec import AudioCodec
from speech_models.config import AudioFrames, ModelConfig
from speech_models.duplex_data import DuplexS2SCollator, text_channel_to_str, text_special_ids
from speech_models.freezing import keep_frozen_parts_in_eval, setup_trainable_params
from speech_models.perception import build_perception
from speech_models.salm import load_llm

__all__ = ["DuplexS2SCollator", "DuplexS2SModel"]  # the registry looks the collator up here

# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def split_causal_lm(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module, nn.Embedding]:
    """(decoder stack, LM head, token embedding) of a HF causal LM, the embedding moved out of the stack: NeMo's
    layout (`llm` = e.g. LlamaModel, `lm_head`, `embed_tokens`), which its parameter names come from."""
    decoder, head, embed = causal_lm.get_decoder(), causal_lm.get_output_embeddings(), causal_lm.get_input_embeddings()
    owner = next(module for module in decoder.modules() if any(child is embed for child in module.children()))
    attr = next(name for name, child in owner.named_children() if child is embed)
    delattr(owner, attr)
    return decoder, head, embed


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


@dataclass
class TeacherForcing:
    """Inputs and labels of one teacher-forced pass, over the T - 1 input frames (see the module docstring)."""

    input_embeds: torch.Tensor  # (B, T-1, H) LLM input
    audio_inputs: torch.Tensor  # (B, T-1, K) previous-frame codes (what the speech decoder conditions on)
    text_labels: torch.Tensor  # (B, T-1) tokens[j + 1]
    audio_labels: torch.Tensor  # (B, T-1, K) codes[j]
    mask: torch.Tensor  # (B, T-1) bool, the valid frames: j < min(user frames, text channel frames) - 1


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

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_source)  # no token added (as NeMo)
        self.text_bos_id, self.text_eos_id, self.text_pad_id = text_special_ids(self.tokenizer)
        self.llm, self.lm_head, self.embed_tokens = split_causal_lm(
            load_llm(cfg.pretrained_llm, cfg.pretrained_weights)
        )
        hidden = self.llm.config.get_text_config().hidden_size

        self.perception = self._build_perception(cfg, hidden)
        self.audio_codec = AudioCodec.from_pretrained(cfg.pretrained_audio_codec, frame_length=self.frame_length)
        self.num_codebooks = self.audio_codec.num_codebooks
        self.codebook_size = self.audio_codec.codebook_size
        self._build_audio_modules(hidden)
        self.trainable_summary = setup_trainable_params(self, cfg)  # LoRA on `llm`, then freeze_params
        if cfg.init_from_checkpoint:
            from speech_models.pretrained import init_from_checkpoint

            init_from_checkpoint(self, cfg.init_from_checkpoint)

    def train(self, mode: bool = True) -> DuplexS2SModel:
        """Training mode, except for wholly frozen parts (as NeMo's training step; see keep_frozen_parts_in_eval)."""
        super().train(mode)
        if mode:
            keep_frozen_parts_in_eval(*self._parts_kept_in_eval_when_frozen())
        return self

    def _parts_kept_in_eval_when_frozen(self) -> list[nn.Module]:
        return [self.perception.preprocessor, self.perception.encoder, self.llm]

    @classmethod
    def from_pretrained(
        cls,
        directory: str,
        device: str = "cpu",
        pretrained_llm: str | None = None,
        pretrained_audio_codec: str | None = None,
    ) -> DuplexS2SModel:
        """Load a model directory: a `speechlm export` or a NeMo `save_pretrained` dir, a local path or a hub id.

        A NeMo checkpoint's codec is a NeMo AudioCodecModel, which this project does not implement:
        `pretrained_audio_codec` must then name a transformers codec of the same codebook size and count.
        """
        from speech_models.pretrained import from_pretrained

        return from_pretrained(
            directory,
            expected_class=cls,
            device=device,
            pretrained_llm=pretrained_llm,
            pretrained_audio_codec=pretrained_audio_codec,
        )

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

    def _frame_inputs(self, source: torch.Tensor, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings (B, T, H) from user frames (B, T, H), text tokens (B, T) and codes (B, T, K), added
        in NeMo's order (text, each codebook, then the weighted user frames)."""
        x = self.embed_tokens(text)  # (B, T, H)
        for k, embed in enumerate(self.embed_audio_tokens):
            x = x + embed(codes[..., k])
        return x + source.to(x.dtype) * self.cfg.duplex_user_channel_weight

    def _audio_logits(self, hidden: torch.Tensor, prev_codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: audio logits (B, T, K, V) from hidden states (B, T, H) and previous codes (B, T, K)."""
        return self.audio_head(hidden).unflatten(-1, (self.num_codebooks, self.speech_vocab_size))

    def _new_audio_state(self, batch_size: int) -> Any:
        return None

    def _audio_step(self, hidden: torch.Tensor, prev_codes: torch.Tensor, state: Any) -> torch.Tensor:
        """Inference: audio logits (B, K, V) for one frame from h_t (B, 1, H) and codes[t-1] (B, 1, K)."""
        return self.audio_head(hidden[:, -1]).view(-1, self.num_codebooks, self.speech_vocab_size)

    # -- shared computation -----------------------------------------------------------------------

    def _decoder(self) -> nn.Module:
        """The LLM's decoder stack, under the peft wrapper when LoRA is installed (LoRA layers sit inside it)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def _llm_hidden(self, input_embeds: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Decoder stack only (no LM head): hidden states (B, T, H) and the updated KV cache."""
        out = self._decoder()(inputs_embeds=input_embeds, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state, out.cache

    def _target_codes(self, batch: dict[str, Any], max_frames: int) -> torch.Tensor:
        """Agent codes (B, T_codec, K), T_codec <= max_frames: the codec's encoding of `target_audio`, or the
        batch's own `target_codes` (B, T_codec, K) when given: cached with the data by `speechlm data add-codes`
        (checked against this model's codec by `target_codes_fingerprints`), or made elsewhere (e.g. by NeMo's
        codec in the parity tests)."""
        if "target_codes" in batch:
            self._check_cached_codes(batch)
            return _as_tensor(batch["target_codes"], self.device, torch.long)[:, :max_frames]
        lens = _as_tensor(batch["target_audio_lens"], self.device, torch.long)
        n = min(max_frames, self.audio_codec.n_frames_for(int(lens.max()), self.target_sample_rate))
        codes, _ = self.audio_codec.encode(
            _as_tensor(batch["target_audio"], self.device, torch.float32), lens, self.target_sample_rate, n_frames=n
        )
        return codes  # (B, n, K)

    def _check_cached_codes(self, batch: dict[str, Any]) -> None:
        """Refuse cached codes that another codec made, or with another number of codebooks."""
        codes_shape = tuple(np.shape(batch["target_codes"]))
        if len(codes_shape) != 3 or codes_shape[-1] != self.num_codebooks:
            raise ValueError(
                f"target_codes of shape {codes_shape} do not have this model's {self.num_codebooks} codebooks "
                "(batch, frames, codebooks); re-cache them with model.pretrained_audio_codec and data.frame_length"
            )
        ids = batch.get("cut_ids") or ["?"] * codes_shape[0]
        mine = self.audio_codec.fingerprint
        for cut_id, theirs in zip(ids, batch.get("target_codes_fingerprints") or (), strict=False):
            if theirs != mine:
                raise ValueError(
                    f"cut {cut_id}: its cached target_codes were made by another codec (fingerprint "
                    f"{str(theirs)[:12]}) than model.pretrained_audio_codec={self.cfg.pretrained_audio_codec!r} with "
                    f"data.frame_length={self.audio_codec.frame_length:g} (fingerprint {mine[:12]}); re-cache them: "
                    f"speechlm data add-codes <its Shar directory> --codec {self.cfg.pretrained_audio_codec} "
                    f"--frame-length {self.audio_codec.frame_length:g} --overwrite"
                )

    def prepare_inputs(self, batch: dict[str, Any]) -> TeacherForcing:
        """Teacher-forced inputs and labels, as NeMo's `prepare_inputs` (see the module docstring)."""
        device = self.device
        source, source_lens = self.perception(
            _as_tensor(batch["source_audio"], device, torch.float32),
            _as_tensor(batch["source_audio_lens"], device, torch.long),
        )  # (B, T_src, H): NeMo's grid is the perception tensor, padded frames included
        codes = self._target_codes(batch, source.shape[1])  # (B, T, K), T = min(T_src, T_codec)
        T = codes.shape[1]
        tokens = _fit_frames(_as_tensor(batch["target_tokens"], device, torch.long), T, self.text_pad_id)  # (B, T)
        lens = source_lens.clamp(max=T)
        if "frame_lens" in batch:  # the text channel's own length (this project's collator)
            lens = torch.minimum(lens, _as_tensor(batch["frame_lens"], device, torch.long))
        codes = torch.where(tokens[..., None] == self.text_bos_id, self.speech_bos_id, codes)
        codes = torch.where(tokens[..., None] == self.text_eos_id, self.speech_eos_id, codes)
        delay = codes.new_full((codes.shape[0], 1, self.num_codebooks), self.speech_delay_id)
        audio_inputs = torch.cat([delay, codes[:, :-2]], dim=1)  # (B, T-1, K): codes[j - 1]
        return TeacherForcing(
            input_embeds=self._frame_inputs(source[:, : T - 1], tokens[:, :-1], audio_inputs),  # (B, T-1, H)
            audio_inputs=audio_inputs,
            text_labels=tokens[:, 1:],  # (B, T-1)
            audio_labels=codes[:, :-1],  # (B, T-1, K)
            mask=torch.arange(T - 1, device=device)[None] < (lens - 1)[:, None],  # (B, T-1)
        )

    def teacher_forced_logits(self, inputs: TeacherForcing) -> tuple[torch.Tensor, torch.Tensor]:
        """Text logits (B, T-1, V_text) and audio logits (B, T-1, K, V) of every input frame (NeMo's forward)."""
        hidden, _ = self._llm_hidden(inputs.input_embeds)  # (B, T-1, H)
        return self.lm_head(hidden), self._audio_logits(hidden, inputs.audio_inputs)

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = self.prepare_inputs(batch)
        text_logits, audio_logits = self.teacher_forced_logits(inputs)
        mask = inputs.mask
        text_logits, audio_logits = text_logits[mask], audio_logits[mask]  # (N, V_text), (N, K, V)
        text_labels, audio_labels = inputs.text_labels[mask], inputs.audio_labels[mask]  # (N,), (N, K)
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
        """Greedy frame-by-frame generation over the whole perception output of the user signal (NeMo's).

        `input_signal` (B, T) at data.source_sample_rate. Frame t's input is the user frame t plus the text and
        codes generated at frame t - 1 (PAD and the delay code at t = 0). Returns "text" (list[str]), "tokens_text"
        (B, F), "tokens_audio" (B, F, K), "tokens_len" (B,) (the valid perception frames) with F the perception
        tensor length, and when `decode_audio` "audio" (B, F * frame_length * target_sample_rate) float32 and
        "audio_len" (B,).
        """
        device = self.device
        signal = _as_tensor(input_signal, device, torch.float32)
        signal_lens = _as_tensor(input_signal_lens, device, torch.long)
        B = signal.shape[0]
        with eval_mode(self):
            source, lens = self.perception(signal, signal_lens)  # (B, n, H)
            n = source.shape[1]
            gen_text = torch.full((B, n), self.text_pad_id, dtype=torch.long, device=device)
            gen_codes = torch.full((B, n, self.num_codebooks), self.speech_delay_id, dtype=torch.long, device=device)
            prev_text = torch.full((B, 1), self.text_pad_id, dtype=torch.long, device=device)
            prev_codes = torch.full((B, 1, self.num_codebooks), self.speech_delay_id, dtype=torch.long, device=device)
            cache = self._new_llm_cache()
            state = self._new_audio_state(B)
            for t in range(n):
                x = self._frame_inputs(source[:, t : t + 1], prev_text, prev_codes)  # (B, 1, H)
                hidden, cache = self._llm_hidden(x, cache)  # (B, 1, H)
                gen_text[:, t] = self.lm_head(hidden[:, -1]).argmax(-1)
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
    def respond(
        self, audios: AudioInput | Sequence[AudioInput]
    ) -> tuple[list[str], list[np.ndarray]] | tuple[str, np.ndarray]:
        """The agent's text and speech (float32 at data.target_sample_rate, `self.target_sample_rate`) for each
        user audio: a file path (read and resampled as the data pipeline does) or a float32 waveform at
        data.source_sample_rate. One path or 1-D array gives (text, speech); a list gives (texts, speeches)."""
        audios, single = as_waveforms(audios, self.source_sample_rate)
        if single:
            texts, speech = self.respond(audios)
            return texts[0], speech[0]
        signal, lens = _pad_waveforms(audios)
        output = self.offline_inference(signal, lens, decode_audio=True)
        waves = output["audio"].float().cpu().numpy()
        return output["text"], [w[:n] for w, n in zip(waves, output["audio_len"].tolist(), strict=True)]

    @torch.no_grad()
    def probe_logits(self, audios: list[np.ndarray]) -> torch.Tensor:
        """Text logits and the audio logits of every frame (fed PAD text and delay codes), flattened (export
        checks)."""
        signal, lens = _pad_waveforms(audios)
        with eval_mode(self):
            source, _ = self.perception(_as_tensor(signal, self.device), _as_tensor(lens, self.device))  # (B, n, H)
            B, n = source.shape[:2]
            text = torch.full((B, n), self.text_pad_id, dtype=torch.long, device=self.device)
            codes = torch.full((B, n, self.num_codebooks), self.speech_delay_id, dtype=torch.long, device=self.device)
            hidden, _ = self._llm_hidden(self._frame_inputs(source, text, codes))  # (B, n, H)
            text_logits, audio_logits = self.lm_head(hidden), self._audio_logits(hidden, codes)
        return torch.cat([text_logits.float().flatten(), audio_logits.float().flatten()])

    def _new_llm_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.llm.config)

    def decode_codes(self, codes: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (B, T, K) -> waveform (B, T * frame_length * target_sample_rate); control ids become silence."""
        silence = self.audio_codec.silence_codes().to(codes.device)  # (K,)
        codes = torch.where(codes >= self.codebook_size, silence, codes)
        return self.audio_codec.decode(codes, lens, self.target_sample_rate)
