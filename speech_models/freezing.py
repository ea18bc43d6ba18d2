"""Which parameters train: optional LoRA on the LLM, then `freeze_params` / `prevent_freeze_params` regexes.

Semantics (NeMo speechlm2):
- LoRA (`model.lora`, passed verbatim to `peft.LoraConfig`) wraps `model.llm`; peft freezes the whole base
  LLM and only the LoRA weights train. The token embedding lives outside the LLM (`embed_tokens.*`), so
  LoRA does not freeze it; list `^embed_tokens\\..+$` in freeze_params to freeze it too.
- A parameter is frozen when a `freeze_params` pattern matches its name (`re.match`, so anchor with `$`
  for a full match) and no `prevent_freeze_params` pattern does. Patterns never unfreeze anything.
- LoRA weights always stay trainable.
- Patterns are matched against the name *without* the peft wrapping, so the documented
  `^llm\\.model\\.layers\\.[0-4]\\..+$` (SALM) means the same with or without LoRA: peft's
  `llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` is matched as
  `llm.model.layers.0.self_attn.q_proj.weight`. (NeMo matches the raw peft names; under LoRA peft has frozen
  every base LLM weight already, so the two differ only in which patterns are reported as matching nothing.)
- Names are NeMo's: SALM's `llm` is the whole causal LM (`llm.model.layers.*`, `llm.lm_head.*`), a duplex
  model's `llm` the decoder stack (`llm.layers.*`, `llm.norm.*`) with `lm_head.*` beside it.
- A pattern that matches no parameter is logged as a warning (usually a typo or a renamed module).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

from torch import nn

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "llm.base_model.model."
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


@dataclass
class TrainableSummary:
    trainable: int  # parameters (elements) that will receive gradients
    total: int  # all parameters (elements), shared tensors counted once
    frozen_by_pattern: int  # parameter tensors frozen by freeze_params

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({pct:.2f}%)"


def canonical_param_name(name: str) -> str:
    """The parameter's name as it would be without peft: drop the wrapper prefix and `.base_layer`."""
    if name.startswith(_PEFT_PREFIX):
        name = "llm." + name[len(_PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


def is_lora_param(name: str) -> bool:
    return any(marker in name for marker in _LORA_MARKERS)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements; shared parameters counted once."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def install_lora(model: nn.Module, lora_cfg) -> None:
    """Wrap `model.llm` with peft LoRA (`peft.LoraConfig(**asdict(lora_cfg))`).

    Duplex models hold only the decoder stack in `llm` (NeMo's layout), which peft's CAUSAL_LM wrapper cannot
    wrap (it needs generation methods); the task type is dropped there. The parameter names are the same.
    """
    import peft

    options = asdict(lora_cfg)
    if not hasattr(model.llm, "prepare_inputs_for_generation"):
        options["task_type"] = None
    llm, embedding = model.llm, getattr(model, "embed_tokens", None)
    # The models keep the token embedding outside the LLM (NeMo's layout), but peft asks the LLM for it to find
    # the weights tied to it (an LM head tied to the embedding, as in Qwen3): lend it for the wrapping.
    lend = embedding is not None and not _has_input_embeddings(llm)
    if lend:
        llm.get_input_embeddings = lambda: embedding
    try:
        model.llm = peft.get_peft_model(llm, peft.LoraConfig(**options))
    finally:
        if lend:
            del llm.get_input_embeddings


def _has_input_embeddings(llm: nn.Module) -> bool:
    try:
        return llm.get_input_embeddings() is not None
    except (NotImplementedError, AttributeError):
        return False


def apply_freeze_params(
    model: nn.Module, freeze_params: list[str], prevent_freeze_params: list[str]
) -> TrainableSummary:
    """Freeze parameters matching `freeze_params` unless they match `prevent_freeze_params`."""
    freeze = [re.compile(p) for p in freeze_params]
    prevent = [re.compile(p) for p in prevent_freeze_params]
    hits = {p.pattern: 0 for p in freeze + prevent}
    frozen = 0
    for name, param in model.named_parameters():
        canonical = canonical_param_name(name)
        matched_freeze = [p for p in freeze if p.match(canonical)]
        matched_prevent = [p for p in prevent if p.match(canonical)]
        for p in matched_freeze + matched_prevent:
            hits[p.pattern] += 1
        if is_lora_param(name):
            param.requires_grad_(True)
        elif matched_freeze and not matched_prevent and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    buffers = [canonical_param_name(name) for name, _ in model.named_buffers()]
    for pattern, count in hits.items():
        # A pattern that names buffers only (NeMo's "^perception\.preprocessor\..+$": the mel front end has no
        # parameters) freezes nothing there is to train; a typo matches neither.
        if count == 0 and not any(re.match(pattern, name) for name in buffers):
            logger.warning(
                "freeze pattern %r matches no parameter name (e.g. %r)", pattern, next(iter(_example_names(model)))
            )
    trainable, total = count_params(model)
    return TrainableSummary(trainable=trainable, total=total, frozen_by_pattern=frozen)


def _example_names(model: nn.Module) -> list[str]:
    return [canonical_param_name(name) for name, _ in model.named_parameters()][:1] or ["(no parameters)"]


def setup_trainable_params(model: nn.Module, cfg) -> TrainableSummary:
    """LoRA (when `cfg.lora` is set) then freezing, from a `ModelConfig`; logs and returns the counts."""
    if cfg.lora is not None:
        install_lora(model, cfg.lora)
    summary = apply_freeze_params(model, cfg.freeze_params, cfg.prevent_freeze_params)
    logger.info("%s: %s", type(model).__name__, summary)
    return summary


def keep_frozen_parts_in_eval(*parts: nn.Module) -> None:
    """Put every part whose parameters are all frozen (or that has none) in eval mode.

    NeMo's speechlm2 training step does this for the preprocessor, the encoder and the LLM (and a duplex speech
    decoder) before each batch: a frozen pretrained encoder then runs as it was trained to be used, without
    dropout and with its own batch-norm statistics, instead of having them overwritten by the new task's
    batches (freezing parameters does not stop batch-norm buffers from updating). Called from the models'
    `train()`, so whoever switches a model to training gets it.
    """
    for part in parts:
        if all(not p.requires_grad for p in part.parameters()):
            part.eval()
