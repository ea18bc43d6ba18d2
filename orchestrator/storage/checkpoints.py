"""The checkpoint format, in one place: how a checkpoint is written, found, checked and read back (DDP and FSDP2).

A run directory holds one checkpoint directory per validation; a checkpoint directory (one per validation, named like NeMo's `{step}` filename) contains:
- `weights.safetensors`: trainable parameters and all buffers (frozen pretrained weights come from the
  `pretrained_*` sources again, so a LoRA checkpoint stays small);
- `trainer_state.pt`: optimizer and LR-scheduler state;
- `state.json`: step, metrics at that step, format version;
- `config.yaml`: the resolved experiment config, so the checkpoint alone can rebuild the model;
- `data_position.rank<R>.json`: where each rank's data stream was, so a resumed run does not re-read the epoch;
- `complete.json`: written last, once every rank's files are in place (`persist_checkpoint`); it lists every file
  with its size;
- `validation.json`: with `trainer.async_validation`, the metrics of the validation that ran on the checkpoint
  after it was written (read back as part of `state.json`'s metrics).

FSDP2 runs write the model and optimizer sharded instead (format 3), through `torch.distributed.checkpoint`
(DCP): each rank writes its own shards (`__<rank>_0.distcp`) and rank 0 the index (`.metadata`), so no rank
ever gathers the whole model; `trainer_state.pt` then holds only the LR scheduler. DCP reshards on load: a
sharded checkpoint resumes on another worker count, under DDP, or on one process, and `load_model_weights` /
`speechlm export` read it into one plain model (and one `model.safetensors`). DCP's index is a pickle: it is
read with an unpickler that knows only DCP's metadata types, and its non-tensor items with
`torch.load(weights_only=True)`, as every other file here.

A checkpoint is complete once `complete.json` exists and its files have the sizes it lists: listing, resuming
and loading skip or refuse anything else, so a checkpoint interrupted mid-write (a driver killed with -9, a node
lost during the upload) is never taken for the latest one. Checkpoints written before the marker existed
(`format_version` 1) count as complete when they have `state.json` (and are refused when loaded: their tensor
names predate NeMo's). Every file is read without unpickling
code (`torch.load(weights_only=True)`, safetensors). Checkpoints may live on local disk or object storage (read
through the same pyarrow filesystem Ray Train writes with).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from orchestrator.storage import filesystems
from orchestrator.storage.paths import is_url, join

# 2: completeness is `complete.json`, and the models' tensors carry NeMo's parameter and buffer names
# (perception.preprocessor.featurizer.*, duplex llm.layers.* / lm_head.*, NeMo's speech decoder as
# speech_generation.*). A version-1 checkpoint (complete once state.json exists) is still listed, but its tensors
# do not fit today's models: loading it says so.
FORMAT_VERSION = 2
SHARDED_FORMAT_VERSION = 3  # FSDP2: model and optimizer as DCP shards, any layout of format 2 otherwise
READABLE_FORMATS = (FORMAT_VERSION, SHARDED_FORMAT_VERSION)
DCP_METADATA_FILE = ".metadata"  # DCP's index of the shards (written by rank 0)
DCP_SHARD_SUFFIX = ".distcp"
WEIGHTS_FILE = "weights.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
DATA_POSITION_PREFIX = "data_position.rank"
COMPLETE_FILE = "complete.json"
VALIDATION_FILE = "validation.json"  # metrics of a validation run on the checkpoint after it was written
CHECKPOINT_DIR = re.compile(r"^step=(\d+)")
# Every checkpoint file a model needs (a remote checkpoint is copied down for loading).
_MODEL_FILES = (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE)
_EMPTY_CHECKPOINT_HINT = (
    "Checkpoints of multi-worker (DDP) runs came out empty while the checkpoint writer compared DDP's "
    "'module.'-prefixed parameter names with the unprefixed state-dict keys; retrain once that is fixed "
    "(single-worker runs were not affected)."
)


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


# ----------------------------------------------------------------------------------------------
# Sharded model and optimizer (FSDP2), through torch.distributed.checkpoint
# ----------------------------------------------------------------------------------------------


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_sharded_checkpoint(directory: Path) -> bool:
    return (directory / DCP_METADATA_FILE).is_file()


# What DCP's `.metadata` pickle may name: its own record types, tensor dtypes and sizes, and a path.
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module in _DCP_METADATA_MODULES
            or (module, name) in _DCP_METADATA_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not a type of a DCP checkpoint index")
        return super().find_class(module, name)


def _dcp_reader(directory: Path):
    """DCP's FileSystemReader, reading the index without unpickling code."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            path = directory / DCP_METADATA_FILE
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"{path}: refused to load: {exc}. A checkpoint of this project never holds other objects, so "
                    "the file was made elsewhere or tampered with; resume from another checkpoint"
                ) from None
            except (OSError, EOFError) as exc:
                raise CheckpointError(_damaged(path, exc)) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def _dcp_planner():
    """DCP's load planner, with its non-tensor items (optimizer hyper-parameters) read as plain data only."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # what DCP's own planner calls

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner()


def _save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its own shards of the kept model state and of the optimizer state (a collective)."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = get_state_dict(model, optimizer)  # DTensor shards: nothing is gathered
    kept = _kept_sharded_state(model, model_state)
    dcp.save({"model": kept, "optimizer": optim_state}, storage_writer=dcp.FileSystemWriter(str(directory)))


def _kept_sharded_state(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    trainable = trainable_names(model)
    buffers = {name for name, _ in unwrap(model).named_buffers()}
    kept = {k: v for k, v in state.items() if k in trainable or k in buffers}
    missing = trainable - kept.keys()
    if missing:
        raise CheckpointError(
            f"{len(missing)} trainable parameters are missing from the state dict: {sorted(missing)[:3]}"
        )
    return kept


def _load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model and optimizer from DCP shards into a model wrapped any way (FSDP2 resharded to this world
    size, DDP, or none): every rank reads the pieces its own state needs."""
    import torch.distributed.checkpoint as dcp

    saved = _weight_names(directory)
    missing = trainable_names(model) - saved
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} trainable parameters have no saved tensor (e.g. {sorted(missing)[:3]}); "
            "the checkpoint was made with another model config; resume from another checkpoint "
            "(exp_manager.resume_from_checkpoint) or start a new run"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": {k: v for k, v in model_state.items() if k in saved}, "optimizer": optim_state}
    dcp.load(state, storage_reader=_dcp_reader(directory), planner=_dcp_planner())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),
    )


