"""Rewrite NeMo-only spellings into this project's schema before validation.

Each rewrite keeps a NeMo user's YAML running unchanged; keys that have no meaning here are dropped with a
warning that names them, never silently.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config.targets import LIGHTNING_STRATEGIES

# NeMo's documentation page lists a speech-decoder key set that NeMo's code does not take; the schema has the
# code's keys (NeMo's released s2s_duplex_speech_decoder.yaml), so the documented spellings are translated.
SPEECH_DECODER_DOC_ALIASES = {
    "d_ff": "d_ffn",
    "n_heads": "sa_n_heads",
    "max_seq_len": "max_length_causal_mask",
    "dropout": "p_dropout",
}
# Documented keys with no counterpart in NeMo's decoder: its head width is d_model / sa_n_heads, its LayerNorms
# use eps 1e-5, its activation is GELU (tanh) and it initialises with std 0.02.
SPEECH_DECODER_DOC_IGNORED = {"d_kv", "layernorm_epsilon", "activation_function", "init_method_std"}
# Another name NeMo gives init_from_checkpoint (it loads the whole model the same way).
INIT_ALIASES = {"pretrained_s2s_model": "init_from_checkpoint"}


def apply_nemo_compat(raw: dict[str, Any], problems: list[str], warnings: list[str]) -> dict[str, Any]:
    """Return `raw` with NeMo spellings translated; append problems and warnings in place."""
    trainer = raw.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("strategy"), dict):
        trainer["strategy"] = _translate_strategy(trainer["strategy"], problems, warnings)

    model = raw.get("model")
    if isinstance(model, dict):
        raw["model"] = model = _translate_model(model, problems, warnings)
        if isinstance(model.get("speech_decoder"), dict):
            model["speech_decoder"] = _translate_speech_decoder(model["speech_decoder"], warnings)

    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("validation_ds"), dict):
        _inherit_validation_settings(data["validation_ds"])

    exp = raw.get("exp_manager")
    if isinstance(exp, dict):
        for flag, what in (("create_wandb_logger", "W&B"), ("create_tensorboard_logger", "TensorBoard")):
            if exp.get(flag):
                warnings.append(
                    f"exp_manager.{flag}: {what} logging is not supported; runs are tracked in MLflow "
                    "(exp_manager.create_mlflow_logger)"
                )
    return raw


def _translate_strategy(spec: dict[str, Any], problems: list[str], warnings: list[str]) -> str | None:
    target = spec.get("_target_") or spec.get("target")
    if target not in LIGHTNING_STRATEGIES:
        problems.append(
            f"trainer.strategy._target_: {target!r} is not a known strategy; use 'ddp' or 'fsdp2' "
            f"(or one of {', '.join(sorted(LIGHTNING_STRATEGIES))})"
        )
        return None
    extra = sorted(k for k in spec if k not in ("_target_", "target"))
    if extra:
        warnings.append(f"trainer.strategy: Lightning options {extra} have no Ray Train equivalent and are ignored")
    return LIGHTNING_STRATEGIES[target]


def _translate_model(model: dict[str, Any], problems: list[str], warnings: list[str]) -> dict[str, Any]:
    """A NeMo model section, e.g. a NeMo checkpoint's config.json pasted as `model:` (hub metadata dropped)."""
    from speech_models.nemo_format import drop_hub_metadata

    model = drop_hub_metadata(model)
    for old, new in INIT_ALIASES.items():
        if old in model:
            if model.get(new) is not None:
                problems.append(f"model.{old}: give either {old} or {new}, not both")
            else:
                warnings.append(f"model.{old}: read as model.{new} (NeMo loads both the same way)")
                model[new] = model.pop(old)
    if model.pop("pretrained_perception_from_s2s", None) is not None:
        problems.append(
            "model.pretrained_perception_from_s2s: loading only the perception weights of another model is not "
            "supported; use model.init_from_checkpoint (all matching weights) and freeze_params"
        )
    return model


def _translate_speech_decoder(spec: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ignored, renamed = [], []
    for key, value in spec.items():
        if key in SPEECH_DECODER_DOC_IGNORED:
            ignored.append(key)
        elif key in SPEECH_DECODER_DOC_ALIASES:
            renamed.append(f"{key} -> {SPEECH_DECODER_DOC_ALIASES[key]}")
            out[SPEECH_DECODER_DOC_ALIASES[key]] = value
        else:
            out[key] = value
    if renamed:
        warnings.append(f"model.speech_decoder: NeMo's documented keys read as its code's: {', '.join(renamed)}")
    if ignored:
        warnings.append(
            f"model.speech_decoder: documented keys {sorted(ignored)} have no counterpart in NeMo's decoder (head "
            "width d_model / sa_n_heads, LayerNorm eps 1e-5, GELU-tanh, init std 0.02) and are ignored"
        )
    return out


def _inherit_validation_settings(validation_ds: dict[str, Any]) -> None:
    """NeMo: each named validation set inherits validation_ds's settings and may override them."""
    datasets = validation_ds.get("datasets")
    if not isinstance(datasets, dict):
        return
    # Validation reads every cut once in order, so an unset `shuffle` means False here (not DatasetConfig's True).
    shared = {"shuffle": False, **{k: v for k, v in validation_ds.items() if k != "datasets"}}
    for name, own in list(datasets.items()):
        if isinstance(own, dict):
            datasets[name] = {**shared, **own}
