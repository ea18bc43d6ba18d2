"""Trained models outside training: find them (checkpoint, run dir or exported dir), load them, run them on audio.

`speechlm eval`, `speechlm infer` and `speechlm export` all start here:

    resolve_source(PATH)  ->  ModelSource (config only: cheap, picklable, sent to Ray actors)
    load_model(source)    ->  the model in eval mode, exactly as validation saw it (same seed for weights the
                              checkpoint does not hold, same precision), plus its autocast context
    infer(...)            ->  SALM: transcript / answer per audio file; duplex: agent text + agent WAV file

A checkpoint keeps only trainable weights, so loading one rebuilds the frozen parts from the `pretrained_*`
sources named in its config.yaml; an exported directory needs none of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from orchestrator import storage
from orchestrator.config import DataConfig, DatasetConfig, ExperimentConfig
from orchestrator.config.schema import InputConfig
from speech_models.config import ModelConfig
from speech_models.pretrained import AudioFrames, PromptDefaults, is_exported_dir, read_exported_config

logger = logging.getLogger(__name__)

Which = Literal["best", "latest"]


_EMPTY_CHECKPOINT_HINT = (
    "Checkpoints of multi-worker (DDP) runs came out empty while orchestrator.checkpointing._kept_model_state "
    "compared DDP's 'module.'-prefixed parameter names with the unprefixed state-dict keys; retrain once that "
    "is fixed (single-worker runs were not affected)."
)


class SourceError(ValueError):
    """A path that is not a checkpoint, run dir or exported model, or a checkpoint that cannot be used."""


# ----------------------------------------------------------------------------------------------
# Where the model comes from
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """A trained model, described without loading it."""

    kind: Literal["checkpoint", "export"]
    path: str  # a step=... checkpoint dir (local or URL) or an exported dir
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
    def model_type(self) -> str:
        return self.model_cfg.resolved_model_type()

    @property
    def label(self) -> str:
        """Short name for logs and output dirs, e.g. 'learn1/step=0000400'."""
        parts = self.path.rstrip("/").split("/")
        return "/".join(parts[-2:]) if self.kind == "checkpoint" else parts[-1]


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _prompt_dataset(cfg: ExperimentConfig) -> DatasetConfig:
    """The dataset whose prompt (context tag, system prompt, format) the model was validated with."""
    from orchestrator.data.pipeline import validation_sets

    sets = validation_sets(cfg.data)
    return next(iter(sets.values())) if sets else cfg.data.train_ds


def prompt_defaults(model_cfg: ModelConfig, data_cfg: Any, dataset_cfg: Any) -> PromptDefaults:
    """The prompt SALMCollator builds for `dataset_cfg` (duplex models have none)."""
    if model_cfg.resolved_model_type() != "salm":
        return PromptDefaults()
    from speech_models.salm import SALMCollator

    collator = SALMCollator(model_cfg, data_cfg, dataset_cfg)
    return PromptDefaults(collator.context, collator.system_prompt, collator.prompt_format)


def _checkpoint_source(path: str, overrides: Sequence[str], run_dir: str | None, check: bool = True) -> ModelSource:
    import yaml

    from orchestrator.checkpointing import CONFIG_FILE, FORMAT_VERSION, STATE_FILE
    from orchestrator.config import experiment_from_dict

    state = json.loads(storage.read_text(_join(path, STATE_FILE)))
    if state.get("format_version") != FORMAT_VERSION:
        raise SourceError(f"{path}: checkpoint format {state.get('format_version')} is not {FORMAT_VERSION}")
    if not storage.exists(_join(path, CONFIG_FILE)):
        raise SourceError(f"{path}: no {CONFIG_FILE}; the checkpoint cannot rebuild its model without it")
    cfg = experiment_from_dict(
        yaml.safe_load(storage.read_text(_join(path, CONFIG_FILE))), list(overrides), source=_join(path, CONFIG_FILE)
    ).cfg
    if check and "://" not in path:
        _check_not_empty(Path(path))
    return ModelSource(
        kind="checkpoint",
        path=path,
        model_cfg=cfg.model,
        data_cfg=cfg.data,
        prompt=prompt_defaults(cfg.model, cfg.data, _prompt_dataset(cfg)),
        precision=cfg.trainer.precision,
        seed=cfg.trainer.seed,
        step=int(state["step"]),
        metrics=dict(state.get("metrics", {})),
        run_dir=run_dir or path.rstrip("/").rpartition("/")[0] or ".",
        experiment=cfg,
    )


def _check_not_empty(directory: Path) -> None:
    """Fail before building anything when a checkpoint holds no weights at all (see `check_weights`)."""
    from safetensors import safe_open

    from orchestrator.checkpointing import WEIGHTS_FILE

    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
        if not list(f.keys()):
            raise SourceError(
                f"{directory / WEIGHTS_FILE} holds no tensors, so this checkpoint cannot reproduce the trained "
                f"model. {_EMPTY_CHECKPOINT_HINT}"
            )


def _pick_checkpoint(run_dir: str, which: Which, overrides: Sequence[str]) -> ModelSource:
    checkpoints = storage.list_checkpoints(run_dir)
    if not checkpoints:
        raise SourceError(
            f"{run_dir} is not a checkpoint (no state.json), an exported model (no speechlm_config.yaml) "
            "or a run directory with step=... checkpoints; point at one of those"
        )
    latest = _checkpoint_source(checkpoints[-1][1], overrides, run_dir, check=which == "latest")
    if which == "latest":
        return latest
    params = latest.experiment.exp_manager.checkpoint_callback_params
    scored = []
    for step, path in checkpoints:
        metrics = json.loads(storage.read_text(_join(path, "state.json"))).get("metrics", {})
        if params.monitor in metrics:
            scored.append((float(metrics[params.monitor]), step, path))
    if not scored:
        logger.info("no checkpoint of %s reports %s; using the latest", run_dir, params.monitor)
        return _checkpoint_source(latest.path, overrides, run_dir)
    # Ties go to the later step.
    best = min(scored, key=lambda s: (s[0], -s[1])) if params.mode == "min" else max(scored, key=lambda s: s[:2])
    return _checkpoint_source(best[2], overrides, run_dir)


def resolve_source(path: str, which: Which = "best", overrides: Sequence[str] = ()) -> ModelSource:
    """A checkpoint dir, a run dir (its best or latest checkpoint by exp_manager's monitor), or an exported dir.

    `overrides` (key=value, checkpoints only) change the saved config, e.g. model.pretrained_llm=/new/path
    when the checkpoint moved to a machine where the pretrained sources live elsewhere.
    """
    path = str(path)
    if "://" not in path:
        if not Path(path).exists():
            raise SourceError(f"{path}: no such file or directory")
        path = str(Path(path).resolve())
        if is_exported_dir(path):
            if overrides:
                raise SourceError(f"{path} is an exported model; overrides only apply to checkpoints")
            exported = read_exported_config(path)
            frames = exported.data
            data_cfg = DataConfig(
                frame_length=frames.frame_length,
                source_sample_rate=frames.source_sample_rate,
                target_sample_rate=frames.target_sample_rate,
            )
            return ModelSource("export", path, exported.model, data_cfg, exported.prompt)
    if storage.exists(_join(path, "state.json")):
        return _checkpoint_source(path, overrides, None)
    return _pick_checkpoint(path, which, overrides)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _local_dir(path: str):
    """A local directory with the checkpoint's files (a temporary copy for object-store URLs)."""
    if "://" not in path:
        yield Path(path)
        return
    from orchestrator.object_storage import read_bytes

    with tempfile.TemporaryDirectory(prefix="speechlm-ckpt-") as tmp:
        for name in ("weights.safetensors", "state.json", "config.yaml"):
            (Path(tmp) / name).write_bytes(read_bytes(_join(path, name)))
        yield Path(tmp)


def check_weights(directory: Path, model: torch.nn.Module) -> None:
    """Every trainable parameter must be in the checkpoint: a checkpoint that lacks some would silently
    leave them at their random (or pretrained) initial values."""
    from safetensors import safe_open

    from orchestrator.checkpointing import WEIGHTS_FILE

    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
        saved = set(f.keys())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name in trainable if name not in saved]
    if missing:
        raise SourceError(
            f"{directory}: {WEIGHTS_FILE} holds {len(saved)} tensors but {len(missing)} of the model's "
            f"{len(trainable)} trainable parameters are missing (e.g. {missing[:3]}), so it cannot reproduce the "
            f"trained model. {_EMPTY_CHECKPOINT_HINT}"
        )


