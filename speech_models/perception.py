"""Audio perception: log-mel front end -> FastConformer encoder -> modality adapter -> projection.

The output of `AudioPerceptionModule` replaces each audio placeholder in a SALM prompt, one frame per
`token_equivalent_duration` seconds of audio (80 ms with 10 ms features and 8x subsampling).

Why the encoder is written here instead of using transformers' `ParakeetEncoder`: ParakeetEncoder is a
full-context, symmetric FastConformer with a fixed batch-norm convolution module. It has no limited or
chunked attention context (`att_context_size`, `att_context_style`), no causal or asymmetric depthwise
convolution (`conv_context_size`), no `conv_norm_type` other than batch norm, no causal downsampling, no
"striding" subsampling, no absolute positional attention and no tied (`untie_biases: false`) position
biases. Those keys are part of the NeMo config surface this project promises, so the encoder below
implements them, with NeMo's module names (`pre_encode.conv.N`, `layers.N.self_attn.linear_q`,
`conv.batch_norm`, ...) so that a `.nemo` checkpoint loads by name, and a small name map for
transformers Parakeet checkpoints (`subsampling.layers.N` -> `pre_encode.conv.N`, `q_proj` -> `linear_q`).

Shapes: features and hidden states are time-major, (B, T, C), everywhere in this file (NeMo's modules
take (B, C, T); the transposes are done once, in the loaders, never per layer).

File layout (top to bottom): front end, SpecAugment, encoder building blocks, the encoder, the perception
module, and last the pretrained-checkpoint loaders.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import tarfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speech_models.config import (
    ConformerConfig,
    PerceptionConfig,
    PreprocessorConfig,
    SpecAugmentConfig,
    perception_option_problems,
)

logger = logging.getLogger(__name__)

NORMALIZE_EPS = 1e-5  # NeMo's CONSTANT, added to the per-feature standard deviation
MASK_FILL = -10000.0  # NeMo's value for masked attention scores (finite: fully padded rows stay finite)
CPU_CHUNK_ELEMENTS = 1 << 22  # ConvSubsampling's largest activation per CPU chunk (4M floats = 16 MiB)
_WINDOWS = {
    "hann": torch.hann_window,
    "hamming": torch.hamming_window,
    "blackman": torch.blackman_window,
    "bartlett": torch.bartlett_window,
    "ones": lambda n, periodic=False: torch.ones(n),
}


# ----------------------------------------------------------------------------------------------
# Front end: waveform -> log-mel features (NeMo AudioToMelSpectrogramPreprocessor / FilterbankFeatures)
# ----------------------------------------------------------------------------------------------


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, lowfreq: float = 0.0, highfreq: float | None = None, norm="slaney"
) -> torch.Tensor:
    """Slaney-scale triangular filters as librosa.filters.mel (NeMo's): (n_mels, n_fft // 2 + 1)."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=float(lowfreq),
        max_frequency=float(highfreq) if highfreq is not None else sample_rate / 2,
        sampling_rate=sample_rate,
        norm=norm,
        mel_scale="slaney",
    )
    return torch.from_numpy(fb.T.copy()).float()


def stft_sizes(cfg: PreprocessorConfig) -> tuple[int, int, int]:
    """(window length, hop length, n_fft) in samples, as NeMo derives them from the config."""
    win_length = cfg.n_window_size or round(cfg.window_size * cfg.sample_rate)
    hop_length = cfg.n_window_stride or round(cfg.window_stride * cfg.sample_rate)
    n_fft = cfg.n_fft or 2 ** math.ceil(math.log2(win_length))
    return win_length, hop_length, n_fft


