"""Records (orchestrator.data.records) -> the example dicts a model's collator receives, with their audio decoded;
and the same dicts without audio, from which a collator counts an example's tokens (speech_models.registry).

A plain cut::

    {"id", "duration", "audio": float32 array, "text", "supervisions", "tags", "custom"[, "target_audio"]}

S2S cuts with codes cached by `speechlm data add-codes` carry "target_codes" ((T, K) int64) and
"target_codes_fingerprint" (the codec that made them) in place of "target_audio".

A conversation (or a text-only example, which has no audio turns)::

    {"id", "duration", "turns": [{"role", "text"} | {"role", "audio": index into audios}], "audios": [arrays],
     "text": the last assistant answer, "supervisions": [], "tags", "custom"}

Without audio (`measure_example`), "audio" / "audios" are replaced by "audio_durations" (seconds per audio, in
turn order): everything a token count needs comes from the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.data.audio import decode_audio
from orchestrator.data.codes import CODES_FIELD, codes_fingerprint, decode_codes
from orchestrator.data.records import SharCut

if TYPE_CHECKING:
    from orchestrator.data.bucketing import Lengths
    from orchestrator.data.plan import InputPlan, LengthRule


def _span_duration(record: SharCut, key: str) -> float:
    _, duration = record.spans.get(key, (0.0, None))
    if duration is not None:
        return float(duration)
    return float(record.duration) if key == "recording" or not record.is_conversation else 0.0


def _base(record: SharCut, inp: InputPlan) -> dict[str, Any]:
    return {
        "id": record.id,
        "duration": record.duration,
        "text": record.text,
        "supervisions": record.supervisions,
        "tags": dict(inp.tags),
        "custom": record.custom,
    }


def _turns(record: SharCut) -> list[dict[str, Any]]:
    keys = record.audio_keys
    return [
        {"role": t.role, "audio": keys.index(t.audio)} if t.audio is not None else {"role": t.role, "text": t.text}
        for t in record.turns
    ]


def measure_example(record: SharCut, inp: InputPlan) -> dict[str, Any]:
    """The example without its audio: what a collator's `token_lengths` reads."""
    example = _base(record, inp)
    if record.is_conversation:
        example["turns"] = _turns(record)
        example["audio_durations"] = [_span_duration(record, k) for k in record.audio_keys]
    else:
        example["audio_durations"] = [_span_duration(record, "recording")]
    if record.encoded is not None:
        example["encoded"] = record.encoded
    return example


def measure_lengths(record: SharCut, inp: InputPlan, rule: LengthRule, collate: Any) -> Lengths:
    """An example's token lengths (audio in frames of rule.token_equivalent_duration), counted by the collator;
    its tokenisation is kept on the record so that collating it later does not tokenise it again."""
    from orchestrator.data.bucketing import Lengths

    example = measure_example(record, inp)
    (inputs, outputs, text), encoded = collate.token_lengths(example, rule.token_equivalent_duration)
    record.encoded = encoded
    return Lengths(int(inputs), int(outputs), int(text))


def _encoded_audio(record: SharCut, key: str, storage_options: Mapping[str, Mapping[str, Any]] | None):
    """(data, manifest) of one of the record's audios: read with the shard, or from its file now."""
    from orchestrator.storage import filesystems

    if key in record.audio:
        entry = record.audio[key]
        if entry.data is None:
            raise ValueError(f"the {key} entry of its tar holds no data")
        return entry.data, entry.manifest
    if key in record.files:
        return filesystems.read_bytes(record.files[key], storage_options), None
    raise ValueError(f"it has no {key} audio in its shard")


def _decode(
    record: SharCut, key: str, sample_rate: int, storage_options: Mapping[str, Mapping[str, Any]] | None
) -> np.ndarray:
    data, manifest = _encoded_audio(record, key, storage_options)
    offset, duration = record.spans.get(key, (0.0, None))
    return decode_audio(data, manifest, sample_rate, offset=offset, duration=duration)


def to_example(
    record: SharCut, inp: InputPlan, storage_options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The example dict a collator receives, its audio decoded and resampled (see the module docstring)."""
    if record.unreadable:
        raise ValueError(record.unreadable)
    example = _base(record, inp)
    if record.encoded is not None:
        example["encoded"] = record.encoded
    if record.is_conversation:
        example["turns"] = _turns(record)
        example["audios"] = [_decode(record, k, inp.sample_rate, storage_options) for k in record.audio_keys]
        return example
    if "recording" not in record.audio and "recording" not in record.files:
        raise ValueError("the cut has no recording data in its shard")
    example["audio"] = _decode(record, "recording", inp.sample_rate, storage_options)
    if inp.target_sample_rate is None:
        return example
    if CODES_FIELD in record.arrays:  # cached codes stand in for the agent audio: no decoding, no encoding
        entry = record.arrays[CODES_FIELD]
        example[CODES_FIELD] = decode_codes(entry.data)
        example["target_codes_fingerprint"] = codes_fingerprint(entry.manifest)
    elif "target_audio" in record.audio or "target_audio" in record.files:
        example["target_audio"] = _decode(record, "target_audio", inp.target_sample_rate, storage_options)
    return example
