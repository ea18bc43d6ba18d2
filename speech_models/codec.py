"""A frozen transformers audio codec (Mimi, EnCodec, DAC) whose frames line up with the model's frames.

Duplex models work on fixed frames of `data.frame_length` seconds (80 ms). A codec runs at its own frame rate
(Mimi 12.5 Hz, EnCodec 75 Hz, DAC 86 Hz, ...). The rule here: one model frame must hold a whole number
`g >= 1` of codec frames; those `g` codec frames, each with `n_q` quantizer codes, are stacked into one model
frame of `K = g * n_q` "codebooks" (codebook index `j * n_q + q` for codec frame `j` inside the model frame,
quantizer `q`). Mimi at 12.5 Hz gives `g = 1`; a 25 Hz codec gives `g = 2`; EnCodec 24 kHz (75 Hz) gives
`g = 6`; DAC 44.1 kHz (86.13 Hz) cannot be aligned and is refused with both rates in the message.

Audio given at another sample rate (e.g. agent audio at `data.target_sample_rate` = 22.05 kHz for a 24 kHz
Mimi) is resampled to the codec's own rate before encoding, and decoded audio is resampled back, with the
windowed-sinc resampler of `speech_models.audio` (no torchaudio needed).

The codec is frozen, kept in eval mode and in fp32 whatever dtype the surrounding model is cast to.
"""

from __future__ import annotations

import hashlib
import json
import math
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speech_models.audio import resample

SUPPORTED_CODECS = ("mimi", "encodec", "dac")


def _fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad or cut the last dim of `x` to `length`."""
    if x.shape[-1] >= length:
        return x[..., :length]
    return F.pad(x, (0, length - x.shape[-1]))


def _as_fraction(x: float | int) -> Fraction:
    return Fraction(x).limit_denominator(1_000_000)


def _drop_from_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_missing_from_self(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Loading a checkpoint without codec weights keeps the loaded codec (no missing-key errors)."""
    for mod_name, mod in module.named_modules(prefix=prefix.rstrip(".")):
        for name, tensor in [*mod._parameters.items(), *mod._buffers.items()]:
            if tensor is not None and name not in mod._non_persistent_buffers_set:
                state_dict.setdefault(f"{mod_name}.{name}" if mod_name else name, tensor.detach())


# ----------------------------------------------------------------------------------------------
# The codec wrapper
# ----------------------------------------------------------------------------------------------


# Config keys that say where a codec was loaded from or which library saved it, not what it computes.
_NOT_THE_CODEC = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