def _sharded_weight_shapes(directory: Path) -> dict[str, Any]:
    """{parameter or buffer name: DCP tensor metadata} of the model part of a sharded checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _dcp_reader(directory).read_metadata()
    return {
        key[len("model.") :]: md
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }


def _load_sharded_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a sharded checkpoint as whole tensors, in this process alone (export, inference)."""
    import torch.distributed.checkpoint as dcp

    shapes = _sharded_weight_shapes(directory)
    tensors = {name: torch.empty(md.size, dtype=md.properties.dtype) for name, md in shapes.items()}
    try:
        dcp.load({"model": tensors}, storage_reader=_dcp_reader(directory), planner=_dcp_planner(), no_dist=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(_damaged(directory / f"__0_0{DCP_SHARD_SUFFIX}", exc)) from None
    return tensors


# ----------------------------------------------------------------------------------------------
# Writing and reading a checkpoint
# ----------------------------------------------------------------------------------------------


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

    Every rank must call it: under FSDP2 every rank writes its shards through DCP (a collective); under DDP
    `get_state_dict` unwraps the model and rank 0 writes `weights.safetensors`. The checkpoint is complete only
    once `mark_complete` has run, after every rank's files are in place: the training loop does that in
    `persist_checkpoint`, a direct writer (`orchestrator.testing.write_checkpoint`) right after this call.
    """
    directory.mkdir(parents=True, exist_ok=True)
    sharded = _is_fsdp(model)
    if sharded:
        _save_sharded(directory, model, optimizer)
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if write_model:
        if not sharded:
            save_file(_kept_model_state(model, model_state), str(directory / WEIGHTS_FILE))
        torch.save(
            {
                "optimizer": None if sharded else optim_state,  # sharded: in the DCP shards
                "scheduler": scheduler.state_dict() if scheduler else None,
            },
            directory / TRAINER_STATE_FILE,
        )
        version = SHARDED_FORMAT_VERSION if sharded else FORMAT_VERSION
        (directory / STATE_FILE).write_text(
            json.dumps({"format_version": version, "step": state.step, "metrics": state.metrics}, indent=2)
        )
        (directory / CONFIG_FILE).write_text(config_yaml)
    if state.data_position is not None:
        (directory / f"{DATA_POSITION_PREFIX}{rank}.json").write_text(json.dumps(state.data_position))


def persist_checkpoint(
    checkpoint: Any, checkpoint_dir_name: str, rank: int, world: int, in_background: bool = False
) -> Any:
    """Ray Train's `checkpoint_upload_fn`: upload this rank's files (as Ray's default upload does), wait until
    every rank has uploaded, then rank 0 writes `complete.json`.

    Ray registers a checkpoint, and deletes the ones beyond save_top_k, only after every rank's report returns,
    that is after this function: so the marker exists before Ray can delete the previous complete checkpoint,
    and a kill at any moment leaves at least one complete checkpoint behind.

    in_background: the upload runs in Ray's upload thread while training goes on
    (`exp_manager.checkpoint_callback_params.async_save`), where a collective would race the training's own;
    each rank then writes `uploaded.rank<R>` after its files, and rank 0 waits for all of them in storage.
    """
    import ray.train
    import torch.distributed as dist

    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    if world > 1 and in_background:
        _mark_uploaded(persisted.path, persisted.filesystem, rank)
        if rank == 0:
            _wait_for_uploads(persisted.path, persisted.filesystem, world)
    elif world > 1:
        dist.barrier()  # every rank's files (its data position) are uploaded
    if rank == 0:
        mark_complete(persisted.path, persisted.filesystem)
    return persisted


UPLOADED_PREFIX = "uploaded.rank"
UPLOAD_WAIT_S = 3600.0


def _mark_uploaded(path: str, fs: pafs.FileSystem, rank: int) -> None:
    with fs.open_output_stream(f"{path.rstrip('/')}/{UPLOADED_PREFIX}{rank}") as out:
        out.write(b"")


def _wait_for_uploads(path: str, fs: pafs.FileSystem, world: int, timeout_s: float = UPLOAD_WAIT_S) -> None:
    import time

    expected = {f"{UPLOADED_PREFIX}{r}" for r in range(world)}
    deadline = time.monotonic() + timeout_s
    while not expected <= set(_file_sizes(fs, path)):
        if time.monotonic() > deadline:
            missing = sorted(expected - set(_file_sizes(fs, path)))
            raise CheckpointError(
                f"checkpoint {path}: {missing} did not appear within {timeout_s:.0f} s, so not every rank uploaded "
                "its files; the checkpoint stays incomplete (resume uses the one before)"
            )
        time.sleep(0.5)


def _file_sizes(fs: pafs.FileSystem, inner: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    return {i.base_name: int(i.size) for i in infos if i.type == pafs.FileType.File}


def mark_complete(path: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Write `complete.json` (every file of the checkpoint with its size) into a checkpoint whose files are all in
    place. `path`: a local dir or URL, or a path inside `filesystem` (as Ray Train reports it)."""
    fs, inner = (filesystem, path) if filesystem is not None else filesystems.pyarrow_filesystem(str(path))
    files = {name: size for name, size in _file_sizes(fs, inner).items() if name != COMPLETE_FILE}
    with fs.open_output_stream(f"{inner.rstrip('/')}/{COMPLETE_FILE}") as out:
        out.write(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1, sort_keys=True).encode())


def completeness_problem(path: str) -> str | None:
    """Why the checkpoint at `path` (local dir or URL) is not complete (interrupted while being written, or a
    file changed since), or None when it is."""
    fs, inner = filesystems.pyarrow_filesystem(str(path))
    sizes = _file_sizes(fs, inner)
    if COMPLETE_FILE not in sizes:
        if STATE_FILE in sizes and _saved_format(path) == 1:
            return None  # written before completion markers existed: complete once state.json is there
        return f"it has no {COMPLETE_FILE}, so it was interrupted while being written"
    try:
        listed = json.loads(filesystems.read_text(join(str(path), COMPLETE_FILE)))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {COMPLETE_FILE} is unreadable ({type(exc).__name__}), so it was interrupted while being written"
    for name, size in sorted(listed.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} is {sizes[name]} bytes but was written as {size} bytes (truncated or replaced)"
    return None


def _saved_format(path: str) -> Any:
    try:
        return json.loads(filesystems.read_text(join(str(path), STATE_FILE))).get("format_version")
    except (OSError, ValueError, AttributeError):
        return None


def require_complete(path: str) -> None:
    """Raise CheckpointError naming `path` unless it is a complete checkpoint."""
    if problem := completeness_problem(path):
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {problem}; use an earlier checkpoint of the run (its run dir picks "
            "the latest complete one)"
        )


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    if is_sharded_checkpoint(directory):
        return _load_sharded_weights(directory)
    path = directory / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(_damaged(path, exc)) from None


def _weight_names(directory: Path) -> set[str]:
    from safetensors import safe_open

    if is_sharded_checkpoint(directory):
        return set(_sharded_weight_shapes(directory))
    path = directory / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(_damaged(path, exc)) from None


def _damaged(path: Path, exc: BaseException) -> str:
    size = path.stat().st_size if path.is_file() else None
    what = "is missing" if size is None else ("is empty (0 bytes)" if size == 0 else f"cannot be read ({exc})")
    return (
        f"{path} {what}: the checkpoint is damaged (truncated by an interrupted copy or a full disk?); use an "
        "earlier checkpoint of the run, or copy this one again"
    )


def _load_trainer_state(directory: Path) -> dict[str, Any]:
    """Optimizer and scheduler state, unpickled with weights_only=True: tensors and plain data, never code."""
    path = directory / TRAINER_STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled Python objects, not only tensors and plain data "
            f"({str(exc).splitlines()[-1][:160]}). A checkpoint of this project never does, so the file was "
            "made elsewhere or tampered with; resume from another checkpoint or start a new run"
        ) from None
    except (OSError, EOFError, RuntimeError) as exc:
        raise CheckpointError(_damaged(path, exc)) from None