def load_model(
    source: ModelSource, device: str | torch.device = "cpu", apply_precision: bool = True
) -> tuple[torch.nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """The model of `source` on `device` in eval mode, and the autocast context validation ran it under.

    With `apply_precision` (default) the checkpoint's trainer.precision is applied as in training (cast for
    *-true, autocast for *-mixed); without it the model stays in fp32.
    """
    device = torch.device(device)
    if source.kind == "export":
        from speech_models.pretrained import from_pretrained

        return from_pretrained(source.path, device=device), contextlib.nullcontext
    from orchestrator.checkpointing import load_model_weights
    from speech_models.registry import build_model

    with _local_dir(source.path) as local:
        # The training loop seeds before building, so weights that are neither pretrained nor trainable (e.g.
        # a frozen random-init module) come out the same here, where the checkpoint does not hold them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            model = build_model(source.model_cfg, source.data_cfg)
        check_weights(local, model)
        load_model_weights(local, model)
    model.to(device)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if apply_precision and source.precision not in ("32", "32-true"):
        from orchestrator.loop import setup_precision

        autocast = setup_precision(model, source.precision, device)
    return model.eval(), autocast


def write_checkpoint(
    directory: str | Path, model: torch.nn.Module, cfg: ExperimentConfig, step: int = 0, metrics: dict | None = None
) -> Path:
    """Write `model` as a checkpoint exactly as the training loop's rank 0 does (`save_checkpoint`, with the
    optimizer `cfg` names): for tests, benchmarks, and bringing a model trained elsewhere into this format."""
    from orchestrator.checkpointing import TrainingState, save_checkpoint
    from orchestrator.config import to_yaml
    from orchestrator.loop import setup_optimizer

    directory = Path(directory)
    optimizer, scheduler = setup_optimizer(model, cfg)
    state = TrainingState(step=step, metrics=dict(metrics or {}))
    save_checkpoint(directory, model, optimizer, scheduler, state, to_yaml(cfg), write_model=True, rank=0)
    return directory


# ----------------------------------------------------------------------------------------------
# Inference on audio files
# ----------------------------------------------------------------------------------------------


@dataclass
class InferResult:
    audio_path: str
    text: str
    output_audio: str | None = None  # duplex: the agent's speech as a WAV file
    seconds: float = 0.0  # processing time of the batch this file was in, shared out by audio length
    audio_seconds: float = 0.0


def input_sample_rate(model: torch.nn.Module) -> int:
    """The rate the model expects its input (user) audio at."""
    rate = getattr(model, "source_sample_rate", None)
    return int(rate) if rate is not None else int(model.perception.cfg.preprocessor.sample_rate)


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """An audio file as float32 mono at `sample_rate`, decoded and resampled as the data pipeline does."""
    from orchestrator.data.pipeline import decode_audio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    return decode_audio(path.read_bytes(), None, sample_rate)


def salm_collator(source: ModelSource, prompt: str | None = None, system_prompt: str | None = None) -> Any:
    """SALMCollator for free-form prompts: `prompt` goes before the audio tag in the user turn, as training's
    `context` tag did (None: the prompt training used)."""
    from speech_models.salm import SALMCollator

    defaults = source.prompt
    tags = {
        "context": prompt if prompt is not None else defaults.context,
        "system_prompt": system_prompt if system_prompt is not None else defaults.system_prompt,
    }
    dataset_cfg = DatasetConfig(
        input_cfg=[InputConfig(shar_path="-", tags={k: v for k, v in tags.items() if v})],
        prompt_format=defaults.prompt_format,
    )
    return SALMCollator(source.model_cfg, source.data_cfg, dataset_cfg)


def _unique_wav_path(out_dir: Path, stem: str, taken: set[Path]) -> Path:
    path, n = out_dir / f"{stem}.agent.wav", 1
    while path in taken:
        n += 1
        path = out_dir / f"{stem}.agent{n}.wav"
    taken.add(path)
    return path


def transcribe(
    model: torch.nn.Module,
    autocast: Callable[[], contextlib.AbstractContextManager],
    collator: Any,
    audios: Sequence[np.ndarray],
    max_new_tokens: int | None = None,
) -> list[str]:
    """SALM: generated text for each waveform (at the model's input rate), prompted by `collator`."""
    from speech_models.salm import DEFAULT_MAX_NEW_TOKENS

    if not audios:
        return []
    batch = collator([{"id": str(i), "audio": a, "text": ""} for i, a in enumerate(audios)])
    with torch.no_grad(), autocast():
        _, texts = model.generate(
            batch["prompt_ids"],
            batch["audios"],
            batch["audio_lens"],
            max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        )
    return texts


def respond(
    model: torch.nn.Module, autocast: Callable[[], contextlib.AbstractContextManager], audios: Sequence[np.ndarray]
) -> tuple[list[str], list[np.ndarray]]:
    """Duplex: the agent's text and speech (float32 at data.target_sample_rate) for each user waveform."""
    lens = np.array([len(a) for a in audios], dtype=np.int64)
    signal = np.zeros((len(audios), int(lens.max())), dtype=np.float32)  # (B, T) zero-padded
    for row, a in enumerate(audios):
        signal[row, : len(a)] = a
    with torch.no_grad(), autocast():
        output = model.offline_inference(signal, lens, decode_audio=True)
    waves = output["audio"].float().cpu().numpy()
    return output["text"], [w[:n] for w, n in zip(waves, output["audio_len"].tolist(), strict=True)]


def infer(
    source: ModelSource,
    audio_paths: Sequence[str | Path],
    *,
    prompt: str | None = None,
    system_prompt: str | None = None,
    out_dir: str | Path = ".",
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    loaded: tuple[torch.nn.Module, Callable] | None = None,
) -> list[InferResult]:
    """SALM: the generated text per file (a transcript, or an answer to `prompt`). Duplex: the agent's text
    and its speech, written to `out_dir/<stem>.agent.wav` at data.target_sample_rate."""
    import soundfile as sf

    is_salm = source.model_type == "salm"
    if not is_salm and (prompt or system_prompt):
        raise SourceError("--prompt / --system-prompt only apply to SALM models; duplex models listen, not read")
    model, autocast = loaded or load_model(source, device)
    rate = input_sample_rate(model)
    audios = [read_audio(p, rate) for p in audio_paths]
    collator = salm_collator(source, prompt, system_prompt) if is_salm else None
    if collator is not None:
        collator._tokenizer = model.tokenizer  # the model's own tokenizer (an export carries its own)
    out = Path(out_dir)
    taken: set[Path] = set()
    results: list[InferResult] = []
    for start in range(0, len(audios), batch_size):
        chunk, paths = audios[start : start + batch_size], list(audio_paths[start : start + batch_size])
        began = time.perf_counter()
        if collator is not None:
            texts, speech = transcribe(model, autocast, collator, chunk, max_new_tokens), None
        else:
            texts, speech = respond(model, autocast, chunk)
        seconds = time.perf_counter() - began
        total = sum(len(a) for a in chunk) / rate
        for i, (path, text) in enumerate(zip(paths, texts, strict=True)):
            audio_seconds = len(chunk[i]) / rate
            result = InferResult(str(path), text, None, seconds * audio_seconds / max(total, 1e-9), audio_seconds)
            if speech is not None:
                out.mkdir(parents=True, exist_ok=True)
                wav_path = _unique_wav_path(out, Path(path).stem, taken)
                wav = np.clip(speech[i], -1.0, 1.0)
                sf.write(str(wav_path), wav, int(model.target_sample_rate), subtype="PCM_16")
                result.output_audio = str(wav_path)
            results.append(result)
    return results


def describe(source: ModelSource) -> str:
    """One line about the model that is being used."""
    what = f"{source.model_type} {source.kind} {source.path}"
    if source.step is not None:
        what += f" (step {source.step}"
        shown = {k: v for k, v in source.metrics.items() if k in ("val_wer", "val_txt_bleu", "val_loss")}
        what += "".join(f", {k} {v:.4g}" for k, v in shown.items()) + ")"
    return what


def frames_of(source: ModelSource) -> AudioFrames:
    d = source.data_cfg
    return AudioFrames(float(d.frame_length), int(d.source_sample_rate), int(d.target_sample_rate))