class FilterbankFeatures(nn.Module):
    """Log-mel spectrogram with NeMo's conventions (pre-emphasis, |STFT|^mag_power, log(x + guard), per-feature
    normalisation, frames past a row's length set to zero). The tensor keeps every STFT frame, padded ones
    included, as NeMo's does: duplex models run over the whole perception tensor, so its length must be NeMo's.

    Runs in float32 without autograd whatever the module dtype: the front end has no parameters, and bf16 STFTs
    lose the dynamic range the log needs.
    """

    def __init__(self, cfg: PreprocessorConfig):
        super().__init__()
        self.sample_rate = cfg.sample_rate
        self.win_length, self.hop_length, self.n_fft = stft_sizes(cfg)
        if self.win_length > self.n_fft:
            raise ValueError(
                f"preprocessor.window_size {cfg.window_size}s is {self.win_length} samples, more than "
                f"preprocessor.n_fft {cfg.n_fft}; raise n_fft or shorten the window"
            )
        self.features = cfg.features
        self.normalize = cfg.normalize
        self.dither = cfg.dither
        self.pad_to = cfg.pad_to
        self.preemph = cfg.preemph
        self.mag_power = cfg.mag_power
        self.log = cfg.log
        self.log_zero_guard_type = cfg.log_zero_guard_type
        self.log_zero_guard_value = cfg.log_zero_guard_value
        # Persistent buffers, named as NeMo's (perception.preprocessor.featurizer.window / .fb).
        self.register_buffer("window", _WINDOWS[cfg.window](self.win_length, periodic=False))
        fb = mel_filterbank(cfg.sample_rate, self.n_fft, cfg.features, cfg.lowfreq, cfg.highfreq, cfg.mel_norm)
        self.register_buffer("fb", fb.unsqueeze(0))

    def output_lengths(self, audio_lens: torch.Tensor) -> torch.Tensor:
        """Valid feature frames per example: floor((len + 2 * (n_fft // 2) - n_fft) / hop), as NeMo."""
        pad = self.n_fft // 2 * 2
        return torch.div(audio_lens + pad - self.n_fft, self.hop_length, rounding_mode="floor").clamp(min=0)

    def _guard(self) -> float:
        value = self.log_zero_guard_value
        if isinstance(value, str):  # NeMo's "tiny" / "eps": of the float32 features
            return getattr(torch.finfo(torch.float32), value)
        return value

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T_samples), (B,) -> features (B, T_frames, features), frame lengths (B,)."""
        with torch.autocast(device_type=audio.device.type, enabled=False):
            return self._features(audio.float(), audio_lens)

    def _features(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat_lens = self.output_lengths(audio_lens)
        if self.training and self.dither > 0:
            audio = audio + self.dither * torch.randn_like(audio)
        if self.preemph is not None:
            audio = torch.cat([audio[:, :1], audio[:, 1:] - self.preemph * audio[:, :-1]], dim=1)
            sample_pad = torch.arange(audio.size(1), device=audio.device)[None, :] >= audio_lens[:, None]
            audio = audio.masked_fill(sample_pad, 0.0)
        spec = torch.stft(
            audio,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.float(),
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # (B, n_fft // 2 + 1, T_stft)
        magnitude = torch.view_as_real(spec).pow(2).sum(-1).sqrt()  # |X|, NeMo's order of operations
        power = magnitude.pow(self.mag_power) if self.mag_power != 1.0 else magnitude
        mel = torch.matmul(self.fb[0].float(), power)  # (B, features, T_stft)
        if self.log:
            guard = self._guard()
            mel = torch.log(mel + guard) if self.log_zero_guard_type == "add" else torch.log(mel.clamp(min=guard))
        frame_pad = torch.arange(mel.size(-1), device=mel.device)[None, :] >= feat_lens[:, None]  # (B, T_stft)
        mel = self._normalize(mel, frame_pad)
        mel = mel.masked_fill(frame_pad[:, None, :], 0.0)
        if self.pad_to > 0 and mel.size(-1) % self.pad_to:
            mel = F.pad(mel, (0, self.pad_to - mel.size(-1) % self.pad_to))
        return mel.transpose(1, 2), feat_lens  # (B, T, features)

    def _normalize(self, mel: torch.Tensor, frame_pad: torch.Tensor) -> torch.Tensor:
        if self.normalize not in ("per_feature", "all_features"):
            return mel
        valid = (~frame_pad)[:, None, :]  # (B, 1, T)
        dims = (2,) if self.normalize == "per_feature" else (1, 2)
        count = valid.sum(dim=dims, keepdim=True) * (1 if self.normalize == "per_feature" else mel.size(1))
        mean = torch.where(valid, mel, 0.0).sum(dim=dims, keepdim=True) / count.clamp(min=1)
        var = torch.where(valid, mel - mean, 0.0).pow(2).sum(dim=dims, keepdim=True) / (count - 1).clamp(min=1)
        std = var.sqrt().nan_to_num(0.0) + NORMALIZE_EPS
        return (mel - mean) / std


class AudioToMelSpectrogramPreprocessor(nn.Module):
    """NeMo's preprocessor module: a `featurizer` (so buffers are `preprocessor.featurizer.{window,fb}`, as in
    NeMo checkpoints). `keep_fp32` tells the trainer not to cast it."""

    keep_fp32 = True

    def __init__(self, cfg: PreprocessorConfig):
        super().__init__()
        self.featurizer = FilterbankFeatures(cfg)

    @property
    def hop_length(self) -> int:
        return self.featurizer.hop_length

    @property
    def preemph(self) -> float | None:
        return self.featurizer.preemph

    def output_lengths(self, audio_lens: torch.Tensor) -> torch.Tensor:
        return self.featurizer.output_lengths(audio_lens)

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.featurizer(audio, audio_lens)


# ----------------------------------------------------------------------------------------------
# SpecAugment (training only)
# ----------------------------------------------------------------------------------------------


class SpecAugment(nn.Module):
    """Zero random frequency bands and time spans of (B, T, F) features; identity in eval mode.

    Vectorised over the batch and the masks (NeMo loops over both in Python). Widths are drawn uniformly in
    [0, width]; a time width below 1 is a fraction of each utterance's length.
    """

    def __init__(self, cfg: SpecAugmentConfig):
        super().__init__()
        self.freq_masks = cfg.freq_masks
        self.time_masks = cfg.time_masks
        self.freq_width = cfg.freq_width
        self.time_width = cfg.time_width

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return feats
        B, T, n_freq = feats.shape
        device = feats.device
        mask = torch.zeros(B, T, n_freq, dtype=torch.bool, device=device)
        if self.freq_masks > 0 and self.freq_width > 0:
            upper = max(n_freq - self.freq_width, 0)
            start = torch.randint(0, upper + 1, (B, self.freq_masks, 1), device=device)
            width = torch.randint(0, self.freq_width + 1, (B, self.freq_masks, 1), device=device)
            bins = torch.arange(n_freq, device=device)  # (F,)
            freq = ((bins >= start) & (bins < start + width)).any(dim=1)  # (B, F)
            mask |= freq[:, None, :]
        if self.time_masks > 0 and self.time_width > 0:
            lens_f = lens.to(device=device, dtype=torch.float32)
            if self.time_width < 1:
                max_width = (lens_f * self.time_width).floor().clamp(min=1)  # (B,)
            else:
                max_width = torch.full_like(lens_f, float(int(self.time_width)))
            upper = (lens_f - max_width).clamp(min=1)  # (B,)
            rand = torch.rand(B, self.time_masks, 2, device=device)
            start = (rand[..., 0] * (upper[:, None] + 1)).floor()[..., None]  # (B, n, 1)
            width = (rand[..., 1] * (max_width[:, None] + 1)).floor()[..., None]  # (B, n, 1)
            frames = torch.arange(T, device=device, dtype=torch.float32)  # (T,)
            time = ((frames >= start) & (frames < start + width)).any(dim=1)  # (B, T)
            mask |= time[:, :, None]
        return feats.masked_fill(mask, 0.0)


# ----------------------------------------------------------------------------------------------
# Encoder building blocks (NeMo names)
# ----------------------------------------------------------------------------------------------


def _conv_out_length(lens: torch.Tensor, all_paddings: int, kernel: int, stride: int, repeat: int) -> torch.Tensor:
    """NeMo calc_length: floor((len + all_paddings - kernel) / stride + 1), `repeat` times."""
    for _ in range(repeat):
        lens = torch.div(lens + all_paddings - kernel, stride, rounding_mode="floor") + 1
    return lens


class CausalConv2D(nn.Conv2d):
    """Conv2d padded (kernel - 1) before and (stride - 1) after, on time and frequency (NeMo CausalConv2D)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups)
        self.pad = (kernel_size - 1, stride - 1, kernel_size - 1, stride - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class ConvSubsampling(nn.Module):
    """Stride-2 3x3 convolutions over (time, frequency), log2(factor) times, then a linear to d_model.

    dw_striding: a full conv, then (depthwise conv, pointwise conv) pairs; striding: full convs only.
    `conv` keeps NeMo's indices (ReLUs included) so `pre_encode.conv.N.weight` names match.

    This block is the encoder's most expensive part on CPU: its first activation is (B, C, T/2, F/2), 16M
    floats for 8 x 4 s. ReLUs run in place, padding masks only when a row is shorter than the batch, and
    on CPU the batch goes through in chunks (see `forward`).
    (Measured on 2 CPU cores: an im2col first conv with channels-last 1x1 linears was 2x slower in the
    backward pass, from layout conversions; channels-last weights gained ~10%, not worth the DDP caveats.)
    """

    def __init__(self, subsampling: str, factor: int, feat_in: int, feat_out: int, channels: int, causal: bool):
        super().__init__()
        if factor < 2 or factor & (factor - 1):
            raise ValueError(f"subsampling_factor {factor} is not supported; use a power of two >= 2 (or 1)")
        self.num_stages = int(math.log2(factor))
        self.kernel, self.stride = 3, 2
        # (left, right) padding of every strided conv, on time and frequency alike
        self.padding = (self.kernel - 1, self.stride - 1) if causal else (1, 1)
        self.all_paddings = sum(self.padding)

        def conv(c_in: int, c_out: int, groups: int = 1) -> nn.Module:
            if causal:
                return CausalConv2D(c_in, c_out, self.kernel, self.stride, groups=groups)
            return nn.Conv2d(c_in, c_out, self.kernel, stride=self.stride, padding=1, groups=groups)

        layers: list[nn.Module] = [conv(1, channels), nn.ReLU()]
        for _ in range(self.num_stages - 1):
            if subsampling == "dw_striding":
                layers += [conv(channels, channels, groups=channels), nn.Conv2d(channels, channels, 1), nn.ReLU()]
            elif subsampling == "striding":
                layers += [conv(channels, channels), nn.ReLU()]
            else:
                raise ValueError(f"subsampling {subsampling!r} is not one of ['dw_striding', 'striding']")
        self.conv = nn.Sequential(*layers)
        freq_out = int(
            _conv_out_length(torch.tensor(feat_in), self.all_paddings, self.kernel, self.stride, self.num_stages)
        )
        self.out = nn.Linear(channels * freq_out, feat_out)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F), (B,) -> (B, T / factor, feat_out), (B,).

        On CPU the batch is processed in chunks whose first activation stays under ~16 MiB: glibc serves
        larger blocks with fresh mmaps, so unchunked 8 x 4 s batches spend half of this block's time in page
        faults (see bench/salm_step.py). Rows are independent here, so chunking changes nothing else.
        """
        B, T, Fq = x.shape
        if x.device.type == "cpu" and B > 1:
            first = self.conv[0]
            per_row = first.out_channels * (T // self.stride + 1) * (Fq // self.stride + 1)
            rows = max(1, CPU_CHUNK_ELEMENTS // per_row)
            if rows < B:
                parts = [self._subsample(xc, lc) for xc, lc in zip(x.split(rows), lens.split(rows), strict=True)]
                return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return self._subsample(x, lens)

    def _subsample(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames past a row's length are zero at the input of every strided conv (as NeMo's masked
        subsampling), so padding never leaks into valid frames. The input padding is already zero (the
        front end zero-fills it); later, conv biases make padded frames non-zero, and they are re-zeroed
        before each ReLU, in place, and only when some row is shorter than the batch.
        """
        padded = bool((lens < x.size(1)).any())
        x = x.unsqueeze(1)  # (B, 1, T, F)
        for layer in self.conv:
            if isinstance(layer, nn.ReLU):
                if padded:
                    valid = torch.arange(x.size(2), device=x.device)[None, :] < lens[:, None]  # (B, T')
                    x = x.mul_(valid[:, None, :, None].to(x.dtype))
                x = x.relu_()
            else:
                x = layer(x)
                if layer.stride[0] > 1:
                    lens = _conv_out_length(lens, self.all_paddings, self.kernel, self.stride, 1)
        B, C, T, Fq = x.shape
        x = x.transpose(1, 2).reshape(B, T, C * Fq)  # (B, T', C * F'), NeMo's (channel, frequency) order
        return self.out(x), lens


