"""Where a model's activation memory goes, and how to spend compute instead: its blocks, recomputed.

A model's blocks are its Hugging Face LLM decoder layers (transformers marks them `GradientCheckpointingLayer`),
the FastConformer layers of its encoder and modality adapter, the layers of a duplex speech decoder, and the
encoder's convolutional subsampling (on long audio its full-rate feature maps are the largest activations of
all). They are what activation checkpointing recomputes in the backward pass (`trainer.activation_checkpointing`,
the name NeMo Automodel's FSDP2 strategy uses) and what FSDP2 shards one unit each
(`orchestrator.training.parallel`), so the two agree on the granularity.

Checkpointing wraps each block's `forward` on the instance (non-reentrant `torch.utils.checkpoint`, RNG state
preserved, so dropout draws the same masks when recomputed): parameter names and state dicts stay exactly as
they were (no `_checkpoint_wrapped_module.` prefix), so checkpoints, freeze patterns and FSDP2 units see the
same model. Only the activations at each block's input are kept; the rest is recomputed once in backward
(about a third more compute for the blocks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def _block_types() -> tuple[type, ...]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    from speech_models.duplex_s2s_speech_decoder import TransformerLayer
    from speech_models.perception import ConformerLayer, ConvSubsampling

    return (GradientCheckpointingLayer, ConformerLayer, TransformerLayer, ConvSubsampling)


def model_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every block: LLM decoder layers, Conformer layers, speech decoder layers, subsampling."""
    types = _block_types()
    for name, module in model.named_modules():
        if isinstance(module, types):
            yield name, module


def _recomputed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # validation, generation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run.recomputed = True  # type: ignore[attr-defined]
    return run


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every block's activations in backward instead of keeping them; returns how many blocks.
    Idempotent; apply before FSDP2 wrapping or after, either works (the wrap is inside `forward`)."""
    count = 0
    for _, block in model_blocks(model):
        if not getattr(block.forward, "recomputed", False):
            block.forward = _recomputed(block.forward)
        count += 1
    return count
