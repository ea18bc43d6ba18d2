"""Trained models outside training: find them (checkpoint, run dir, exported dir or NeMo checkpoint dir) and
load them.

`speechlm eval`, `speechlm infer` and `speechlm export` all start here:

    resolve_source(PATH)  ->  ModelSource (config only: cheap, picklable, sent to Ray actors)
    load_model(source)    ->  the model in eval mode, exactly as validation saw it (same seed for weights the
                              checkpoint does not hold, same precision, the prompt it was validated with), plus
                              its autocast context

A checkpoint keeps only trainable weights, so loading one rebuilds the frozen parts from the `pretrained_*`
sources named in its config.yaml; an exported directory needs none of them. A NeMo speechlm2 `save_pretrained`
directory (`speech_models.nemo_format`) holds every weight too, but names its LLM (config and tokenizer) by
`pretrained_llm`, usually a hub id: `--set model.pretrained_llm=/local/dir` points it elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from orchestrator.config import DataConfig, DatasetConfig, ExperimentConfig
from orchestrator.storage import checkpoints
from orchestrator.storage.checkpoints import CheckpointError
from orchestrator.storage.paths import is_url
from speech_models.config import AudioFrames, ModelConfig, PromptDefaults
from speech_models.pretrained import is_exported_dir, read_exported_config
from speech_models.registry import ModelEntry, entry_for

logger = logging.getLogger(__name__)

Which = Literal["best", "latest"]


class SourceError(ValueError):
    """A path that is not a checkpoint, run dir or exported model, or a checkpoint that cannot be used."""


# ----------------------------------------------------------------------------------------------
# Where the model comes from
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """A trained model, described without loading it."""

    kind: Literal["checkpoint", "export", "nemo"]
    path: str  # a step=... checkpoint dir (local or URL), an exported dir or a NeMo save_pretrained dir
    model_cfg: ModelConfig
    data_cfg: DataConfig
    prompt: PromptDefaults
    precision: str = "32"
    seed: int = 42
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_dir: str | None = None
    experiment: ExperimentConfig | None = None

    @property
    def entry(self) -> ModelEntry:
        return entry_for(self.model_cfg)

    @property
    def label(self) -> str:
        """Short name for logs and output dirs, e.g. 'learn1/step=0000400'."""
        parts = self.path.rstrip("/").split("/")
        return "/".join(parts[-2:]) if self.kind == "checkpoint" else parts[-1]

    @property
    def frames(self) -> AudioFrames:
        d = self.data_cfg
        return AudioFrames(float(d.frame_length), int(d.source_sample_rate), int(d.target_sample_rate))


def _prompt_dataset(cfg: ExperimentConfig) -> DatasetConfig:
    """The dataset whose prompt (context tag, system prompt, format) the model was validated with."""
    from orchestrator.data.plan import validation_sets

    sets = validation_sets(cfg.data)
    return next(iter(sets.values())) if sets else cfg.data.train_ds


def _checkpoint_source(path: str, overrides: Sequence[str], run_dir: str | None, check: bool = True) -> ModelSource:
    from orchestrator.config import experiment_from_dict

    try:
        state = checkpoints.read_saved_state(path)
        checkpoints.require_complete(path)
        saved = checkpoints.read_saved_config(path)
    except CheckpointError as exc:
        raise SourceError(str(exc)) from None
    cfg = experiment_from_dict(saved, list(overrides), source=f"{path}/{checkpoints.CONFIG_FILE}").cfg
    if check and not is_url(path):
        try:
            checkpoints.check_has_weights(Path(path))
        except CheckpointError as exc:
            raise SourceError(str(exc)) from None
    collator = entry_for(cfg.model).build_collator(cfg.model, cfg.data, _prompt_dataset(cfg))
    return ModelSource(
        kind="checkpoint",
        path=path,
        model_cfg=cfg.model,
        data_cfg=cfg.data,
        prompt=collator.prompt_defaults(),
        precision=cfg.trainer.precision,
        seed=cfg.trainer.seed,
        step=int(state["step"]),
        metrics=dict(state.get("metrics", {})),
        run_dir=run_dir or path.rstrip("/").rpartition("/")[0] or ".",
        experiment=cfg,
    )


def _pick_checkpoint(run_dir: str, which: Which, overrides: Sequence[str]) -> ModelSource:
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest is None:
        raise SourceError(
            f"{run_dir} is not a checkpoint (no state.json), an exported model (no speechlm_config.yaml) "
            "or a run directory with complete step=... checkpoints; point at one of those"
        )
    source = _checkpoint_source(latest, overrides, run_dir, check=which == "latest")
    if which == "latest":
        return source
    params = source.experiment.exp_manager.checkpoint_callback_params
    best = checkpoints.pick_checkpoint(run_dir, "best", params.monitor, params.mode)
    return _checkpoint_source(best, overrides, run_dir)


def _data_config(frames: AudioFrames) -> DataConfig:
    return DataConfig(
        frame_length=frames.frame_length,
        source_sample_rate=frames.source_sample_rate,
        target_sample_rate=frames.target_sample_rate,
    )


def _nemo_source(path: str, overrides: Sequence[str]) -> ModelSource:
    """A NeMo save_pretrained dir; `overrides` may change `model.*` keys (e.g. model.pretrained_llm=/local/llm)."""
    from omegaconf import OmegaConf

    from orchestrator.config.overrides import OverrideError, apply_overrides
    from speech_models.nemo_format import read_nemo_dir
    from speech_models.typed_data import build

    if bad := [o for o in overrides if not o.lstrip("+~").startswith("model.")]:
        raise SourceError(f"{path} is a NeMo checkpoint: only model.* keys can be overridden, not {bad}")
    named = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in overrides if "=" in o}
    try:
        checkpoint = read_nemo_dir(
            path,
            pretrained_llm=named.get("model.pretrained_llm"),
            pretrained_audio_codec=named.get("model.pretrained_audio_codec"),
        )
        raw = OmegaConf.create({"model": dataclasses.asdict(checkpoint.model)})
        apply_overrides(raw, list(overrides))
    except (OSError, ValueError, OverrideError) as exc:
        raise SourceError(str(exc)) from None
    problems: list[str] = []
    model_cfg = build(ModelConfig, OmegaConf.to_container(raw)["model"], "model", problems)
    if problems:
        raise SourceError(f"{path}: " + "; ".join(problems))
    for note in checkpoint.notes:
        logger.info("%s: %s", path, note)
    return ModelSource("nemo", path, model_cfg, _data_config(checkpoint.frames), PromptDefaults())


def _local_model_dir(path: str) -> str:
    """`path` as an absolute local directory; a hub repo id ('org/name') is downloaded first."""
    if Path(path).exists():
        return str(Path(path).resolve())
    if path.count("/") == 1 and not path.startswith((".", "/")):
        from speech_models.pretrained import resolve_model_dir

        try:
            return str(resolve_model_dir(path))
        except FileNotFoundError as exc:
            raise SourceError(str(exc)) from None
    raise SourceError(f"{path}: no such file or directory")


def resolve_source(path: str, which: Which = "best", overrides: Sequence[str] = ()) -> ModelSource:
    """A checkpoint dir, a run dir (its best or latest checkpoint by exp_manager's monitor), an exported dir, or
    a NeMo speechlm2 checkpoint dir (local, or a hub repo id such as a released speechlm2 model).

    `overrides` (key=value) change the saved config, e.g. model.pretrained_llm=/new/path when the checkpoint moved
    to a machine where the pretrained sources live elsewhere, or a NeMo checkpoint names its LLM by hub id.
    """
    from speech_models.nemo_format import is_nemo_dir

    path = str(path)
    if not is_url(path):
        path = _local_model_dir(path)
        if is_exported_dir(path):
            if overrides:
                raise SourceError(f"{path} is an exported model; overrides only apply to checkpoints")
            exported = read_exported_config(path)
            return ModelSource("export", path, exported.model, _data_config(exported.data), exported.prompt)
        if is_nemo_dir(path):
            return _nemo_source(path, overrides)
    if checkpoints.is_checkpoint(path):
        return _checkpoint_source(path, overrides, None)
    return _pick_checkpoint(path, which, overrides)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_model(
    source: ModelSource, device: str | torch.device = "cpu", apply_precision: bool = True
) -> tuple[torch.nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """The model of `source` on `device` in eval mode, and the autocast context validation ran it under.

    With `apply_precision` (default) the checkpoint's trainer.precision is applied as in training (cast for
    *-true, autocast for *-mixed); without it the model stays in fp32. The model prompts as it was validated
    (`model.prompt_defaults`).
    """
    device = torch.device(device)
    if source.kind == "export":
        from speech_models.pretrained import from_pretrained

        return from_pretrained(source.path, device=device), contextlib.nullcontext
    if source.kind == "nemo":
        from speech_models.nemo_format import load_nemo_weights

        model = source.entry.build(source.model_cfg, source.data_cfg)
        try:
            load_nemo_weights(model, source.path, source.entry.name)
        except ValueError as exc:
            raise SourceError(str(exc)) from None
        return model.to(device).eval(), contextlib.nullcontext
    with checkpoints.local_copy(source.path) as local:
        # The training loop seeds before building, so weights that are neither pretrained nor trainable (e.g.
        # a frozen random-init module) come out the same here, where the checkpoint does not hold them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            model = source.entry.build(source.model_cfg, source.data_cfg)
        try:
            checkpoints.check_weights(local, model)
            checkpoints.load_model_weights(local, model)
        except CheckpointError as exc:
            raise SourceError(str(exc)) from None
    model.prompt_defaults = source.prompt
    model.to(device)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if apply_precision and source.precision not in ("32", "32-true"):
        from speech_models.precision import setup_precision

        autocast = setup_precision(model, source.precision, device)
    return model.eval(), autocast


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that this machine has; SourceError naming the fix otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SourceError(f"--device {device!r} is not a device ({exc}); use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SourceError(
                f"--device {device}: PyTorch sees no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                "use --device cpu, or install a CUDA build of PyTorch on a GPU machine"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SourceError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 ...)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SourceError(f"--device {device}: MPS is not available here; use --device cpu")
    return parsed


def input_sample_rate(model: torch.nn.Module) -> int:
    """The rate the model expects its input (user) audio at."""
    rate = getattr(model, "source_sample_rate", None)
    return int(rate) if rate is not None else int(model.perception.cfg.preprocessor.sample_rate)


def describe(source: ModelSource) -> str:
    """One line about the model that is being used."""
    what = f"{source.entry.name} {source.kind} {source.path}"
    if source.step is not None:
        what += f" (step {source.step}"
        headline = source.entry.text_metric
        keys = ["val_loss"] + ([f"val_{headline.name}"] if headline else [])
        shown = {k: v for k, v in source.metrics.items() if k in keys}
        what += "".join(f", {k} {v:.4g}" for k, v in shown.items()) + ")"
    return what