class RelPositionalEncoding(nn.Module):
    """Sinusoids for relative positions L-1 ... -(L-1) (Transformer-XL), plus NeMo's input x-scaling.

    The table is a cache grown on demand (and moved to the input's device), not a buffer: no length limit
    is baked into checkpoints, and DDP never sees a tensor whose size differs between ranks.
    """

    def __init__(self, d_model: int, dropout: float, dropout_emb: float, xscale: float | None, relative: bool):
        super().__init__()
        self.d_model = d_model
        self.xscale = xscale
        self.relative = relative
        self.dropout = nn.Dropout(dropout)
        self.dropout_emb = nn.Dropout(dropout_emb) if dropout_emb > 0 else None
        # A plain attribute, not a buffer: it changes size, and DDP broadcasts (and FSDP shards) buffers.
        self.pe = torch.empty(1, 0, d_model)
        self.max_len = 0

    def _extend(self, length: int, device: torch.device) -> None:
        if length <= self.max_len and self.pe.device == device:
            return
        length = max(length, self.max_len)
        if self.relative:
            positions = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)  # (2L-1,)
        else:
            positions = torch.arange(0, length, dtype=torch.float32, device=device)  # (L,)
        div = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / self.d_model)
        )
        angles = positions[:, None] * div[None, :]  # (P, D/2)
        pe = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(
            len(positions), self.d_model
        )  # sin/cos interleaved
        self.pe = pe.unsqueeze(0)  # (1, P, D)
        self.max_len = length

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) -> scaled x (B, T, D) and position embeddings (1, 2T-1, D) (relative) or None (absolute)."""
        T = x.size(1)
        self._extend(T, x.device)
        if self.xscale is not None:
            x = x * self.xscale
        if self.relative:
            center = self.max_len - 1  # index of relative position 0
            pos_emb = self.pe[:, center - (T - 1) : center + T].to(x.dtype)  # (1, 2T-1, D)
            if self.dropout_emb is not None:
                pos_emb = self.dropout_emb(pos_emb)
            return self.dropout(x), pos_emb
        return self.dropout(x + self.pe[:, :T].to(x.dtype)), None


class ConformerFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, bias: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.silu(self.linear1(x))))


class MultiHeadAttention(nn.Module):
    """Absolute-position multi-head self-attention (NeMo MultiHeadAttention names)."""

    def __init__(self, n_heads: int, d_model: int, dropout: float, bias: bool):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.h, self.d_k = n_heads, d_model // n_heads
        self.dropout_p = dropout
        self.linear_q = nn.Linear(d_model, d_model, bias=bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.h, self.d_k).transpose(1, 2)  # (B, H, T, d_k)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, pad_mask: torch.Tensor
    ) -> torch.Tensor:
        """SDPA with an additive float bias (B|1, H|1, T, T); back to (B, T, D) and the output projection.

        A padded query frame attends to nothing (NeMo zeroes the probabilities of masked keys, and every key
        is masked for it), so its attention output is zero before `linear_out`, not the uniform average the
        finite -10000 bias gives. Valid frames are unaffected; padded frames then carry NeMo's values, which
        duplex models do use (they run the LLM over the whole perception tensor).
        """
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout)  # (B, H, T, d_k)
        out = out.masked_fill(pad_mask[:, None, :, None], 0.0)
        B, H, T, d_k = out.shape
        return self.linear_out(out.transpose(1, 2).reshape(B, T, H * d_k))  # (B, T, D)

    def forward(
        self, x: torch.Tensor, att_bias: torch.Tensor, pos_emb: torch.Tensor | None, pad_mask: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = self._heads(self.linear_q(x)), self._heads(self.linear_k(x)), self._heads(self.linear_v(x))
        return self._attend(q, k, v, att_bias, pad_mask)


class RelPositionMultiHeadAttention(MultiHeadAttention):
    """Transformer-XL relative-position attention: softmax(((q+u)k^T + shift((q+v)p^T)) / sqrt(d_k)) v.

    The positional term (b)+(d) goes into SDPA as its additive mask, as NeMo's `use_pytorch_sdpa` path.
    `pos_bias_u/v` are shared Parameters across layers when the encoder ties them (untie_biases: false).
    """

    def __init__(
        self,
        n_heads: int,
        d_model: int,
        dropout: float,
        bias: bool,
        pos_bias_u: nn.Parameter | None,
        pos_bias_v: nn.Parameter | None,
    ):
        super().__init__(n_heads, d_model, dropout, bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = pos_bias_u if pos_bias_u is not None else nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = pos_bias_v if pos_bias_v is not None else nn.Parameter(torch.zeros(self.h, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, 2T-1) scores indexed by relative position -> (B, H, T, 2T-1) with column j = key j first."""
        B, H, T, P = x.shape
        x = F.pad(x, (1, 0))  # (B, H, T, P+1)
        x = x.view(B, H, P + 1, T)[:, :, 1:]  # (B, H, P, T): drop the first row
        return x.reshape(B, H, T, P)

    def forward(
        self, x: torch.Tensor, att_bias: torch.Tensor, pos_emb: torch.Tensor | None, pad_mask: torch.Tensor
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)  # (B, T, H, d_k)
        k, v = self._heads(self.linear_k(x)), self._heads(self.linear_v(x))  # (B, H, T, d_k)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)  # (1, H, 2T-1, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)  # (B, H, T, d_k)
        matrix_bd = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))[..., :T]  # (B, H, T, T)
        bias = matrix_bd * (1.0 / math.sqrt(self.d_k)) + att_bias  # SDPA scales only q k^T
        return self._attend(q_u, k, v, bias, pad_mask)


