"""Per-frame channels of a duplex conversation and the `DuplexS2SCollator` that batches them.

Frame grid (shared with the models and `speech_models.codec`):
- A conversation of `n` source samples at `source_sample_rate` has `n_frames = ceil(n / (frame_length * sr))`
  frames; frame `i` covers `[i * frame_length, (i + 1) * frame_length)` seconds (a partial last frame counts).
- A time `t` maps to the nearest frame boundary, `frame_of(t) = floor(t / frame_length + 0.5)`.

Text channel (one token slot per frame, the agent's text; NeMo's layout):

    flow:          |---user---||-------agent--------||-user-|
    text channel:   PPPPPPPPPPP Bxxxxxxx PPPPPPPPPPP E PPPPPP

- BOS at `frame_of(turn.start)`, the turn's text tokens in the frames right after it, EOS at
  `frame_of(turn.end)` (at least one frame after BOS), PAD everywhere else (PAD is a real target: "say nothing
  new this frame"); frames past a conversation's length are padding and masked by `frame_lens`.
- Text longer than its turn: the tokens that do not fit before the EOS frame are dropped (counted and logged
  with the cut id), so EOS stays on the frame where the agent stops speaking, where the models also put the
  speech EOS code.
- A turn running past the end of the conversation gets no EOS; a turn starting at or past the end is skipped.
- Turns are written in start order; where turns collide (overlapping agent turns), the later one wins.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from speech_models.config import PromptDefaults

logger = logging.getLogger(__name__)

_TIMESTAMP = re.compile(r"<\|\d+\|>")
_SPACES = re.compile(r"\s+")


def strip_timestamps(text: str) -> str:
    """'<|0|> Hey <|3|> how <|5|>' -> 'Hey how' (NeMo duplex manifests may carry word timestamps)."""
    return _SPACES.sub(" ", _TIMESTAMP.sub("", text)).strip()


def frame_of(t: float, frame_length: float) -> int:
    """Index of the frame boundary nearest to time `t` seconds (halves round up)."""
    return math.floor(t / frame_length + 0.5 + 1e-9)


def num_frames(num_samples: int, sample_rate: int, frame_length: float) -> int:
    """Frames spanned by `num_samples` samples; a partial last frame counts."""
    return max(0, math.ceil(num_samples / (frame_length * sample_rate) - 1e-6))


def text_special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(bos, eos, pad) ids of the text channel. A tokenizer without a pad token uses its unk token as PAD."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    missing = [
        name for name, i in (("bos_token", bos), ("eos_token", eos), ("pad_token or unk_token", pad)) if i is None
    ]
    if missing:
        raise ValueError(
            f"duplex models need a tokenizer with {', '.join(missing)} (the text channel marks turns with "
            f"BOS/EOS and silence with PAD); tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has none. "
            "Add the token to the tokenizer of model.pretrained_llm (or model.tokenizer_path)."
        )
    if len({bos, eos, pad}) != 3:
        raise ValueError(f"text channel ids must differ; got bos={bos} eos={eos} pad={pad}")
    return int(bos), int(eos), int(pad)


def build_text_channel(
    turns: Sequence[tuple[float, float]],
    token_ids: Sequence[Sequence[int]],
    n_frames: int,
    frame_length: float,
    bos_id: int,
    eos_id: int,
    pad_id: int,
) -> tuple[np.ndarray, int]:
    """Lay out agent turns on the frame grid (see the module docstring for the exact rules).

    `turns[i] = (start, duration)` in seconds, `token_ids[i]` the text tokens of turn i (no BOS/EOS).
    Returns the int64 channel of length `n_frames` and the number of text tokens dropped for lack of frames.
    """
    if len(turns) != len(token_ids):
        raise ValueError(f"{len(turns)} turns but {len(token_ids)} token lists")
    channel = np.full(n_frames, pad_id, dtype=np.int64)
    dropped = 0
    for i in sorted(range(len(turns)), key=lambda j: turns[j][0]):
        start, duration = turns[i]
        ids = list(token_ids[i])
        bos_at = frame_of(start, frame_length)
        if bos_at >= n_frames:
            dropped += len(ids)
            continue
        eos_at = max(frame_of(start + duration, frame_length), bos_at + 1)
        text_end = min(eos_at, n_frames)  # text slots: bos_at + 1 .. text_end - 1
        fit = max(0, text_end - bos_at - 1)
        dropped += max(0, len(ids) - fit)
        channel[bos_at] = bos_id
        channel[bos_at + 1 : bos_at + 1 + min(fit, len(ids))] = ids[:fit]
        if eos_at < n_frames:
            channel[eos_at] = eos_id
    return channel, dropped


def text_channel_to_str(ids: Sequence[int], tokenizer: Any, bos_id: int, eos_id: int, pad_id: int) -> str:
    """Inverse of `build_text_channel` for text: one string per turn (split at BOS/EOS), joined by spaces."""
    turns: list[list[int]] = [[]]
    for i in ids:
        i = int(i)
        if i in (bos_id, eos_id):
            turns.append([])
        elif i != pad_id:
            turns[-1].append(i)
    texts = (tokenizer.decode(t, skip_special_tokens=True).strip() for t in turns if t)
    return " ".join(t for t in texts if t)


def _pad_stack(arrays: Sequence[np.ndarray], value: float | int, dtype: Any) -> np.ndarray:
    """(B, T_max, ...) from arrays of shape (T_i, ...), padded with `value` along the first axis."""
    tail = arrays[0].shape[1:] if len(arrays) else ()
    out = np.full((len(arrays), max((len(a) for a in arrays), default=0), *tail), value, dtype=dtype)
    for row, a in zip(out, arrays, strict=True):
        row[: len(a)] = a
    return out


def _cached_codes_in(examples: Sequence[dict[str, Any]]) -> bool:
    """Whether the batch's agent channel comes as cached codes (every example) or as audio (every example)."""
    with_codes = ["target_codes" in ex for ex in examples]
    if any(with_codes) and not all(with_codes):
        plain = next(ex["id"] for ex, has in zip(examples, with_codes, strict=True) if not has)
        cached = next(ex["id"] for ex, has in zip(examples, with_codes, strict=True) if has)
        raise ValueError(
            f"cut {cached} comes with cached target_codes but cut {plain} with target_audio only, in one batch: "
            "cache codes for every S2S input of the dataset (`speechlm data add-codes DIR --codec CODEC`) or for none"
        )
    return bool(examples) and all(with_codes)


