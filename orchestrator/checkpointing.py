"""What a checkpoint holds and how it is written and read back, for DDP and FSDP2 alike.

A checkpoint directory (one per validation, named like NeMo's `{step}` filename) contains:
- `weights.safetensors`: trainable parameters and all buffers (frozen pretrained weights come from the
  `pretrained_*` sources again, so a LoRA checkpoint stays small);
- `trainer_state.pt`: optimizer and LR-scheduler state;
- `state.json`: step, metrics at that step, format version;
- `config.yaml`: the resolved experiment config, so the checkpoint alone can rebuild the model;
- `data_position.rank<R>.json`: where each rank's data stream was, so a resumed run does not re-read the epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the directory and the problem."""


@dataclass
class TrainingState:
    """The loop's position: restored from a checkpoint or fresh."""

    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    data_position: dict[str, Any] | None = None


def checkpoint_dir_name(step: int, pattern: str = "{step}") -> str:
    """NeMo's `checkpoint_callback_params.filename` ("{step}") rendered as `step=<step>`."""
    return pattern.replace("{step}", f"step={step:07d}").replace("/", "_")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (whose parameter names carry a `module.` prefix); FSDP2 keeps names."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in unwrap(model).named_parameters() if p.requires_grad}


def _kept_model_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # `get_state_dict` returns unprefixed names, so compare them with the unwrapped model's names.
    trainable = trainable_names(model)
    buffers = {name for name, _ in unwrap(model).named_buffers()}
    kept = {k: v.detach().contiguous().cpu() for k, v in full_state.items() if k in trainable or k in buffers}
    missing = trainable - kept.keys()
    if missing:
        raise CheckpointError(
            f"{len(missing)} trainable parameters are missing from the state dict: {sorted(missing)[:3]}"
        )
    return kept


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainingState,
    config_yaml: str,
    write_model: bool,
    rank: int,
) -> None:
    """Write this rank's part of a checkpoint into `directory` (rank 0 writes the model and trainer state).

    `get_state_dict` with full_state_dict gathers FSDP2 shards and unwraps DDP, so every rank must call it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    directory.mkdir(parents=True, exist_ok=True)
    if write_model:
        save_file(_kept_model_state(model, model_state), str(directory / WEIGHTS_FILE))
        torch.save(
            {"optimizer": optim_state, "scheduler": scheduler.state_dict() if scheduler else None},
            directory / TRAINER_STATE_FILE,
        )
        (directory / STATE_FILE).write_text(
            json.dumps({"format_version": FORMAT_VERSION, "step": state.step, "metrics": state.metrics}, indent=2)
        )
        (directory / CONFIG_FILE).write_text(config_yaml)
    if state.data_position is not None:
        (directory / f"data_position.rank{rank}.json").write_text(json.dumps(state.data_position))


def read_state(directory: Path) -> dict[str, Any]:
    """state.json of a checkpoint, with a clear error when the directory is not a checkpoint of ours."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a checkpoint of this project (no {STATE_FILE}); point at a step=... directory "
            "inside the run's checkpoint folder"
        )
    state = json.loads(path.read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {state.get('format_version')} is not {FORMAT_VERSION}")
    return state


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into an unwrapped model; every saved tensor must find its parameter."""
    saved = load_file(str(directory / WEIGHTS_FILE))
    result = model.load_state_dict(saved, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: {len(result.unexpected_keys)} saved tensors have no parameter in this model "
            f"(e.g. {result.unexpected_keys[:3]}); the model config differs from the one the checkpoint was made with"
        )


def load_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
) -> TrainingState:
    """Restore model, optimizer and scheduler in place (works for DDP- and FSDP2-wrapped models)."""
    state = read_state(directory)
    saved_weights = load_file(str(directory / WEIGHTS_FILE))
    missing = trainable_names(model) - saved_weights.keys()
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} trainable parameters have no saved tensor (e.g. {sorted(missing)[:3]}); "
            "the checkpoint is incomplete or was made with another model config; resume from another checkpoint "
            "(exp_manager.resume_from_checkpoint) or start a new run"
        )
    trainer_state = torch.load(directory / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(
        model, optimizer, model_state_dict=saved_weights, optim_state_dict=trainer_state["optimizer"], options=options
    )
    if scheduler is not None and trainer_state["scheduler"] is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    position_file = directory / f"data_position.rank{rank}.json"
    data_position = json.loads(position_file.read_text()) if position_file.is_file() else None
    return TrainingState(step=int(state["step"]), metrics=state.get("metrics", {}), data_position=data_position)


def resume_data_position(checkpoint_path: str):
    """The data position a resumed run starts from: every rank's saved position, merged conservatively.

    Read on the driver (before the Ray Data pipeline is built), from a local dir or an object-store URL.
    """
    from orchestrator import storage
    from orchestrator.data.pipeline import DataPosition, merge_positions

    files = storage.list_files(checkpoint_path, prefix="data_position.rank")
    positions = [DataPosition.from_dict(json.loads(storage.read_text(f))) for f in files]
    return merge_positions(positions) if positions else None