def newer_checkpoint(first: Any, second: Any) -> Any:
    """Of two Ray Train checkpoints (either may be None), the one saved at the later step (from its state.json).

    A checkpoint whose files are gone counts as older than any: the checkpoint a re-run resumed from is deleted by
    `save_top_k` retention once the re-run has reported newer ones, and a worker group restarted after that
    restores Ray's latest."""
    if first is None or second is None:
        return first if second is None else second

    def step(checkpoint) -> int:
        try:
            with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{STATE_FILE}") as f:
                return int(json.loads(f.read().decode())["step"])
        except FileNotFoundError:
            return -1

    return first if step(first) >= step(second) else second


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into an unwrapped model; every saved tensor must find its parameter."""
    saved = _load_weights(directory)
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
    """Restore model, optimizer and scheduler in place, whichever way the model is wrapped (DDP, FSDP2, none) and
    whichever way the checkpoint was written (full or sharded)."""
    state = read_saved_state(str(directory))
    require_complete(str(directory))
    trainer_state = _load_trainer_state(directory)
    if is_sharded_checkpoint(directory):
        _load_sharded(directory, model, optimizer)
    else:
        saved_weights = _load_weights(directory)
        missing = trainable_names(model) - saved_weights.keys()
        if missing:
            raise CheckpointError(
                f"{directory}: {len(missing)} trainable parameters have no saved tensor (e.g. "
                f"{sorted(missing)[:3]}); the checkpoint is incomplete or was made with another model config; resume "
                "from another checkpoint (exp_manager.resume_from_checkpoint) or start a new run"
            )
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=saved_weights,
            optim_state_dict=trainer_state["optimizer"],
            options=options,
        )
    if scheduler is not None and trainer_state["scheduler"] is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    position_file = directory / f"{DATA_POSITION_PREFIX}{rank}.json"
    data_position = json.loads(position_file.read_text()) if position_file.is_file() else None
    return TrainingState(step=int(state["step"]), metrics=state.get("metrics", {}), data_position=data_position)


def resume_data_position(checkpoint_path: str):
    """The data position a resumed run starts from: every rank's saved position, merged conservatively.

    Read on the driver (before the Ray Data pipeline is built), from a local dir or an object-store URL.
    """
    from orchestrator.data.position import DataPosition, merge_positions

    files = filesystems.list_names(checkpoint_path, prefix=DATA_POSITION_PREFIX)
    positions = [DataPosition.from_dict(json.loads(filesystems.read_text(join(checkpoint_path, f)))) for f in files]
    return merge_positions(positions) if positions else None


# ----------------------------------------------------------------------------------------------
# Finding checkpoints in a run directory
# ----------------------------------------------------------------------------------------------


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in `run_dir`, oldest first (see `completeness_problem`)."""
    found = []
    for name in filesystems.list_names(run_dir, dirs_only=True):
        match = CHECKPOINT_DIR.match(name)
        path = join(run_dir, name)
        if match and completeness_problem(path) is None:
            found.append((int(match.group(1)), path))
    return sorted(found)


