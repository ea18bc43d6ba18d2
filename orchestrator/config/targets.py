"""`target` / `_target_` class paths: an explicit allow-list per config key; nothing else is ever imported.

A config file (or a sweep spec, whose values end up in one) must not be able to run arbitrary code, so a target
is only imported when it is on the list for its key: the optimizers of `torch.optim`, the LR schedulers of
`torch.optim.lr_scheduler` that a YAML file can configure, this project's NeMo-named schedules, and the one
class each model key builds. NeMo's own class paths are translated first, so a NeMo user's YAML works
unchanged. Validation resolves every target (imports it, checks it exists) and checks the keyword arguments
against its signature, so a misspelled class or argument fails `speechlm validate`, not a cluster job.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Iterable
from typing import Any

from speech_models.typed_data import did_you_mean

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

# Every class or factory a config may name, per kind of key. Each is called with one positional argument that
# the training loop provides (the parameters, the optimizer) and the config's other keys as keyword arguments.
OPTIMIZERS: tuple[str, ...] = tuple(
    f"torch.optim.{name}"
    for name in (
        "AdamW",  # the usual one first: messages use the first entry as their example
        "Adam",
        "SGD",
        "Adadelta",
        "Adafactor",
        "Adagrad",
        "Adamax",
        "ASGD",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
    )
)
# Schedulers stepped once per optimizer step with no arguments; those that need Python callables (LambdaLR),
# other schedulers (SequentialLR) or a metric (ReduceLROnPlateau) cannot be configured from YAML.
LR_SCHEDULERS: tuple[str, ...] = tuple(
    f"orchestrator.training.schedules.{name}"
    for name in ("CosineAnnealing", "WarmupAnnealing", "InverseSquareRootAnnealing")
) + tuple(
    f"torch.optim.lr_scheduler.{name}"
    for name in (
        "ConstantLR",
        "CosineAnnealingLR",
        "CosineAnnealingWarmRestarts",
        "CyclicLR",
        "ExponentialLR",
        "LinearLR",
        "MultiStepLR",
        "OneCycleLR",
        "PolynomialLR",
        "StepLR",
    )
)
# Model parts: the config names the class for NeMo compatibility; the model builds exactly this one.
PERCEPTION_MODULES: tuple[str, ...] = ("speech_models.perception.AudioPerceptionModule",)
PREPROCESSORS: tuple[str, ...] = ("speech_models.perception.AudioToMelSpectrogramPreprocessor",)
SPEC_AUGMENTS: tuple[str, ...] = ("speech_models.perception.SpecAugment",)
ENCODERS: tuple[str, ...] = ("speech_models.perception.ConformerEncoder",)
SPEECH_DECODERS: tuple[str, ...] = ("speech_models.duplex_s2s_speech_decoder.TransformerARSpeechDecoder",)
ALLOWED_TARGETS: tuple[str, ...] = (
    OPTIMIZERS + LR_SCHEDULERS + PERCEPTION_MODULES + PREPROCESSORS + SPEC_AUGMENTS + ENCODERS + SPEECH_DECODERS
)


def canonical_target(target: str) -> str:
    """Translate a NeMo class path to ours; other paths are returned unchanged."""
    return NEMO_TARGETS.get(target, target)


def target_problem(target: str, allowed: Iterable[str] = ALLOWED_TARGETS, what: str = "target") -> str | None:
    """Why `target` cannot be used for a key that takes one of `allowed` (`what` names them), or None.

    An allowed target is resolved here (imported and looked up), so a name that does not exist in the
    installed version is reported at validation, with a did-you-mean.
    """
    allowed = tuple(allowed)
    resolved = canonical_target(str(target))
    if resolved not in allowed:
        by_short_name = {name.rpartition(".")[2].lower(): name for name in allowed}
        close = difflib.get_close_matches(resolved, allowed, n=1, cutoff=0.6) or [
            by_short_name[m]
            for m in difflib.get_close_matches(resolved.rpartition(".")[2].lower(), by_short_name, n=1, cutoff=0.6)
        ]
        hint = f" Did you mean '{close[0]}'?" if close else ""
        shown = ", ".join(a.rpartition(".")[2] for a in allowed)
        return (
            f"{target!r} is not an allowed {what}; a config may only name one of: {shown} "
            f"(e.g. {allowed[0]}); nothing else is imported from a config.{hint}"
        )
    try:
        _import(resolved)
    except (ImportError, AttributeError) as exc:
        return f"{target!r} cannot be resolved in this installation ({type(exc).__name__}: {exc})"
    return None


def _import(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def resolve_target(target: str, allowed: Iterable[str] = ALLOWED_TARGETS, what: str = "target") -> Any:
    """The allow-listed class or factory that `target` names; ValueError for anything else."""
    problem = target_problem(target, allowed, what)
    if problem:
        raise ValueError(problem)
    return _import(canonical_target(target))


def argument_problems(spec: dict[str, Any], allowed: Iterable[str], what: str) -> list[str]:
    """Problems with a `{_target_: ..., **kwargs}` spec: its target, then each keyword argument checked against
    the target's signature (unknown, missing, or not a finite number where the default is a number)."""
    target = spec.get("_target_") or spec.get("target")
    if not target:
        return [f"missing _target_ (e.g. _target_: {next(iter(allowed))})"]
    if problem := target_problem(str(target), allowed, what):
        return [f"_target_: {problem}"]
    factory = _import(canonical_target(str(target)))
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "target")}
    parameters = list(inspect.signature(factory).parameters.values())[1:]  # the first one the loop passes
    by_name = {p.name: p for p in parameters}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    name = str(target).rpartition(".")[2]
    problems = []
    for key, value in kwargs.items():
        param = by_name.get(key)
        if param is None:
            if not takes_any:
                problems.append(
                    f"{key}: {name} takes no argument {key!r}; its arguments are "
                    f"{', '.join(by_name) or 'none'}.{did_you_mean(key, by_name)}"
                )
            continue
        if (problem := _number_problem(value, param.default)) is not None:
            problems.append(f"{key}: {problem}")
    for param in parameters:
        required = param.default is inspect.Parameter.empty and param.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        if required and param.name not in kwargs:
            problems.append(f"{param.name}: {name} needs it; add {param.name}: VALUE")
    return problems


