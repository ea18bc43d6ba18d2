"""How a model is spread over the Ray Train worker group: DDP, or FSDP2 (`trainer.strategy`).

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every parameter across the ranks. Its units, innermost
first: each block (LLM decoder layer, Conformer layer, speech decoder layer, conv subsampling:
`speech_models.memory`), then each direct child of the model that holds parameters (`perception`,
`embed_tokens`, `llm`, `lm_head`, ...; under LoRA the LM inside peft's wrapper, which is what the models call),
then the model itself. A unit gathers its parameters when its module is *called*. That is why every child is
a unit of its own: validation and generation call `model.perception(...)`, `model.embed_tokens(...)` and the
LLM's `generate` directly, never the model's own `forward`, and parameters left to the root unit would still
be shards there ("aten.convolution.default: got mixed torch.Tensor and DTensor").

- Frozen parameters and LoRA adapters live in the same units as the weights they sit beside (FSDP2 allows
  mixed `requires_grad` in a unit); only trainable ones get gradients and optimizer state.
- Modules marked `keep_fp32` (the audio codec, the mel front end) are left out of sharding: they are frozen,
  run in fp32 whatever the precision, and are called through their own methods (`codec.encode`).
- `*-mixed` precisions become a `MixedPrecisionPolicy`: parameters gathered in bf16/fp16 for compute, fp32
  sharded master weights and optimizer state, gradients reduced in fp32. `*-true` precisions have cast the
  model already; gradients are still reduced in fp32. BatchNorm layers are units of their own, gathered in
  fp32 like their running statistics (autocast leaves them in fp32 under DDP too).
- Validation gathers every unit once (`full_parameters`), so generation loops of any length (a frame-by-frame
  duplex decoder, HF `generate` stopping at different steps on each rank) need no collective per step. A rank
  then holds the whole model in the compute dtype for a while, without gradients or optimizer state.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from speech_models.memory import model_blocks
from speech_models.precision import MIXED_DTYPES

STRATEGIES = ("ddp", "fsdp2")


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a part of it) is wrapped by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _kept_fp32_params(model: nn.Module) -> set[nn.Parameter]:
    return {p for m in model.modules() if getattr(m, "keep_fp32", False) for p in m.parameters()}


def _child_units(model: nn.Module, ignored: set[nn.Parameter]) -> list[list[nn.Module]]:
    """The model's direct children that hold parameters of their own, grouped so that children sharing a
    parameter (an LM head tied to the token embedding) are one unit: FSDP2 cannot shard one tensor twice."""
    groups: list[tuple[list[nn.Module], set[int]]] = []
    for child in model.children():
        if hasattr(child, "get_base_model"):  # peft: the models call the wrapped LM itself, not the wrapper
            child = child.get_base_model()
        # a ModuleList/Dict is never called itself: its members are, so they are the unit (one unit together)
        members = list(child.children()) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
        own = {id(p) for p in child.parameters() if p not in ignored}
        if not own:
            continue
        joined = [g for g in groups if g[1] & own]
        for g in joined:
            groups.remove(g)
        modules = [m for g in joined for m in g[0]] + members
        groups.append((modules, own.union(*(g[1] for g in joined))))
    return [modules for modules, _ in groups]


def shard_model(model: nn.Module, precision: str, mesh=None) -> nn.Module:
    """FSDP2 over the default process group (or `mesh`): see the module docstring for the units."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mixed = MIXED_DTYPES.get(precision)
    # fp32 reduction whatever the precision. cast_forward_inputs stays off: batches carry fp32 waveforms that
    # the mel front end must see at full precision; each module casts its own inputs (autocast, `.to(dtype)`).
    policy = MixedPrecisionPolicy(param_dtype=mixed, reduce_dtype=torch.float32, cast_forward_inputs=False)
    ignored = _kept_fp32_params(model)
    # BatchNorm's running statistics stay fp32, and so must its affine parameters: a unit of its own, gathered
    # in fp32 whatever the policy (before the blocks: fully_shard takes inner units first).
    fp32_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(p not in ignored for p in module.parameters()):
            fully_shard(module, mesh=mesh, mp_policy=fp32_policy if mixed else policy, ignored_params=ignored)
    for _, block in model_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    for unit in _child_units(model, ignored):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    if hasattr(model, "validation_step"):  # the root unit's hooks run around it as around forward
        register_fsdp_forward_method(model, "validation_step")
    return model


def wrap_for_distribution(model: nn.Module, strategy: str, device: torch.device, precision: str = "32") -> nn.Module:
    """DDP (default) or FSDP2 across the Ray Train worker group; nothing with a single worker."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if strategy == "fsdp2":
        return shard_model(model, precision)
    device_ids = [device.index] if device.type == "cuda" else None
    # No buffer broadcast: some buffers grow with the input length (relative positional tables), so their
    # sizes differ between ranks and a broadcast would crash gloo/NCCL. BatchNorm statistics stay per rank;
    # checkpoints take rank 0's. torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, which still
    # syncs buffers at init; its own warning says to keep broadcast_buffers=False until init_sync_buffers exists.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter of a micro-batch that is not the last one accumulated."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit gathered for the duration (a no-op for DDP and single workers): one all-gather per
    unit, in the same order on every rank, however many forward calls the body then makes."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
        # FSDP2 keeps the root's parameters gathered between forward and backward (its own default)
        model.set_reshard_after_forward(False, recurse=False)