class AudioCodec(nn.Module):
    """Frozen fp32 codec encoding (B, T) waveforms into (B, n_frames, K) codes on the model's frame grid.

    `num_codebooks` (K) and `codebook_size` are what the duplex models size their embeddings and heads by.
    `keep_fp32` tells trainers to leave it out of precision casts and FSDP2 sharding.
    """

    keep_fp32 = True

    def __init__(self, model: nn.Module, frame_length: float, num_quantizers: int | None = None) -> None:
        super().__init__()
        config = model.config
        self.kind: str = config.model_type
        if self.kind not in SUPPORTED_CODECS:
            raise ValueError(
                f"audio codec model_type {self.kind!r} is not supported; use one of {list(SUPPORTED_CODECS)} "
                "(transformers MimiModel, EncodecModel or DacModel)"
            )
        self.model = model
        self.sampling_rate: int = int(config.sampling_rate)
        self.codebook_size: int = int(config.codebook_size)
        self.frame_length = float(frame_length)

        if self.kind == "mimi":
            self.frame_rate = _as_fraction(config.frame_rate)
            max_quantizers = int(config.num_quantizers)
        elif self.kind == "encodec":
            if config.normalize or config.chunk_length_s is not None:
                raise ValueError(
                    "EnCodec models with normalize=True or chunk_length_s set (e.g. encodec_48khz) need per-chunk "
                    "scales to decode and are not supported; use a 24 kHz EnCodec, Mimi or DAC"
                )
            self.frame_rate = Fraction(self.sampling_rate, math.prod(config.upsampling_ratios))
            max_quantizers = int(config.num_quantizers)
        else:  # dac
            self.frame_rate = Fraction(self.sampling_rate, math.prod(config.downsampling_ratios))
            max_quantizers = int(config.n_codebooks)
        self.num_quantizers: int = max_quantizers if num_quantizers is None else int(num_quantizers)
        if not 1 <= self.num_quantizers <= max_quantizers:
            raise ValueError(f"num_quantizers={num_quantizers} is outside 1..{max_quantizers} for this {self.kind}")
        self._encodec_bandwidth: float | None = None
        if self.kind == "encodec":
            by_nq = {
                int(1000 * bw // (config.frame_rate * config.codebook_nbits)): bw for bw in config.target_bandwidths
            }
            if self.num_quantizers not in by_nq:
                raise ValueError(
                    f"this EnCodec offers {sorted(by_nq)} quantizers (target_bandwidths "
                    f"{config.target_bandwidths}); num_quantizers={self.num_quantizers} is not one of them"
                )
            self._encodec_bandwidth = by_nq[self.num_quantizers]

        # Align codec frames with model frames: a whole number (>= 1) of codec frames per model frame.
        frame_fraction = _as_fraction(frame_length)
        group = frame_fraction * self.frame_rate
        if group.denominator != 1 or group < 1:
            raise ValueError(
                f"audio codec frame rate {float(self.frame_rate):g} Hz ({self.kind}, {self.sampling_rate} Hz audio) "
                f"cannot be aligned with the model's frame rate {float(1 / frame_fraction):g} Hz "
                f"(data.frame_length={frame_length} s): one model frame would hold {float(group):g} codec frames, "
                f"but it must hold a whole number >= 1. Use a codec whose frame rate is a multiple of "
                f"{float(1 / frame_fraction):g} Hz (e.g. Mimi at 12.5 Hz for 80 ms frames) or change data.frame_length."
            )
        self.codec_frames_per_frame: int = int(group)
        self.num_codebooks: int = self.codec_frames_per_frame * self.num_quantizers
        samples = frame_fraction * self.sampling_rate
        assert samples.denominator == 1, "whole codec frames per model frame imply whole samples"
        self.samples_per_frame: int = int(samples)  # at the codec's sampling rate

        self.model.float().eval().requires_grad_(False)
        self._silence: dict[torch.device, torch.Tensor] = {}
        self._fingerprint: str | None = None
        # Checkpoints leave the codec out: its weights always come from model.pretrained_audio_codec.
        self.register_state_dict_post_hook(_drop_from_state_dict)
        self.register_load_state_dict_pre_hook(_fill_missing_from_self)

    @classmethod
    def from_pretrained(cls, name_or_path: str, frame_length: float, num_quantizers: int | None = None) -> AudioCodec:
        """Load a Mimi / EnCodec / DAC model from a hub id or a local `save_pretrained` directory."""
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except Exception as e:  # re-raised naming the config key
            raise ValueError(
                f"model.pretrained_audio_codec={name_or_path!r} could not be loaded ({type(e).__name__}: {e}); "
                "give a local directory or a hub id holding a transformers Mimi, EnCodec or DAC model"
            ) from e
        if config.model_type not in SUPPORTED_CODECS:
            raise ValueError(
                f"model.pretrained_audio_codec={name_or_path!r} is a {config.model_type!r} model; "
                f"supported codecs are {list(SUPPORTED_CODECS)}"
            )
        model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32)
        return cls(model, frame_length=frame_length, num_quantizers=num_quantizers)

    # -- frozen, eval, fp32 whatever the parent does ------------------------------------------

    def train(self, mode: bool = True) -> AudioCodec:
        """Stay in eval mode: the codec is never trained (dropout/batch-norm statistics stay fixed)."""
        return super().train(False)

    def _apply(self, fn: Any, recurse: bool = True) -> AudioCodec:
        """Follow device moves but undo dtype casts: the codec always runs in fp32."""
        super()._apply(fn, recurse)
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        self._silence.clear()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """sha256 of what decides the codes on the model's frame grid: the codec's weights and config, the model
        frame length and the quantizers used. Codes cached with the data (`speechlm data add-codes`) carry it, so a
        model never trains on codes that another codec made."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(f"{self.kind}|{self.frame_length!r}|{self.num_quantizers}|".encode())
            config = {k: v for k, v in self.model.config.to_dict().items() if k not in _NOT_THE_CODEC}
            digest.update(json.dumps(config, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # -- encode / decode ------------------------------------------------------------------------

    def n_frames_for(self, num_samples: int, sample_rate: int) -> int:
        """Model frames that `num_samples` at `sample_rate` span (a partial last frame counts)."""
        return math.ceil(num_samples / (self.frame_length * sample_rate) - 1e-6)

    def _encode_codec(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) at codec rate -> (B, n_q, T_codec) codes."""
        x = x[:, None]  # (B, 1, L)
        if self.kind == "mimi":
            return self.model.encode(x, num_quantizers=self.num_quantizers).audio_codes
        if self.kind == "encodec":
            return self.model.encode(x, bandwidth=self._encodec_bandwidth).audio_codes[0]  # (chunks=1, B, ...)
        return self.model.encode(x, n_quantizers=self.num_quantizers).audio_codes[:, : self.num_quantizers]

    def _decode_codec(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n_q, T_codec) codes -> (B, L) waveform at codec rate."""
        if self.kind == "mimi":
            return self.model.decode(codes).audio_values[:, 0]
        if self.kind == "encodec":
            return self.model.decode(codes[None], [None]).audio_values[:, 0]
        return self.model.decode(audio_codes=codes).audio_values

    @torch.no_grad()
    def encode(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        sample_rate: int,
        n_frames: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode (B, T) audio at `sample_rate` into codes (B, n_frames, K) and valid frame counts (B,).

        Audio is resampled to the codec's rate and zero-padded (or cut) to exactly `n_frames` model frames
        (default: enough frames for the longest example), so the result is on the model's frame grid.
        """
        device = self.device
        with torch.autocast(device.type, enabled=False):
            x = resample(audio.to(device).float(), sample_rate, self.sampling_rate)  # (B, L_codec)
            lens = torch.ceil(audio_lens.to(device).double() * self.sampling_rate / sample_rate).long()
            if n_frames is None:
                n_frames = self.n_frames_for(int(audio_lens.max()), sample_rate)
            x = _fit_length(x, n_frames * self.samples_per_frame)
            x = x * (torch.arange(x.shape[1], device=device)[None] < lens[:, None])  # silence past each length
            codes = self._encode_codec(x)  # (B, n_q, T_codec)
            g, nq = self.codec_frames_per_frame, self.num_quantizers
            expected = n_frames * g
            if abs(codes.shape[-1] - expected) > g:
                raise RuntimeError(
                    f"{self.kind} produced {codes.shape[-1]} codec frames for {n_frames} model frames "
                    f"(expected {expected}); its frame rate is not the {float(self.frame_rate):g} Hz derived "
                    "from its config"
                )
            if codes.shape[-1] < expected:  # repeat the last codec frame
                codes = torch.cat([codes, codes[..., -1:].expand(-1, -1, expected - codes.shape[-1])], -1)
            codes = codes[..., :expected].reshape(codes.shape[0], nq, n_frames, g)  # (B, n_q, T, g)
            codes = codes.permute(0, 2, 3, 1).reshape(codes.shape[0], n_frames, g * nq)  # (B, T, K)
            frame_lens = torch.ceil(lens.double() / self.samples_per_frame - 1e-6).long().clamp(max=n_frames)
        return codes.long(), frame_lens

    @torch.no_grad()
    def decode(
        self, codes: torch.Tensor, frame_lens: torch.Tensor, sample_rate: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode (B, T, K) codes into (B, round(T * frame_length * sample_rate)) audio and sample counts (B,).

        Every id must be a real codec id (< codebook_size); callers replace control codes first.
        """
        B, T, _ = codes.shape
        g, nq = self.codec_frames_per_frame, self.num_quantizers
        with torch.autocast(self.device.type, enabled=False):
            c = codes.to(self.device).reshape(B, T, g, nq).permute(0, 3, 1, 2).reshape(B, nq, T * g)  # (B, n_q, T*g)
            wav = _fit_length(self._decode_codec(c).float(), T * self.samples_per_frame)  # (B, L_codec)
            wav = resample(wav, self.sampling_rate, sample_rate)
            out_len = round(T * self.frame_length * sample_rate)
            wav = _fit_length(wav, out_len)  # (B, L_out)
            lens = torch.round(frame_lens.to(self.device).double() * self.frame_length * sample_rate).long()
            wav = wav * (torch.arange(out_len, device=self.device)[None] < lens[:, None])
        return wav, lens

    def silence_codes(self) -> torch.Tensor:
        """Codes (K,) of one model frame of digital silence; stand-ins for control codes when decoding."""
        device = self.device
        if device not in self._silence:
            zeros = torch.zeros(1, self.samples_per_frame, device=device)
            codes, _ = self.encode(zeros, torch.tensor([self.samples_per_frame]), self.sampling_rate, n_frames=1)
            self._silence[device] = codes[0, 0]
        return self._silence[device]