def _number_problem(value: Any, default: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if isinstance(value, (list, tuple)):
        return next((p for v in value if (p := _number_problem(v, None)) is not None), None)
    numeric_default = isinstance(default, (int, float)) and not isinstance(default, bool)
    if numeric_default and isinstance(value, (str, bool)):
        return f"{value!r} is not a number (the default is {default})"
    return None


def construction_problems(optimizer: dict[str, Any], lr_scheduler: dict[str, Any] | None) -> list[str]:
    """Build the (allow-listed, signature-checked) optimizer on a dummy parameter, and the scheduler on it: the
    values the classes themselves refuse (a negative lr, betas outside [0, 1)) are reported at validation."""
    import torch

    try:
        built = instantiate(optimizer, [torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as exc:
        return [f"model.optimizer: {_name(optimizer)} refuses these arguments ({exc})"]
    if lr_scheduler is None:
        return []
    try:
        instantiate(lr_scheduler, built)
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        return [f"model.lr_scheduler: {_name(lr_scheduler)} refuses these arguments ({exc})"]
    return []


def _name(spec: dict[str, Any]) -> str:
    return str(spec.get("_target_") or spec.get("target")).rpartition(".")[2]


def instantiate(spec: dict[str, Any], *args: Any, **extra: Any) -> Any:
    """Call the allow-listed class named by spec['_target_'] with the other keys (plus `extra`) as keyword
    arguments."""
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "target")}
    kwargs.update(extra)
    return resolve_target(spec.get("_target_") or spec["target"])(*args, **kwargs)
