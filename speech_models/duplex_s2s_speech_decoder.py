"""DuplexS2SSpeechDecoderModel: the LLM predicts text; a causal transformer speech decoder predicts the codes.

Per frame t the LLM sees `perception(user)[t] + E_text(text_in[t])` (no audio embeddings, as in NeMo) and its
hidden state h_t feeds NeMo's `TransformerARSpeechDecoder` (`speech_generation.*`), which runs causally over
frames:

    d_t      = input_proj(h_t) + mean_k E'_k(codes_in[t, k]) (+ pos_t)
    codes[t] = argmax final_proj(Transformer(d_<=t))              (cached over frames at inference)

The transformer is NeMo's `tts.modules.transformer_2501.Transformer` (self-attention only): pre-LayerNorm blocks
without biases, causal self-attention, and a causal *convolutional* feed-forward block (kernel `kernel_size`,
GELU-tanh). Parameter names, config keys and numerics are NeMo's, so a NeMo checkpoint's decoder loads and gives
NeMo's logits. Everything else (data, codec, losses, validation, greedy loop) is DuplexS2SModel's, reused by
subclassing and overriding its audio hooks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speech_models.config import ModelConfig, SpeechDecoderConfig, speech_decoder_option_problems
from speech_models.duplex_data import DuplexS2SCollator
from speech_models.duplex_s2s import DuplexS2SModel

__all__ = ["DuplexS2SCollator", "DuplexS2SSpeechDecoderModel", "TransformerARSpeechDecoder"]

# ----------------------------------------------------------------------------------------------
# Building blocks (NeMo transformer_2501 names)
# ----------------------------------------------------------------------------------------------


class LayerCache:
    """What one layer keeps between decoding steps: attention keys/values (B, heads, T_seen, d_head) and the last
    `kernel_size - 1` inputs of each causal convolution (B, kernel_size - 1, C), zeros before the first frame."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.conv_inputs: dict[str, torch.Tensor] = {}

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


class DecoderCache:
    """Per-layer caches of the speech decoder, grown one frame (or chunk) at a time."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    def length(self) -> int:
        """Frames already decoded."""
        return self.layers[0].length if self.layers else 0


class CausalConv(nn.Module):
    """NeMo's ConvolutionLayer with is_causal: zero the padded frames, left-pad by kernel - 1, convolve (no bias).
    With a cache, the left context is the previous frames' inputs instead of zeros."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: LayerCache | None, key: str) -> torch.Tensor:
        """(B, T, C_in) -> (B, T, C_out); `mask` (B, T, 1) is 1 on valid frames."""
        x = x * mask
        context = self.kernel_size - 1
        if cache is None:
            left = x.new_zeros(x.shape[0], context, x.shape[2])  # (B, k-1, C_in)
        else:
            left = cache.conv_inputs.get(key, x.new_zeros(x.shape[0], context, x.shape[2]))
        full = torch.cat([left, x], dim=1)  # (B, k-1 + T, C_in)
        if cache is not None:
            cache.conv_inputs[key] = full[:, full.shape[1] - context :]
        return self.conv(full.transpose(1, 2)).transpose(1, 2) * mask  # (B, T, C_out)