class ConformerConvolution(nn.Module):
    """Pointwise conv + GLU -> depthwise conv (symmetric or causal padding) -> norm -> SiLU -> pointwise conv.

    The 1x1 convolutions keep NeMo's Conv1d weights (C_out, C_in, 1) but run as linears on (B, T, C), which
    saves two transposes per layer.
    """

    def __init__(self, d_model: int, kernel_size: int, norm_type: str, context: tuple[int, int], bias: bool):
        super().__init__()
        self.norm_type = norm_type
        self.context = context
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=bias)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, padding=0, groups=d_model, bias=bias)
        if norm_type == "batch_norm":
            self.batch_norm: nn.Module = nn.BatchNorm1d(d_model)
        elif norm_type == "layer_norm":
            self.batch_norm = nn.LayerNorm(d_model)
        elif norm_type.startswith(("group_norm", "groupnorm")):
            groups = int(norm_type.removeprefix("group_norm").removeprefix("groupnorm") or 1)  # group_norm<N>
            self.batch_norm = nn.GroupNorm(groups, d_model)
        else:
            raise ValueError(f"conv_norm_type {norm_type!r} is not one of ['batch_norm', 'layer_norm', 'group_norm']")
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.pointwise_conv1.weight.squeeze(-1), self.pointwise_conv1.bias)  # (B, T, 2D)
        x = F.glu(x, dim=-1)  # (B, T, D)
        x = x.masked_fill(pad_mask[:, :, None], 0.0)
        x = F.pad(x.transpose(1, 2), self.context)  # (B, D, left + T + right)
        x = self.depthwise_conv(x)  # (B, D, T)
        # LayerNorm normalises the last dim, so it needs channels last; batch/group norm need them second.
        x = self.batch_norm(x.transpose(1, 2)) if self.norm_type == "layer_norm" else self.batch_norm(x).transpose(1, 2)
        # x: (B, T, D)
        x = F.silu(x)
        return F.linear(x, self.pointwise_conv2.weight.squeeze(-1), self.pointwise_conv2.bias)  # (B, T, D)