def incomplete_checkpoints(run_dir: str) -> dict[str, str]:
    """{checkpoint dir: why it is incomplete} for the checkpoints of `run_dir` that resume and loading ignore
    (left by an interrupted write, or damaged since)."""
    found = {}
    for name in filesystems.list_names(run_dir, dirs_only=True):
        path = join(run_dir, name)
        if CHECKPOINT_DIR.match(name) and (problem := completeness_problem(path)) is not None:
            found[path] = problem
    return found


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint (Ray always keeps the latest besides the top-k), or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def is_checkpoint(path: str) -> bool:
    """`path` looks like a checkpoint (has state.json); it may still be incomplete (`require_complete`)."""
    return filesystems.exists(join(path, STATE_FILE))


def read_saved_state(path: str) -> dict[str, Any]:
    """state.json of a checkpoint (local or URL): step, metrics, format version (checked)."""
    state_path = join(path, STATE_FILE)
    if not filesystems.is_file(state_path):
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no {STATE_FILE}); point at a step=... directory "
            "inside the run's checkpoint folder"
        )
    try:
        state = json.loads(filesystems.read_text(state_path))
    except ValueError as exc:
        raise CheckpointError(f"{state_path} is not valid JSON ({exc}); the checkpoint is damaged") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version == 1:
        raise CheckpointError(
            f"{path}: checkpoint format 1 was written before the models took NeMo's parameter names. Export it with "
            "the version that trained it (`speechlm export`), or train again"
        )
    if version not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: checkpoint format {version} is not one of {READABLE_FORMATS}")
    validation_path = join(path, VALIDATION_FILE)
    if filesystems.is_file(validation_path):  # validated after it was written (trainer.async_validation)
        with contextlib.suppress(ValueError):
            state.setdefault("metrics", {}).update(json.loads(filesystems.read_text(validation_path)))
    return state


