"""One entry point from a validated `ModelConfig` to a model and to its batch collator.

The training loop and the data pipeline only talk to models through this module, so adding a model means
adding one row to `_MODELS`. Imports are lazy: a Ray Data task that only collates batches never imports
the model code, and the CLI starts fast.

Every model class implements the same small interface:
- `Model(cfg: ModelConfig)` (duplex models: `Model(cfg, data_cfg)`); `model.tokenizer`.
- `model(batch) -> dict[str, Tensor]`: training forward; `"loss"` (scalar, mean per target token) plus
  detached components (e.g. `"text_loss"`, `"audio_loss"`) and `"num_target_tokens"`.
- `model.validation_step(batch) -> dict`: `"loss_sum"`, `"num_tokens"`, `"num_correct"` (floats/ints summed
  over the batch) and `"hypotheses"` / `"references"` (lists of str) for WER or BLEU.

Every collator is a picklable callable built on the driver and run inside Ray Data tasks:
`Collator(model_cfg, data_cfg, dataset_cfg)(examples: list[dict]) -> dict[str, np.ndarray | list]`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from speech_models.config import ModelConfig

# model type -> ("module:Model", "module:Collator"). Collators live apart from the duplex models so that
# collate-only Ray Data tasks do not import the model code.
_MODELS: dict[str, tuple[str, str]] = {
    "salm": ("speech_models.salm:SALM", "speech_models.salm:SALMCollator"),
    "duplex_s2s": ("speech_models.duplex_s2s:DuplexS2SModel", "speech_models.duplex_data:DuplexS2SCollator"),
    "duplex_s2s_speech_decoder": (
        "speech_models.duplex_s2s_speech_decoder:DuplexS2SSpeechDecoderModel",
        "speech_models.duplex_data:DuplexS2SCollator",
    ),
}


def _lookup(model_type: str, which: int) -> Any:
    if model_type not in _MODELS:
        raise ValueError(f"model_type {model_type!r} is not one of {sorted(_MODELS)}")
    module_name, _, name = _MODELS[model_type][which].partition(":")
    return getattr(importlib.import_module(module_name), name)


def build_model(cfg: ModelConfig, data_cfg: Any = None) -> torch.nn.Module:
    """Build the model that `cfg` describes (loading pretrained parts as configured).

    Duplex models also need `data_cfg` (frame_length and sample rates); SALM ignores it.
    """
    model_class = _lookup(cfg.resolved_model_type(), 0)
    return model_class(cfg) if cfg.resolved_model_type() == "salm" else model_class(cfg, data_cfg)


def build_collator(model_cfg: ModelConfig, data_cfg: Any, dataset_cfg: Any) -> Any:
    """Build the picklable batch collator that Ray Data tasks use for this model."""
    return _lookup(model_cfg.resolved_model_type(), 1)(model_cfg, data_cfg, dataset_cfg)