class ConformerLayer(nn.Module):
    """Macaron block: x + FF/2 -> x + MHSA -> x + Conv -> x + FF/2 -> LayerNorm (pre-norm residuals)."""

    def __init__(
        self, cfg: ConformerConfig, conv_context: tuple[int, int], bias: bool, pos_bias_u=None, pos_bias_v=None
    ):
        super().__init__()
        d, d_ff = cfg.d_model, cfg.d_model * cfg.ff_expansion_factor
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = ConformerFeedForward(d, d_ff, cfg.dropout, bias)
        self.norm_self_att = nn.LayerNorm(d)
        if cfg.self_attention_model == "abs_pos":
            self.self_attn: MultiHeadAttention = MultiHeadAttention(cfg.n_heads, d, cfg.dropout_att, bias)
        else:  # rel_pos, and rel_pos_local_attn as a banded mask (same maths, dense compute)
            self.self_attn = RelPositionMultiHeadAttention(
                cfg.n_heads, d, cfg.dropout_att, bias, pos_bias_u, pos_bias_v
            )
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConformerConvolution(d, cfg.conv_kernel_size, cfg.conv_norm_type, conv_context, bias)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = ConformerFeedForward(d, d_ff, cfg.dropout, bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x, att_bias, pos_emb, pad_mask):
        x = x + 0.5 * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        x = x + self.dropout(self.self_attn(self.norm_self_att(x), att_bias, pos_emb, pad_mask))
        x = x + self.dropout(self.conv(self.norm_conv(x), pad_mask))
        x = x + 0.5 * self.dropout(self.feed_forward2(self.norm_feed_forward2(x)))
        return self.norm_out(x)


def conv_context(cfg: ConformerConfig) -> tuple[int, int]:
    """Depthwise-conv padding (left, right) from conv_context_size (NeMo semantics)."""
    k = cfg.conv_kernel_size
    ctx = cfg.conv_context_size
    if ctx is None or ctx == "regular":
        return ((k - 1) // 2, (k - 1) // 2)
    if ctx == "causal":
        return (k - 1, 0)
    left, right = int(ctx[0]), int(ctx[1])
    if left + right + 1 != k:
        raise ValueError(
            f"conv_context_size {list(ctx)} must satisfy left + right + 1 == conv_kernel_size ({k}); "
            f"e.g. [{k - 1}, 0] (causal) or [{(k - 1) // 2}, {(k - 1) // 2}]"
        )
    return (left, right)


def attention_context_mask(cfg: ConformerConfig, T: int, device: torch.device) -> torch.Tensor | None:
    """(T, T) bool, True where query i may attend key j under att_context_size/style; None = unlimited."""
    left, right = (int(v) for v in cfg.context_size)
    if left < 0 and right < 0:
        return None
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]  # query minus key
    allowed = torch.ones(T, T, dtype=torch.bool, device=device)
    if cfg.att_context_style == "chunked_limited" and right >= 0:
        chunk = right + 1
        left_chunks = left // chunk if left >= 0 else 10000
        chunk_diff = torch.div(i, chunk, rounding_mode="floor")
        chunk_diff = chunk_diff[:, None] - chunk_diff[None, :]
        return (chunk_diff >= 0) & (chunk_diff <= left_chunks)
    if left >= 0:
        allowed &= diff <= left
    if right >= 0:
        allowed &= -diff <= right
    return allowed


# ----------------------------------------------------------------------------------------------
# FastConformer encoder (also the Conformer modality adapter, with subsampling_factor 1)
# ----------------------------------------------------------------------------------------------