def write_validation_metrics(path: str, filesystem: pafs.FileSystem, metrics: dict[str, float]) -> None:
    """Add the metrics of a validation that ran after the checkpoint was written (a file of its own: the files
    `complete.json` lists stay as they were)."""
    with filesystem.open_output_stream(f"{path.rstrip('/')}/{VALIDATION_FILE}") as out:
        out.write(json.dumps(metrics, indent=1, sort_keys=True).encode())


def read_saved_config(path: str) -> dict[str, Any]:
    """The resolved experiment config saved with a checkpoint, as plain data (validate it before use)."""
    import yaml

    config_path = join(path, CONFIG_FILE)
    if not filesystems.exists(config_path):
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; the checkpoint cannot rebuild its model without it")
    return yaml.safe_load(filesystems.read_text(config_path))


def pick_checkpoint(run_dir: str, which: Literal["best", "latest"], monitor: str, mode: str) -> str | None:
    """The latest checkpoint of `run_dir`, or its best by `monitor` (ties go to the later step; the latest when
    no checkpoint reports `monitor`). None when the run has no checkpoint."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return None
    if which == "latest":
        return checkpoints[-1][1]
    scored = []
    for step, path in checkpoints:
        metrics = read_saved_state(path).get("metrics", {})
        if monitor in metrics:
            scored.append((float(metrics[monitor]), step, path))
    if not scored:
        return checkpoints[-1][1]
    best = min(scored, key=lambda s: (s[0], -s[1])) if mode == "min" else max(scored, key=lambda s: s[:2])
    return best[2]


# ----------------------------------------------------------------------------------------------
# Loading a trained model's weights (inference)
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[Path]:
    """A local directory with the checkpoint's model files (a temporary copy for object-store URLs)."""
    if not is_url(path):
        yield Path(path)
        return
    names = list(_MODEL_FILES)
    if filesystems.exists(join(path, DCP_METADATA_FILE)):  # sharded: the index and every rank's shards
        shards = filesystems.list_names(path, prefix="__")
        names = (
            [n for n in names if n != WEIGHTS_FILE]
            + [DCP_METADATA_FILE]
            + [n for n in shards if n.endswith(DCP_SHARD_SUFFIX)]
        )
    with tempfile.TemporaryDirectory(prefix="speechlm-ckpt-") as tmp:
        for name in names:
            (Path(tmp) / name).write_bytes(filesystems.read_bytes(join(path, name)))
        yield Path(tmp)


def check_has_weights(directory: Path) -> None:
    """Fail before building anything when a checkpoint holds no weights at all (see `check_weights`)."""
    if not _weight_names(directory):
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} holds no tensors, so this checkpoint cannot reproduce the trained "
            f"model. {_EMPTY_CHECKPOINT_HINT}"
        )


def check_weights(directory: Path, model: torch.nn.Module) -> None:
    """Every trainable parameter must be in the checkpoint: a checkpoint that lacks some would silently
    leave them at their random (or pretrained) initial values."""
    saved = _weight_names(directory)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name in trainable if name not in saved]
    if missing:
        raise CheckpointError(
            f"{directory}: {WEIGHTS_FILE} holds {len(saved)} tensors but {len(missing)} of the model's "
            f"{len(trainable)} trainable parameters are missing (e.g. {missing[:3]}), so it cannot reproduce the "
            f"trained model. {_EMPTY_CHECKPOINT_HINT}"
        )
