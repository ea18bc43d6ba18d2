"""Every model type in one table: what the orchestrator needs to know about a model comes from its entry.

Adding a model means one file in `speech_models/` (the model and its batch collator) plus one `ModelEntry`
in `MODELS` (or `register(entry)` at run time). The trainer, validation, `eval`, `infer`, `export`, sweeps and
config checks ask the entry; none of them branches on a model's name.

Imports are lazy: a Ray Data task that only collates batches never imports the model code, and the CLI starts
fast.

Every model class implements the same small interface:
- `Model(cfg: ModelConfig, data_cfg: AudioFrames | DataConfig | None = None)`; `model.tokenizer`; `model.cfg`.
- `model(batch) -> dict[str, Tensor]`: training forward; `"loss"` (scalar, mean per target token) plus
  detached components (e.g. `"text_loss"`, `"audio_loss"`) and `"num_target_tokens"`.
- `model.validation_step(batch) -> dict`: the counts its metrics' `ratio`s name (floats summed over the batch,
  e.g. `"loss_sum"`, `"num_tokens"`), `"hypotheses"` / `"references"` (lists of str) for its text metric, and
  for models that speak, `"generated_audio"` (one float32 array per example).
- `model.probe_logits(audios, prompt)`: the logits `speechlm export` compares before and after saving.
- models that transcribe: `model.transcribe(audios, prompt=..., ...) -> list[str]`; models that speak:
  `model.respond(audios) -> (texts, waveforms)`.

Every collator is a picklable callable built on the driver and run inside Ray Data tasks:
`Collator(model_cfg, data_cfg, dataset_cfg)(examples: list[dict]) -> dict[str, np.ndarray | list]`, and
`collator.prompt_defaults()` says how it prompts the model (for `infer` and exports). Examples are described in
`orchestrator.data.examples`: plain cuts, and for models whose entry says `conversations=True`, conversations with
any number of audio and text turns and text-only examples. A collator that can count an example's tokens
(`collator.token_lengths(example_without_audio, token_equivalent_duration) -> ((input, output, text), encoding)`)
enables token-aware batching (`use_multimodal_sampling`) and the token filters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from speech_models.metrics import corpus_bleu, corpus_wer

if TYPE_CHECKING:
    from torch import nn

    from speech_models.config import ModelConfig


@dataclass(frozen=True)
class Metric:
    """One validation metric, reported as `val_<name>` (mean over validation sets) and `val_<name>_<set>`.

    A metric is either a ratio of counts that `validation_step` returns (summed over batches and ranks first,
    so it is exact whatever the worker count) or a corpus score of the hypotheses against the references.
    """

    name: str
    mode: Literal["min", "max"]  # which way is better: checkpoint monitors and sweep modes follow it
    ratio: tuple[str, str] | None = None  # (numerator, denominator) count names
    score: Callable[[Sequence[str], Sequence[str]], float] | None = None  # score(hypotheses, references)

    def value(self, counts: Mapping[str, float], hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
        """The metric over one validation set, or None when it has nothing to score (no references)."""
        if self.ratio is not None:
            numerator, denominator = self.ratio
            return counts[numerator] / max(counts[denominator], 1.0)
        if self.score is not None and references:
            return self.score(hypotheses, references)
        return None


# The agent speech of a model that speaks, transcribed by `model.scoring_asr` and scored against the references.
# Computed by the orchestrator (it needs its own ASR model), so it has neither ratio nor score here.
ASR_BLEU = Metric("asr_bleu", "max")


@dataclass(frozen=True)
class ModelEntry:
    """What the orchestrator needs from one model type."""

    name: str  # the `model.model_type` value
    model: str | type  # "module:Class" (imported when first used) or the class itself
    collator: str | type
    metrics: tuple[Metric, ...]  # what validation reports, the text metric among them
    speaks: bool = False  # generates agent speech: needs model.pretrained_audio_codec, can be ASR-BLEU scored
    transcribes: bool = False  # has `transcribe(audios, prompt=...)`: a text prompt shapes its answer
    conversations: bool = False  # its collator takes conversations and text-only examples (not only plain cuts)
    encodes_in_chunks: bool = False  # honours model.encoder_chunk_size_seconds (long audio encoded in chunks)

    def model_class(self) -> type:
        return _resolve(self.model)

    def collator_class(self) -> type:
        return _resolve(self.collator)

    def build(self, cfg: ModelConfig, data_cfg: Any = None) -> nn.Module:
        """The model `cfg` describes (pretrained parts loaded as configured); `data_cfg` gives frame/sample rates."""
        return self.model_class()(cfg, data_cfg)

    def build_collator(self, model_cfg: ModelConfig, data_cfg: Any, dataset_cfg: Any) -> Any:
        """The picklable batch collator that Ray Data tasks use for this model."""
        return self.collator_class()(model_cfg, data_cfg, dataset_cfg)

    @property
    def text_metric(self) -> Metric | None:
        """The metric scored on generated text (WER, BLEU): what summaries show first."""
        return next((m for m in self.metrics if m.score is not None), None)

    def validation_metrics(self, scoring_asr: bool = False) -> tuple[Metric, ...]:
        """Every metric a run reports; ASR-BLEU only for models that speak, with a scoring ASR configured."""
        return self.metrics + ((ASR_BLEU,) if self.speaks and scoring_asr else ())

    def count_names(self) -> list[str]:
        """The `validation_step` counts the metrics need, in a fixed order (ranks all-reduce them as one vector)."""
        names: list[str] = []
        for metric in self.metrics:
            for name in metric.ratio or ():
                if name not in names:
                    names.append(name)
        return names

    def metric_mode(self, reported: str) -> Literal["min", "max"] | None:
        """The mode of a reported name such as `val_wer` or `val_wer_dev`, or None when it is not ours."""
        for metric in self.validation_metrics(scoring_asr=True):
            name = f"val_{metric.name}"
            if reported == name or reported.startswith(name + "_"):
                return metric.mode
        return None


def _resolve(target: str | type) -> type:
    if not isinstance(target, str):
        return target
    module_name, _, name = target.partition(":")
    return getattr(importlib.import_module(module_name), name)


LOSS = Metric("loss", "min", ratio=("loss_sum", "num_tokens"))
ACCURACY = Metric("acc", "max", ratio=("num_correct", "num_tokens"))
DUPLEX_METRICS = (
    LOSS,
    ACCURACY,
    # Unweighted parts: they compare runs with different loss weights, where val_loss changes scale.
    Metric("text_loss", "min", ratio=("text_loss_sum", "num_tokens")),
    Metric("audio_loss", "min", ratio=("audio_loss_sum", "num_tokens")),
    Metric("audio_acc", "max", ratio=("num_audio_correct", "num_audio_tokens")),
    Metric("txt_bleu", "max", score=corpus_bleu),
)

MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            "salm",
            model="speech_models.salm:SALM",
            collator="speech_models.salm:SALMCollator",
            metrics=(LOSS, ACCURACY, Metric("wer", "min", score=corpus_wer)),
            transcribes=True,
            conversations=True,
            encodes_in_chunks=True,
        ),
        # Collators live apart from the duplex models so that collate-only Ray Data tasks do not import them.
        ModelEntry(
            "duplex_s2s",
            model="speech_models.duplex_s2s:DuplexS2SModel",
            collator="speech_models.duplex_data:DuplexS2SCollator",
            metrics=DUPLEX_METRICS,
            speaks=True,
        ),
        ModelEntry(
            "duplex_s2s_speech_decoder",
            model="speech_models.duplex_s2s_speech_decoder:DuplexS2SSpeechDecoderModel",
            collator="speech_models.duplex_data:DuplexS2SCollator",
            metrics=DUPLEX_METRICS,
            speaks=True,
        ),
    )
}


def register(entry: ModelEntry) -> ModelEntry:
    """Add (or replace) a model type in this process, e.g. a model of your own outside `speech_models`."""
    MODELS[entry.name] = entry
    return entry


def model_types() -> list[str]:
    return list(MODELS)


def entry_for(cfg: ModelConfig) -> ModelEntry:
    """The entry of the model type `cfg` builds (`model_type: auto` resolved)."""
    name = cfg.resolved_model_type()
    if name not in MODELS:
        raise ValueError(f"model.model_type {name!r} is not a registered model; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def build_model(cfg: ModelConfig, data_cfg: Any = None) -> nn.Module:
    """Build the model that `cfg` describes; `data_cfg` supplies frame length and sample rates (duplex models)."""
    return entry_for(cfg).build(cfg, data_cfg)


def build_collator(model_cfg: ModelConfig, data_cfg: Any, dataset_cfg: Any) -> Any:
    """Build the picklable batch collator that Ray Data tasks use for this model."""
    return entry_for(model_cfg).build_collator(model_cfg, data_cfg, dataset_cfg)