class ConformerEncoder(nn.Module):
    """NeMo ConformerEncoder: pre_encode (conv subsampling, or a Linear when the factor is 1) -> pos_enc ->
    Conformer layers -> optional out_proj. Takes and returns time-major (B, T, C) tensors plus lengths.

    The output keeps the whole subsampled tensor, padded frames included (NeMo's), so its length is NeMo's.
    """

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        if cfg.self_attention_model == "rel_pos_local_attn" and max(cfg.context_size) <= 0:
            raise ValueError("self_attention_model rel_pos_local_attn needs att_context_size set, e.g. [64, 64]")
        self.cfg = cfg
        self.subsampling_factor = cfg.subsampling_factor
        channels = cfg.d_model if cfg.subsampling_conv_channels == -1 else cfg.subsampling_conv_channels
        if cfg.subsampling_factor > 1:
            self.pre_encode: nn.Module = ConvSubsampling(
                cfg.subsampling, cfg.subsampling_factor, cfg.feat_in, cfg.d_model, channels, cfg.causal_downsampling
            )
        else:
            self.pre_encode = nn.Linear(cfg.feat_in, cfg.d_model)
        self.pos_enc = RelPositionalEncoding(
            cfg.d_model,
            cfg.dropout_pre_encoder,
            cfg.dropout_emb,
            xscale=math.sqrt(cfg.d_model) if cfg.xscaling else None,
            relative=cfg.self_attention_model != "abs_pos",
        )
        shared_u = shared_v = None
        if not cfg.untie_biases and cfg.self_attention_model != "abs_pos":
            d_head = cfg.d_model // cfg.n_heads
            shared_u = nn.Parameter(torch.zeros(cfg.n_heads, d_head))
            shared_v = nn.Parameter(torch.zeros(cfg.n_heads, d_head))
        ctx = conv_context(cfg)
        self.layers = nn.ModuleList(
            [ConformerLayer(cfg, ctx, cfg.use_bias, shared_u, shared_v) for _ in range(cfg.n_layers)]
        )
        self.out_proj = (
            nn.Linear(cfg.d_model, cfg.feat_out) if cfg.feat_out > 0 and cfg.feat_out != cfg.d_model else None
        )
        self.output_dim = self.out_proj.out_features if self.out_proj is not None else cfg.d_model

    def output_lengths(self, lens: torch.Tensor) -> torch.Tensor:
        """Frames out for `lens` frames in (the subsampling formula, NeMo calc_length)."""
        if isinstance(self.pre_encode, ConvSubsampling):
            p = self.pre_encode
            return _conv_out_length(lens, p.all_paddings, p.kernel, p.stride, p.num_stages)
        return lens

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, feat_in), (B,) -> (B, T', output_dim), (B,)."""
        if isinstance(self.pre_encode, ConvSubsampling):
            x, lens = self.pre_encode(x, lens)  # (B, T', D)
        else:
            x = self.pre_encode(x)  # (B, T, D)
        x, pos_emb = self.pos_enc(x)
        B, T, _ = x.shape
        pad_mask = torch.arange(T, device=x.device)[None, :] >= lens[:, None]  # (B, T), True = padding
        allowed = ~(pad_mask[:, None, :] | pad_mask[:, :, None])  # (B, T, T): both frames valid
        context = attention_context_mask(self.cfg, T, x.device)
        if context is not None:
            allowed = allowed & context
        # Additive bias (B, 1, T, T): 0 where allowed, -10000 elsewhere (finite, as NeMo, so fully padded rows
        # give a harmless uniform softmax instead of NaNs).
        att_bias = torch.zeros(B, 1, T, T, dtype=x.dtype, device=x.device).masked_fill_(~allowed[:, None], MASK_FILL)
        for layer in self.layers:
            x = layer(x, att_bias, pos_emb, pad_mask)
        if self.out_proj is not None:
            x = self.out_proj(x)
        return x, lens


# ----------------------------------------------------------------------------------------------
# The perception module
# ----------------------------------------------------------------------------------------------


def _warn_about_dropped_options(cfg: PerceptionConfig) -> None:
    for name, enc in (("encoder", cfg.encoder), ("modality_adapter", cfg.modality_adapter)):
        if enc is None:
            continue
        if enc.stochastic_depth_drop_prob:
            logger.warning("perception.%s.stochastic_depth_drop_prob is not implemented; training without it", name)
        if enc.att_context_size and isinstance(enc.att_context_size[0], list) and len(enc.att_context_size) > 1:
            logger.warning(
                "perception.%s.att_context_size %s: multi-lookahead training is not implemented; using %s",
                name,
                enc.att_context_size,
                enc.context_size,
            )


class AudioPerceptionModule(nn.Module):
    """Waveforms -> LLM-width embeddings: preprocessor -> (SpecAugment) -> encoder -> adapter -> proj.

    Parameter and buffer names follow NeMo (`preprocessor.featurizer.*`, `encoder.*`, `modality_adapter.*`,
    `proj.*`), so NeMo checkpoints load by name and freeze patterns written for NeMo mean the same here.
    """

    def __init__(self, cfg: PerceptionConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.preprocessor.features != cfg.encoder.feat_in:
            raise ValueError(
                f"perception.preprocessor.features ({cfg.preprocessor.features}) must equal "
                f"perception.encoder.feat_in ({cfg.encoder.feat_in})"
            )
        if problems := perception_option_problems(cfg):
            raise ValueError("; ".join(problems))
        _warn_about_dropped_options(cfg)
        self.preprocessor = AudioToMelSpectrogramPreprocessor(cfg.preprocessor)
        self.spec_augmentation = SpecAugment(cfg.spec_augment) if cfg.spec_augment is not None else None
        self.encoder = ConformerEncoder(cfg.encoder)
        width = self.encoder.output_dim
        self.modality_adapter: ConformerEncoder | None = None
        if cfg.modality_adapter is not None:
            if cfg.modality_adapter.feat_in != width:
                raise ValueError(
                    f"perception.modality_adapter.feat_in ({cfg.modality_adapter.feat_in}) must equal the "
                    f"encoder output width ({width} = encoder.feat_out if > 0 else encoder.d_model)"
                )
            self.modality_adapter = ConformerEncoder(cfg.modality_adapter)
            width = self.modality_adapter.output_dim
        self.proj = nn.Linear(width, output_dim)
        factor = cfg.encoder.subsampling_factor
        if cfg.modality_adapter is not None:
            factor *= max(cfg.modality_adapter.subsampling_factor, 1)
        self.token_equivalent_duration = self.preprocessor.hop_length * factor / cfg.preprocessor.sample_rate

    def output_lengths(self, audio_lens: torch.Tensor) -> torch.Tensor:
        """Embedding frames for `audio_lens` samples, from the feature and subsampling formulas."""
        lens = self.encoder.output_lengths(self.preprocessor.output_lengths(audio_lens))
        if self.modality_adapter is not None:
            lens = self.modality_adapter.output_lengths(lens)
        return lens

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T_samples) float, (B,) int -> embeds (B, T', output_dim), embed_lens (B,) int64.

        T' is NeMo's: the subsampled length of every STFT frame (plus `pad_to` padding), which can exceed the
        longest embed_len by a frame. Frames past a row's embed_len are padding (SALM skips them; duplex models
        run over them, as NeMo).
        """
        audio_lens = audio_lens.to(device=audio.device, dtype=torch.long)
        feats, lens = self.preprocessor(audio, audio_lens)  # (B, T, F) float32
        feats = feats.to(self.proj.weight.dtype)
        if self.spec_augmentation is not None:
            feats = self.spec_augmentation(feats, lens)
        x, lens = self.encoder(feats, lens)  # (B, T', D_enc)
        if self.modality_adapter is not None:
            x, lens = self.modality_adapter(x, lens)
        return self.proj(x), lens.long()


def chunk_spans(lens: list[int], chunk: int, min_tail: int) -> list[list[tuple[int, int]]]:
    """[(start, end) sample spans] per audio: `chunk` samples each; a last span shorter than `min_tail` joins the
    one before it (it would give less than one encoder frame)."""
    spans = []
    for length in lens:
        row = [(start, min(start + chunk, length)) for start in range(0, max(length, 1), chunk)]
        if len(row) > 1 and row[-1][1] - row[-1][0] < min_tail:
            row[-2:] = [(row[-2][0], row[-1][1])]
        spans.append(row)
    return spans


def encode_in_chunks(
    perception: AudioPerceptionModule, audio: torch.Tensor, audio_lens: torch.Tensor, chunk_seconds: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo's `encoder_chunk_size_seconds`: cut each audio into chunks of at most `chunk_seconds`, encode all
    chunks as one batch, and join each audio's frames again. Attention then spans a chunk, so the encoder's
    (B, T, T) attention tensors shrink from T^2 to about T x chunk frames (the memory of long audio).

    (N_audio, T_samples), (N_audio,) -> the valid frames of every audio back to back (sum T_k, H) and T_k (N_audio,).
    """
    rate = perception.cfg.preprocessor.sample_rate
    chunk = max(1, round(chunk_seconds * rate))
    min_tail = max(1, round(perception.token_equivalent_duration * rate))  # samples of one output frame
    spans = chunk_spans(audio_lens.tolist(), chunk, min_tail)
    pieces = [audio[i, start:end] for i, row in enumerate(spans) for start, end in row]
    width = max(piece.numel() for piece in pieces)
    chunks = torch.stack([F.pad(piece, (0, width - piece.numel())) for piece in pieces])  # (N_chunks, width)
    chunk_lens = torch.tensor([end - start for row in spans for start, end in row], device=audio.device)
    embs, emb_lens = perception(chunks, chunk_lens)  # (N_chunks, T', H), (N_chunks,)
    valid = torch.arange(embs.size(1), device=embs.device)[None, :] < emb_lens[:, None]  # (N_chunks, T')
    owner = torch.tensor([i for i, row in enumerate(spans) for _ in row], device=embs.device)  # (N_chunks,)
    lens = torch.zeros(len(spans), dtype=torch.long, device=embs.device).index_add_(0, owner, emb_lens)
    return embs[valid], lens  # chunks are in audio order, so each audio's frames are contiguous and in time order


# ----------------------------------------------------------------------------------------------
# Pretrained encoders: a local .nemo archive, or a transformers Parakeet checkpoint (dir or hub id)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PretrainedASR:
    """What a pretrained ASR checkpoint contributes: its front end and encoder architecture and weights."""

    preprocessor: dict[str, Any]  # PreprocessorConfig keys (pre-emphasis included)
    encoder: dict[str, Any]  # ConformerConfig keys (use_bias included)
    state_dict: dict[str, torch.Tensor] | None  # keys relative to AudioPerceptionModule ("encoder.*", ...)


# NeMo's class defaults where they differ from this schema's (whose defaults are NeMo's speechlm2 config values).
# A config written by NeMo (a .nemo archive, a saved config.json) leaves out keys at its class defaults, so its
# missing keys must take these values, not the schema's.
NEMO_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "preprocessor": {"window_size": 0.02, "features": 64, "n_fft": None, "pad_to": 16},
    "encoder": {
        "subsampling": "striding",
        "subsampling_factor": 4,
        "subsampling_conv_channels": -1,
        "n_heads": 4,
        "conv_kernel_size": 31,
        "dropout_emb": 0.1,
        "dropout_att": 0.0,
    },
    "spec_augment": {"freq_masks": 0, "time_masks": 0, "freq_width": 10, "time_width": 10},
}


