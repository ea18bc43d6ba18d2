"""DuplexS2SSpeechDecoderModel: the LLM predicts text; a causal transformer speech decoder predicts the codes.

Per frame t the LLM sees `perception(user)[t] + E_text(text[t-1])` (no audio embeddings, as in NeMo) and
predicts text[t] from h_t. The `TransformerARSpeechDecoder` runs causally over frames:

    d_t      = proj(h_t) + mean_k E'_k(codes[t-1, k]) + pos_t
    codes[t] = argmax final_proj(Decoder(d_<=t))              (KV cache over frames at inference)

Everything else (data, codec, losses, validation, greedy loop) is DuplexS2SModel's, reused by subclassing and
overriding its audio hooks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speech_models.config import ModelConfig, SpeechDecoderConfig
from speech_models.duplex_data import DuplexS2SCollator
from speech_models.duplex_s2s import DuplexS2SModel

__all__ = ["DuplexS2SCollator", "DuplexS2SSpeechDecoderModel", "TransformerARSpeechDecoder"]

_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}

# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class KVCache:
    """Per-layer keys/values (B, n_heads, T_seen, d_kv) of the speech decoder, grown one frame at a time."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def length(self, layer: int = 0) -> int:
        """Frames already cached for `layer`."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SpeechDecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.d_kv = cfg.n_heads, cfg.d_kv
        inner = cfg.n_heads * cfg.d_kv
        self.qkv = nn.Linear(cfg.d_model, 3 * inner)
        self.out = nn.Linear(inner, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.d_kv).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, dkv)
        past = 0
        if cache is not None:
            past = cache.length(layer)
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, dkv)
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:  # query i (absolute past + i) sees keys 0..past + i
            allowed = torch.arange(past + T, device=x.device)[None] <= past + torch.arange(T, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_kv)  # (B, T, nh * dkv)
        return self.out(y)


class DecoderBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: SpeechDecoderConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_epsilon)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff),
            _ACTIVATIONS[cfg.activation_function](),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_ff, cfg.d_model),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_attn(x), cache, layer))
        return x + self.dropout(self.ffn(self.ln_ffn(x)))


class TransformerARSpeechDecoder(nn.Module):
    """Causal transformer over frames: LLM hidden states + previous codes -> logits (B, T, K, V) of the codes."""

    def __init__(self, cfg: SpeechDecoderConfig, input_dim: int, num_codebooks: int, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_codebooks, self.vocab_size = num_codebooks, vocab_size
        self.input_proj = nn.Linear(input_dim, cfg.d_model) if input_dim != cfg.d_model else nn.Identity()
        self.audio_embeddings = nn.ModuleList(nn.Embedding(vocab_size, cfg.d_model) for _ in range(num_codebooks))
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_epsilon)
        self.final_proj = nn.Linear(cfg.d_model, num_codebooks * vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_method_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def features(self, hidden: torch.Tensor, prev_codes: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Decoder outputs (B, T, d_model) for LLM states (B, T, H) and previous-frame codes (B, T, K).

        With `cache`, the frames continue the cached ones (positions start at the cache length).
        """
        past = 0 if cache is None else cache.length()
        T = hidden.shape[1]
        if past + T > self.cfg.max_seq_len:
            raise ValueError(
                f"speech decoder got {past + T} frames but model.speech_decoder.max_seq_len is "
                f"{self.cfg.max_seq_len}; raise it or use shorter conversations"
            )
        codes_emb = sum(emb(prev_codes[..., k]) for k, emb in enumerate(self.audio_embeddings))  # (B, T, d)
        pos = self.pos_emb(torch.arange(past, past + T, device=hidden.device))  # (T, d)
        x = self.drop(self.input_proj(hidden) + codes_emb / self.num_codebooks + pos)  # (B, T, d)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
        return self.ln_f(x)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., K, V)."""
        return self.final_proj(features).unflatten(-1, (self.num_codebooks, self.vocab_size))

    def forward(self, hidden: torch.Tensor, prev_codes: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.features(hidden, prev_codes, cache))  # (B, T, K, V)


# ----------------------------------------------------------------------------------------------
# The composed model
# ----------------------------------------------------------------------------------------------


class _UncachedState:
    """Inference state when `speech_decoder.use_cache` is false: the whole history is re-run every frame."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []
        self.prev_codes: list[torch.Tensor] = []


class DuplexS2SSpeechDecoderModel(DuplexS2SModel):
    """DuplexS2SModel whose codes come from a `TransformerARSpeechDecoder` (params `speech_decoder.*`)."""

    def __init__(self, cfg: ModelConfig, data_cfg: Any | None = None) -> None:
        if cfg.speech_decoder is None:
            raise ValueError("model.speech_decoder is required for DuplexS2SSpeechDecoderModel")
        super().__init__(cfg, data_cfg)

    def _build_audio_modules(self, hidden: int) -> None:
        self.speech_decoder = TransformerARSpeechDecoder(
            self.cfg.speech_decoder, hidden, self.num_codebooks, self.speech_vocab_size
        )

    def _frame_inputs(self, source: torch.Tensor, prev_text: torch.Tensor, prev_codes: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(prev_text)  # (B, T, H)
        return x + source.to(x.dtype)

    def _audio_logits(self, hidden: torch.Tensor, prev_codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        features = self.speech_decoder.features(hidden, prev_codes)  # (B, T, d)
        return self.speech_decoder.logits(features[mask])  # (N, K, V)

    def _new_audio_state(self, batch_size: int) -> KVCache | _UncachedState:
        return self.speech_decoder.new_cache() if self.cfg.speech_decoder.use_cache else _UncachedState()

    def _audio_step(
        self, hidden: torch.Tensor, prev_codes: torch.Tensor, state: KVCache | _UncachedState
    ) -> torch.Tensor:
        if isinstance(state, KVCache):
            return self.speech_decoder(hidden, prev_codes, state)[:, -1]  # (B, K, V)
        state.hidden.append(hidden)
        state.prev_codes.append(prev_codes)
        all_hidden = torch.cat(state.hidden, dim=1)  # (B, t + 1, H)
        all_codes = torch.cat(state.prev_codes, dim=1)  # (B, t + 1, K)
        return self.speech_decoder(all_hidden, all_codes)[:, -1]  # (B, K, V)