class DuplexS2SCollator:
    """Picklable batch builder for DuplexS2SModel / DuplexS2SSpeechDecoderModel, run inside Ray Data tasks.

    Input examples: {"id", "duration", "audio" (float32 user channel at data.source_sample_rate),
    "target_audio" (float32 agent channel at data.target_sample_rate), "supervisions": [{"speaker", "start",
    "duration", "text"}], "text"}. Output keys: `source_audio` (B, T) float32, `source_audio_lens` (B,),
    `target_audio` (B, T2) float32, `target_audio_lens` (B,), `target_tokens` (B, n_frames) int64 text channel,
    `frame_lens` (B,) int64, `references` (agent texts, turns joined by a space) and `cut_ids`. Examples with codes
    cached by `speechlm data add-codes` ("target_codes" (frames, K), "target_codes_fingerprint") give
    `target_codes` (B, frames, K) int64 and `target_codes_fingerprints` in place of the two target_audio keys.
    The tokenizer is loaded from `model_cfg.tokenizer_source` on first use, so the collator pickles small.
    """

    def __init__(self, model_cfg: Any, data_cfg: Any, dataset_cfg: Any = None) -> None:
        self.tokenizer_source: str = model_cfg.tokenizer_source
        self.frame_length: float = float(data_cfg.frame_length)
        self.source_sample_rate: int = int(data_cfg.source_sample_rate)
        self.target_sample_rate: int = int(data_cfg.target_sample_rate)
        self.input_roles: frozenset[str] = frozenset(data_cfg.input_roles)
        self.output_roles: frozenset[str] = frozenset(data_cfg.output_roles)
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def prompt_defaults(self) -> PromptDefaults:
        """Duplex models take no text prompt: they listen."""
        return PromptDefaults()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source)
        return self._tokenizer

    def _agent_turns(self, example: dict[str, Any]) -> list[dict[str, Any]]:
        sups = example.get("supervisions", [])
        unknown = {s["speaker"] for s in sups} - self.input_roles - self.output_roles
        if unknown:
            logger.warning(
                "cut %s: speakers %s are in neither data.input_roles %s nor data.output_roles %s; ignored",
                example["id"],
                sorted(unknown),
                sorted(self.input_roles),
                sorted(self.output_roles),
            )
        return sorted((s for s in sups if s["speaker"] in self.output_roles), key=lambda s: s["start"])

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.tokenizer
        bos, eos, pad = text_special_ids(tok)
        with_codes = _cached_codes_in(examples)
        sources, targets, channels, references, cut_ids = [], [], [], [], []
        for ex in examples:
            src = np.asarray(ex["audio"], dtype=np.float32).reshape(-1)
            n = num_frames(len(src), self.source_sample_rate, self.frame_length)
            if with_codes:
                tgt = np.asarray(ex["target_codes"], dtype=np.int64)  # (frames, K) on the model's frame grid
                n_tgt = len(tgt)
            else:
                tgt = np.asarray(ex["target_audio"], dtype=np.float32).reshape(-1)
                n_tgt = num_frames(len(tgt), self.target_sample_rate, self.frame_length)
            if abs(n - n_tgt) > 1:
                logger.warning(
                    "cut %s: user audio spans %d frames but agent audio %d (at %d / %d Hz); the model cuts or "
                    "pads the agent channel to the user's %d frames",
                    ex["id"],
                    n,
                    n_tgt,
                    self.source_sample_rate,
                    self.target_sample_rate,
                    n,
                )
            turns = self._agent_turns(ex)
            texts = [strip_timestamps(s["text"]) for s in turns]
            ids = [tok(t, add_special_tokens=False)["input_ids"] if t else [] for t in texts]
            channel, dropped = build_text_channel(
                [(float(s["start"]), float(s["duration"])) for s in turns], ids, n, self.frame_length, bos, eos, pad
            )
            if dropped:
                logger.warning(
                    "cut %s: %d agent text tokens did not fit in their turns' frames (%.3f s each) and were dropped",
                    ex["id"],
                    dropped,
                    self.frame_length,
                )
            sources.append(src)
            targets.append(tgt)
            channels.append(channel)
            references.append(" ".join(t for t in texts if t))
            cut_ids.append(str(ex["id"]))
        batch = {
            "source_audio": _pad_stack(sources, 0.0, np.float32),
            "source_audio_lens": np.array([len(a) for a in sources], dtype=np.int64),
            "target_tokens": _pad_stack(channels, pad, np.int64),
            "frame_lens": np.array([len(c) for c in channels], dtype=np.int64),
            "references": references,
            "cut_ids": cut_ids,
        }
        if with_codes:  # frames past a cut's own are masked out of the loss, so their value does not matter
            batch["target_codes"] = _pad_stack(targets, 0, np.int64)
            batch["target_codes_fingerprints"] = [ex.get("target_codes_fingerprint") for ex in examples]
        else:
            batch["target_audio"] = _pad_stack(targets, 0.0, np.float32)
            batch["target_audio_lens"] = np.array([len(a) for a in targets], dtype=np.int64)
        return batch