def with_nemo_class_defaults(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """`values` (a NeMo-written `preprocessor`, `encoder` or `spec_augment` config) with NeMo's class defaults
    for the keys it leaves out; null NeMo spellings made explicit (att_context_size: null = unlimited)."""
    out = {**NEMO_CLASS_DEFAULTS[section], **values}
    if section == "encoder" and out.get("att_context_size") is None:
        out["att_context_size"] = [-1, -1]
    if section == "preprocessor" and out.get("pad_to") == "max":
        out["pad_to"] = 0  # "max" pads to the longest possible input: padding only, same valid frames
    return out


def _overrides(user: Any, default: Any) -> dict[str, Any]:
    """Keys whose value the user changed from the schema default: these win over a checkpoint's config."""
    return {
        f.name: getattr(user, f.name)
        for f in dataclasses.fields(user)
        if getattr(user, f.name) != getattr(default, f.name)
    }


def _known(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        logger.warning("%s: ignoring keys with no counterpart in %s: %s", source, cls.__name__, unknown)
    return {k: v for k, v in values.items() if k in names}


def _plain(value: Any) -> Any:
    """YAML tuples/lists of lists as plain lists (att_context_size, conv_context_size)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


NEMO_CONFIG_FILE, NEMO_WEIGHTS_FILE = "model_config.yaml", "model_weights.ckpt"


def read_nemo_members(path: str | os.PathLike, names: Collection[str] | None = None) -> dict[str, bytes]:
    """Members of a NeMo `.nemo` archive (a tar, gzipped or not) by file name: all of them, or those in `names`."""
    with tarfile.open(path, "r:*") as tar:
        return {
            Path(m.name).name: tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile() and (names is None or Path(m.name).name in names)
        }


def nemo_asr_architecture(cfg: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PreprocessorConfig keys, ConformerConfig keys) of a NeMo ASR model_config.yaml: NeMo's class defaults for
    the keys it leaves out, keys with no counterpart here dropped with a warning."""
    if "encoder" not in cfg or "preprocessor" not in cfg:
        raise ValueError(f"{source}: model_config.yaml has no encoder/preprocessor section (keys: {sorted(cfg)})")
    encoder = with_nemo_class_defaults("encoder", {k: _plain(v) for k, v in cfg["encoder"].items()})
    preprocessor = with_nemo_class_defaults("preprocessor", dict(cfg["preprocessor"]))
    return (
        _known(PreprocessorConfig, preprocessor, f"{source} preprocessor"),
        _known(ConformerConfig, encoder, f"{source} encoder"),
    )


def load_nemo_asr(path: str | os.PathLike, with_weights: bool = True) -> PretrainedASR:
    """Read a NeMo `.nemo` archive (a tar of model_config.yaml + model_weights.ckpt) without NeMo."""
    import yaml

    source = str(path)
    wanted = {NEMO_CONFIG_FILE, NEMO_WEIGHTS_FILE} if with_weights else {NEMO_CONFIG_FILE}
    members = read_nemo_members(path, wanted)
    if NEMO_CONFIG_FILE not in members:
        raise ValueError(f"{source} has no model_config.yaml; is it a .nemo archive?")
    preprocessor, encoder = nemo_asr_architecture(yaml.safe_load(members[NEMO_CONFIG_FILE].decode()), source)
    state = None
    if with_weights:
        if NEMO_WEIGHTS_FILE not in members:
            raise ValueError(f"{source} has no model_weights.ckpt")
        raw = torch.load(io.BytesIO(members[NEMO_WEIGHTS_FILE]), map_location="cpu", weights_only=True)
        raw = raw.get("state_dict", raw)
        state = {k: v for k, v in raw.items() if k.startswith(("encoder.", "preprocessor.featurizer."))}
    return PretrainedASR(preprocessor, encoder, state)


# transformers ParakeetEncoder name -> NeMo/our name (after the "encoder." prefix)
_PARAKEET_RENAMES = (
    ("subsampling.layers.", "pre_encode.conv."),
    ("subsampling.linear.", "pre_encode.out."),
    (".self_attn.q_proj.", ".self_attn.linear_q."),
    (".self_attn.k_proj.", ".self_attn.linear_k."),
    (".self_attn.v_proj.", ".self_attn.linear_v."),
    (".self_attn.o_proj.", ".self_attn.linear_out."),
    (".self_attn.relative_k_proj.", ".self_attn.linear_pos."),
    (".self_attn.bias_u", ".self_attn.pos_bias_u"),
    (".self_attn.bias_v", ".self_attn.pos_bias_v"),
    (".conv.norm.", ".conv.batch_norm."),
)


def parakeet_to_nemo_name(name: str) -> str:
    for old, new in _PARAKEET_RENAMES:
        name = name.replace(old, new)
    return name


def load_transformers_asr(name_or_path: str, with_weights: bool = True) -> PretrainedASR:
    """Read a transformers Parakeet checkpoint (encoder, CTC, RNNT or TDT) from a local dir or the hub."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    source = str(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    enc_cfg = getattr(config, "encoder_config", config)
    if getattr(enc_cfg, "model_type", None) != "parakeet_encoder":
        raise ValueError(
            f"pretrained_asr {source!r} is a {config.model_type!r} checkpoint; expected a transformers Parakeet "
            "(FastConformer) checkpoint or a local .nemo file"
        )
    if (
        enc_cfg.hidden_act != "silu"
        or enc_cfg.subsampling_conv_kernel_size != 3
        or enc_cfg.subsampling_conv_stride != 2
    ):
        raise ValueError(f"{source}: only silu activations and 3x3 stride-2 subsampling convs are supported")
    if enc_cfg.intermediate_size % enc_cfg.hidden_size:
        raise ValueError(f"{source}: intermediate_size must be a multiple of hidden_size")
    if enc_cfg.attention_bias != enc_cfg.convolution_bias:
        raise ValueError(f"{source}: attention_bias != convolution_bias is not supported")
    encoder = dict(
        feat_in=enc_cfg.num_mel_bins,
        n_layers=enc_cfg.num_hidden_layers,
        d_model=enc_cfg.hidden_size,
        n_heads=enc_cfg.num_attention_heads,
        ff_expansion_factor=enc_cfg.intermediate_size // enc_cfg.hidden_size,
        conv_kernel_size=enc_cfg.conv_kernel_size,
        subsampling="dw_striding",
        subsampling_factor=enc_cfg.subsampling_factor,
        subsampling_conv_channels=enc_cfg.subsampling_conv_channels,
        xscaling=bool(enc_cfg.scale_input),
        pos_emb_max_len=enc_cfg.max_position_embeddings,
        self_attention_model="rel_pos",
        att_context_size=[-1, -1],
        untie_biases=True,
        conv_norm_type="batch_norm",
        conv_context_size=None,
        dropout=float(enc_cfg.dropout),
        dropout_att=float(enc_cfg.attention_dropout),
        use_bias=bool(enc_cfg.attention_bias),
    )
    preprocessor: dict[str, Any] = {"features": enc_cfg.num_mel_bins, "normalize": "per_feature", "dither": 0.0}
    try:
        fe = AutoFeatureExtractor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        fe = None  # an encoder-only checkpoint without a preprocessor_config.json
    if fe is not None:
        sr = fe.sampling_rate
        preprocessor.update(
            sample_rate=sr,
            features=fe.feature_size,
            window_size=fe.win_length / sr,
            window_stride=fe.hop_length / sr,
            n_fft=fe.n_fft,
            preemph=fe.preemphasis or None,
        )
    state = None
    if with_weights:
        model = AutoModel.from_pretrained(name_or_path)
        enc = getattr(model, "encoder", model)
        state = {"encoder." + parakeet_to_nemo_name(k): v for k, v in enc.state_dict().items()}
        del model
    return PretrainedASR(preprocessor, encoder, state)


def load_pretrained_asr(name_or_path: str, with_weights: bool = True) -> PretrainedASR:
    """A `.nemo` file, or else a transformers checkpoint (a local dir or a hub id)."""
    if str(name_or_path).endswith(".nemo"):
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"pretrained_asr {name_or_path!r}: no such .nemo file")
        return load_nemo_asr(name_or_path, with_weights)
    return load_transformers_asr(name_or_path, with_weights)


def build_perception(
    cfg: PerceptionConfig, output_dim: int, pretrained_asr: str | None = None, pretrained_weights: bool = True
) -> AudioPerceptionModule:
    """Build the perception module; with `pretrained_asr` and `pretrained_weights`, take the encoder and
    preprocessor architecture and the weights from the checkpoint (as NeMo, which reads `pretrained_asr` only
    when it loads pretrained weights: otherwise `cfg` is the whole architecture).

    Keys of `cfg.encoder` / `cfg.preprocessor` whose values differ from the schema defaults override the
    checkpoint's (so `encoder.att_context_size: [70, 1]` turns a full-context model into a streaming one).
    """
    if pretrained_asr is None or not pretrained_weights:
        return AudioPerceptionModule(cfg, output_dim)
    asr = load_pretrained_asr(pretrained_asr)
    encoder = ConformerConfig(**{**asr.encoder, **_overrides(cfg.encoder, ConformerConfig())})
    preprocessor = PreprocessorConfig(**{**asr.preprocessor, **_overrides(cfg.preprocessor, PreprocessorConfig())})
    if preprocessor.features != encoder.feat_in:
        preprocessor = dataclasses.replace(preprocessor, features=encoder.feat_in)
    merged = dataclasses.replace(cfg, encoder=encoder, preprocessor=preprocessor)
    module = AudioPerceptionModule(merged, output_dim)
    if asr.state_dict is not None:
        load_encoder_state(module, asr.state_dict, source=str(pretrained_asr))
    return module


def load_encoder_state(module: AudioPerceptionModule, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `encoder.*` / `preprocessor.featurizer.*` tensors into `module`; every encoder tensor must be present."""
    own = module.state_dict()
    expected = {k for k in own if k.startswith("encoder.")}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"pretrained_asr {source}: {len(missing)} encoder tensors missing, e.g. {missing[:5]}")
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(f"pretrained_asr {source}: shape mismatch: " + "; ".join(mismatched[:5]))
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        logger.warning(
            "pretrained_asr %s: ignoring %d unexpected tensors, e.g. %s", source, len(unexpected), unexpected[:5]
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
