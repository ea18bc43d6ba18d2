"""`target` / `_target_` class paths: NeMo names map to this project's classes; nothing else is importable.

A config file must not be able to run arbitrary code, so a target is only imported when it lies inside an
allow-listed module. NeMo's own class paths are translated first, so a NeMo user's YAML works unchanged.
"""

from __future__ import annotations

import importlib
from typing import Any

# NeMo / Lightning class path -> this project's equivalent.
NEMO_TARGETS: dict[str, str] = {
    "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule": (
        "speech_models.perception.AudioPerceptionModule"
    ),
    "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor": (
        "speech_models.perception.AudioToMelSpectrogramPreprocessor"
    ),
    "nemo.collections.asr.modules.audio_preprocessing.AudioToMelSpectrogramPreprocessor": (
        "speech_models.perception.AudioToMelSpectrogramPreprocessor"
    ),
    "nemo.collections.asr.modules.SpectrogramAugmentation": "speech_models.perception.SpecAugment",
    "nemo.collections.asr.modules.audio_preprocessing.SpectrogramAugmentation": "speech_models.perception.SpecAugment",
    "nemo.collections.asr.modules.ConformerEncoder": "speech_models.perception.ConformerEncoder",
    "nemo.collections.asr.modules.conformer_encoder.ConformerEncoder": "speech_models.perception.ConformerEncoder",
    "nemo.collections.speechlm2.modules.speech_generation.TransformerARSpeechDecoder": (
        "speech_models.duplex_s2s_speech_decoder.TransformerARSpeechDecoder"
    ),
    "nemo.core.optim.lr_scheduler.CosineAnnealing": "orchestrator.training.schedules.CosineAnnealing",
    "nemo.core.optim.lr_scheduler.WarmupAnnealing": "orchestrator.training.schedules.WarmupAnnealing",
    "nemo.core.optim.lr_scheduler.InverseSquareRootAnnealing": "orchestrator.training.schedules.InverseSquareRootAnnealing",
    "nemo.core.optim.lr_scheduler.NoamAnnealing": "orchestrator.training.schedules.InverseSquareRootAnnealing",
}

# Lightning strategies named in NeMo configs -> trainer.strategy values.
LIGHTNING_STRATEGIES: dict[str, str] = {
    "lightning.pytorch.strategies.DDPStrategy": "ddp",
    "pytorch_lightning.strategies.DDPStrategy": "ddp",
    "lightning.pytorch.strategies.ModelParallelStrategy": "fsdp2",
    "lightning.pytorch.strategies.FSDPStrategy": "fsdp2",
}

ALLOWED_MODULES: tuple[str, ...] = (
    "torch.optim",
    "torch.optim.lr_scheduler",
    "speech_models",
    "orchestrator.training.schedules",
    "transformers",
)


def canonical_target(target: str) -> str:
    """Translate a NeMo class path to ours; other paths are returned unchanged."""
    return NEMO_TARGETS.get(target, target)


def target_problem(target: str) -> str | None:
    """Why `target` cannot be used, or None when it can (checked without importing it)."""
    resolved = canonical_target(target)
    module_name, _, attr = resolved.rpartition(".")
    if not module_name or not attr:
        return f"{target!r} is not a dotted class path like 'torch.optim.AdamW'"
    if not any(module_name == m or module_name.startswith(m + ".") for m in ALLOWED_MODULES):
        return (
            f"{target!r} is outside the allowed modules ({', '.join(ALLOWED_MODULES)}); "
            "a config file may not import arbitrary code"
        )
    return None


def resolve_target(target: str) -> Any:
    """Import the (allow-listed) object that `target` names."""
    problem = target_problem(target)
    if problem:
        raise ValueError(problem)
    module_name, _, attr = canonical_target(target).rpartition(".")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{target!r}: module {module_name!r} has no attribute {attr!r}") from None


def instantiate(spec: dict[str, Any], *args: Any, **extra: Any) -> Any:
    """Call the class named by spec['_target_'] with the other keys (plus `extra`) as keyword arguments."""
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "target")}
    kwargs.update(extra)
    return resolve_target(spec.get("_target_") or spec["target"])(*args, **kwargs)