class PositionwiseConvFF(nn.Module):
    """Causal conv (d -> d_ffn) -> GELU(tanh) -> causal conv (d_ffn -> d) -> dropout (NeMo `pos_ff`)."""

    def __init__(self, cfg: SpeechDecoderConfig):
        super().__init__()
        self.proj = CausalConv(cfg.d_model, cfg.d_ffn, cfg.kernel_size)
        self.o_net = CausalConv(cfg.d_ffn, cfg.d_model, cfg.kernel_size)
        self.dropout = nn.Dropout(cfg.p_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        hidden = F.gelu(self.proj(x, mask, cache, "proj"), approximate="tanh")  # (B, T, d_ffn)
        return self.dropout(self.o_net(hidden, mask, cache, "o_net"))  # (B, T, d)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with one fused qkv projection, no biases (NeMo `self_attention`)."""

    def __init__(self, cfg: SpeechDecoderConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.sa_n_heads, cfg.d_model // cfg.sa_n_heads
        self.qkv_net = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_net = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.p_dropout = cfg.p_dropout
        self.dropout = nn.Dropout(cfg.p_dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_net(x).view(B, T, 3, self.n_heads, self.d_head)  # NeMo's (3, heads, d_head) channel order
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, d_head)
        past = 0
        if cache is not None:
            past = cache.length
            if past:
                k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)
            cache.keys, cache.values = k, v  # (B, heads, past + T, d_head)
        dropout = self.p_dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:  # query i (absolute past + i) sees keys 0 .. past + i
            keys = torch.arange(past + T, device=x.device)[None]
            allowed = keys <= past + torch.arange(T, device=x.device)[:, None]  # (T, past + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, d)
        return self.dropout(self.o_net(y))


class TransformerLayer(nn.Module):
    """x + SelfAttention(LN(x)), then x + ConvFF(LN(x)); padded frames zeroed in and out (NeMo)."""

    def __init__(self, cfg: SpeechDecoderConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(cfg.d_model, bias=False)
        self.self_attention = SelfAttention(cfg)
        self.norm_pos_ff = nn.LayerNorm(cfg.d_model, bias=False)
        self.pos_ff = PositionwiseConvFF(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        x = x * mask
        x = x + self.self_attention(self.norm_self(x), cache)
        x = x + self.pos_ff(self.norm_pos_ff(x), mask, cache)
        return x * mask


class Transformer(nn.Module):
    """NeMo's `transformer_2501.Transformer`, self-attention only (`t5_decoder`)."""

    def __init__(self, cfg: SpeechDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.p_dropout)
        self.dropout_out = nn.Dropout(cfg.p_dropout_out) if cfg.p_dropout_out > 0 else nn.Identity()
        self.norm_out = nn.LayerNorm(cfg.d_model, bias=False) if cfg.apply_norm_out else nn.Identity()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers))
        self.position_embeddings = (
            nn.Embedding(cfg.max_length_causal_mask, cfg.d_model) if cfg.use_learnable_pos_emb else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """NeMo's GPT-2 init: N(0, 0.02) weights, zero biases, output projections scaled by 1 / sqrt(2 n_layers)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
                nn.init.normal_(module.weight, std=0.02)
        for name, param in self.named_parameters():
            if "o_net" in name and name.endswith("weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, x: torch.Tensor, cache: DecoderCache | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, T, d); with `cache`, the frames continue the cached ones."""
        past = 0 if cache is None else cache.length()
        T = x.shape[1]
        if past + T > self.cfg.max_length_causal_mask:
            raise ValueError(
                f"speech decoder got {past + T} frames but model.speech_decoder.max_length_causal_mask is "
                f"{self.cfg.max_length_causal_mask}; raise it or use shorter conversations"
            )
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(past, past + T, device=x.device))[None]
        x = self.dropout(x)
        mask = x.new_ones(x.shape[0], T, 1)  # every frame is valid (NeMo's all-ones loss mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if cache is None else cache.layers[i])
        return self.dropout_out(self.norm_out(x))


class TransformerARSpeechDecoder(nn.Module):
    """LLM hidden states + previous-frame codes -> code logits (B, T, K, V) (NeMo `speech_generation`)."""

    def __init__(self, cfg: SpeechDecoderConfig, input_dim: int, num_codebooks: int, vocab_size: int) -> None:
        super().__init__()
        if problems := speech_decoder_option_problems(cfg):
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.num_codebooks, self.vocab_size = num_codebooks, vocab_size
        self.input_proj = nn.Linear(input_dim, cfg.d_model) if input_dim != cfg.d_model else None
        self.t5_decoder = Transformer(cfg)
        self.final_proj = nn.Linear(cfg.d_model, num_codebooks * vocab_size)
        self.audio_embeddings = (
            nn.ModuleList(nn.Embedding(vocab_size, cfg.d_model) for _ in range(num_codebooks))
            if cfg.cond_on_prev_audio_tokens
            else None
        )

    def new_cache(self) -> DecoderCache:
        return DecoderCache(self.cfg.n_layers)

    def forward(
        self, hidden: torch.Tensor, prev_codes: torch.Tensor, cache: DecoderCache | None = None
    ) -> torch.Tensor:
        """Logits (B, T, K, V) for LLM states (B, T, H) and previous-frame codes (B, T, K)."""
        if self.cfg.detach_input:
            hidden = hidden.detach()
        x = self.input_proj(hidden) if self.input_proj is not None else hidden  # (B, T, d)
        if self.audio_embeddings is not None:
            codes_emb = self.audio_embeddings[0](prev_codes[..., 0])
            for k in range(1, self.num_codebooks):
                codes_emb = codes_emb + self.audio_embeddings[k](prev_codes[..., k])
            x = x + codes_emb / self.num_codebooks  # (B, T, d): the mean over codebooks, NeMo's order
        out = self.t5_decoder(x, cache)  # (B, T, d)
        return self.final_proj(out).unflatten(-1, (self.num_codebooks, self.vocab_size))


# ----------------------------------------------------------------------------------------------
# The composed model
# ----------------------------------------------------------------------------------------------


class _UncachedState:
    """Inference state when `speech_decoder.use_cache` is false: the whole history is re-run every frame."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []
        self.prev_codes: list[torch.Tensor] = []


class DuplexS2SSpeechDecoderModel(DuplexS2SModel):
    """DuplexS2SModel whose codes come from a `TransformerARSpeechDecoder` (params `speech_generation.*`).

    NeMo's model also creates `embed_audio_tokens` and `audio_head` and never uses them; they are not created
    here (and are skipped when a NeMo checkpoint loads).
    """

    def __init__(self, cfg: ModelConfig, data_cfg: Any | None = None) -> None:
        if cfg.speech_decoder is None:
            raise ValueError("model.speech_decoder is required for DuplexS2SSpeechDecoderModel")
        super().__init__(cfg, data_cfg)

    def _build_audio_modules(self, hidden: int) -> None:
        self.speech_generation = TransformerARSpeechDecoder(
            self.cfg.speech_decoder, hidden, self.num_codebooks, self.speech_vocab_size
        )

    def _parts_kept_in_eval_when_frozen(self) -> list[nn.Module]:
        return [*super()._parts_kept_in_eval_when_frozen(), self.speech_generation]

    def _frame_inputs(self, source: torch.Tensor, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(text)  # (B, T, H): the LLM sees no audio codes
        return x + source.to(x.dtype) * self.cfg.duplex_user_channel_weight

    def _audio_logits(self, hidden: torch.Tensor, prev_codes: torch.Tensor) -> torch.Tensor:
        return self.speech_generation(hidden, prev_codes)  # (B, T, K, V)

    def _new_audio_state(self, batch_size: int) -> DecoderCache | _UncachedState:
        return self.speech_generation.new_cache() if self.cfg.speech_decoder.use_cache else _UncachedState()

    def _audio_step(
        self, hidden: torch.Tensor, prev_codes: torch.Tensor, state: DecoderCache | _UncachedState
    ) -> torch.Tensor:
        if isinstance(state, DecoderCache):
            return self.speech_generation(hidden, prev_codes, state)[:, -1]  # (B, K, V)
        state.hidden.append(hidden)
        state.prev_codes.append(prev_codes)
        all_hidden = torch.cat(state.hidden, dim=1)  # (B, t + 1, H)
        all_codes = torch.cat(state.prev_codes, dim=1)  # (B, t + 1, K)
        return self.speech_generation(all_hidden, all_codes)[:, -1]  # (B, K, V)
