"""Rewrite NeMo-only spellings into this project's schema before validation.

Each rewrite keeps a NeMo user's YAML running unchanged; keys that have no meaning here are dropped with a
warning that names them, never silently.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config.targets import LIGHTNING_STRATEGIES

# NeMo's released s2s_duplex_speech_decoder.yaml uses a different key set than its documentation page.
SPEECH_DECODER_ALIASES = {
    "d_ffn": "d_ff",
    "sa_n_heads": "n_heads",
    "p_dropout": "dropout",
    "max_length_causal_mask": "max_seq_len",
}
SPEECH_DECODER_IGNORED = {
    "kernel_size",
    "p_dropout_out",
    "has_xattn",
    "xa_d_memory",
    "xa_n_heads",
    "is_causal",
    "apply_norm_to_cond",
    "apply_norm_out",
    "cond_on_prev_audio_tokens",
    "detach_input",
    "use_learnable_pos_emb",
}


def apply_nemo_compat(raw: dict[str, Any], problems: list[str], warnings: list[str]) -> dict[str, Any]:
    """Return `raw` with NeMo spellings translated; append problems and warnings in place."""
    trainer = raw.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("strategy"), dict):
        trainer["strategy"] = _translate_strategy(trainer["strategy"], problems, warnings)

    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("speech_decoder"), dict):
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


def _translate_speech_decoder(spec: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ignored = []
    for key, value in spec.items():
        if key in SPEECH_DECODER_IGNORED:
            ignored.append(key)
        else:
            out[SPEECH_DECODER_ALIASES.get(key, key)] = value
    if ignored:
        warnings.append(f"model.speech_decoder: NeMo-specific keys {sorted(ignored)} are ignored by this decoder")
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
