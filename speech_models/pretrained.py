"""Model directories: this project's self-contained exports (`save_pretrained(model, dir)`), NeMo's
`save_pretrained` directories (`speech_models.nemo_format`), `from_pretrained(dir)` for both, and
`init_from_checkpoint` (NeMo's key: start a model from the weights of either kind of directory).

A training checkpoint keeps only the trainable weights and rebuilds the frozen ones from the `pretrained_*`
sources. An exported directory needs none of them: it holds every weight and every config needed to rebuild
the model with `from_config` (no hub, no original LLM/ASR directory):

    DIR/
      config.json            what the directory is (class, format version, sizes), Hugging Face style
      speechlm_config.yaml   the project's `model:` config, made self-contained (paths point inside DIR,
                             perception resolved, pretrained_weights false, no init_from_checkpoint), plus the
                             frame/sample rates and the default prompt (context, system prompt)
      model.safetensors      ALL weights: perception, embed_tokens, LLM (LoRA merged or not), heads, decoder
      llm/                   the LLM's config.json (+ generation_config.json) and the tokenizer files
      audio_codec/           duplex models only: the frozen codec, saved with its own `save_pretrained`

`SALM.from_pretrained(DIR)`, `DuplexS2SModel.from_pretrained(DIR)` and
`DuplexS2SSpeechDecoderModel.from_pretrained(DIR)` delegate here; DIR may also be a NeMo directory or a hub id.

Format version 2 (NeMo's parameter and buffer names, NeMo's speech decoder) replaced version 1, whose exports
must be made again from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from speech_models.config import AudioFrames, ModelConfig, PromptDefaults
from speech_models.typed_data import build

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
SPEECHLM_CONFIG_FILE = "speechlm_config.yaml"
WEIGHTS_FILE = "model.safetensors"
LLM_DIR = "llm"
CODEC_DIR = "audio_codec"
_TIED_KEY = "speechlm.tied"  # safetensors metadata: {alias: saved name} for tensors that share storage


@dataclass
class ExportedConfig:
    """Contents of `speechlm_config.yaml`."""

    model: ModelConfig
    data: AudioFrames = field(default_factory=AudioFrames)
    prompt: PromptDefaults = field(default_factory=PromptDefaults)
    format_version: int = FORMAT_VERSION


def read_exported_config(directory: str | Path) -> ExportedConfig:
    """`speechlm_config.yaml` of an exported directory, with its paths made absolute."""
    import yaml

    directory = Path(directory)
    path = directory / SPEECHLM_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an exported model directory (no {SPEECHLM_CONFIG_FILE}); make one with "
            "`speechlm export CHECKPOINT --out DIR`"
        )
    data = yaml.safe_load(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {data.get('format_version')} is not {FORMAT_VERSION}; export the model again "
            "from its checkpoint with this version (`speechlm export CHECKPOINT --out DIR`)"
        )
    problems: list[str] = []
    exported = build(ExportedConfig, data, "", problems)
    if problems:
        raise ValueError(
            f"{path} does not match this version of speech_models ({'; '.join(problems)}); the directory was "
            "written by another version or edited"
        )
    model = exported.model
    exported.model = dataclasses.replace(
        model,
        pretrained_llm=str(directory / model.pretrained_llm),
        pretrained_audio_codec=str(directory / model.pretrained_audio_codec) if model.pretrained_audio_codec else None,
    )
    return exported


def is_exported_dir(directory: str | Path) -> bool:
    return (Path(directory) / SPEECHLM_CONFIG_FILE).is_file() and (Path(directory) / CONFIG_FILE).is_file()


# ----------------------------------------------------------------------------------------------
# Weights with shared tensors (tied embeddings) saved once
# ----------------------------------------------------------------------------------------------


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors sharing storage (e.g. a tied LM head) are saved once; returns (unique tensors, alias -> name)."""
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor.detach().contiguous().cpu()
    return unique, aliases


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors with tied aliases restored (this project's exports store shared tensors once)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(_TIED_KEY, "{}"))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def _load_weights(directory: Path, model: nn.Module) -> None:
    path = directory / WEIGHTS_FILE
    result = model.load_state_dict(_read_weights(path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit the model its config builds: {len(result.missing_keys)} missing tensors "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]}); the directory is incomplete or was edited"
        )


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a model, under the peft wrapper when LoRA is installed."""
    return model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm


def has_lora(model: nn.Module) -> bool:
    return hasattr(model.llm, "get_base_model")


def merge_lora(model: nn.Module) -> bool:
    """Merge LoRA adapters into the LLM weights in place and drop the peft wrapper; False if there were none.

    Afterwards `model.cfg.lora` is None, so the config and the weights keep describing the same model.
    """
    if not has_lora(model):
        return False
    model.llm = model.llm.merge_and_unload()
    model.cfg = dataclasses.replace(model.cfg, lora=None)
    return True


def match_mode(path: Path, like: Path) -> Path:
    """Give `path` the permissions of `like`, a sibling written with a plain `open()` (0644 under the usual
    umask): safetensors writes its files 0600, which left model.safetensors unreadable to those who can read
    every other file of an export."""
    path.chmod(like.stat().st_mode & 0o777)
    return path


def _model_class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    prompt: PromptDefaults | None = None,
    data: AudioFrames | None = None,
) -> Path:
    """Write `model` (SALM or a duplex model, LoRA merged or not) as a self-contained directory.

    `prompt`: the default prompt to record (training's context / system prompt). `data`: frame and sample
    rates; taken from the model itself for duplex models. The directory must be empty or not exist.
    """
    import yaml
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; pick a new directory or remove it")
    directory.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.cfg
    lm = causal_lm(model)
    model_type = cfg.resolved_model_type()
    if data is None:
        data = AudioFrames(
            frame_length=float(getattr(model, "frame_length", AudioFrames.frame_length)),
            source_sample_rate=int(getattr(model, "source_sample_rate", model.perception.cfg.preprocessor.sample_rate)),
            target_sample_rate=int(getattr(model, "target_sample_rate", AudioFrames.target_sample_rate)),
        )

    # LLM config and tokenizer: enough for `from_config` (vocab_size already counts added tokens).
    lm.config.save_pretrained(directory / LLM_DIR)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(directory / LLM_DIR)
    model.tokenizer.save_pretrained(directory / LLM_DIR)
    codec_dir = None
    if getattr(model, "audio_codec", None) is not None:
        model.audio_codec.model.save_pretrained(directory / CODEC_DIR, safe_serialization=True)
        codec_dir = CODEC_DIR

    exported = ExportedConfig(
        model=dataclasses.replace(
            cfg,
            pretrained_llm=LLM_DIR,
            pretrained_asr=None,  # the perception weights are in model.safetensors
            pretrained_audio_codec=codec_dir,
            scoring_asr=None,
            pretrained_weights=False,
            init_from_checkpoint=None,  # the weights are all here
            tokenizer_path=None,  # saved in llm/ with the LLM config
            model_type=model_type,
            lora=cfg.lora if has_lora(model) else None,
            perception=model.perception.cfg,  # resolved: a pretrained ASR's architecture merged in
        ),
        data=data,
        prompt=prompt or PromptDefaults(),
    )
    (directory / SPEECHLM_CONFIG_FILE).write_text(
        "# Written by speech_models.pretrained.save_pretrained; load with <ModelClass>.from_pretrained(DIR).\n"
        + yaml.safe_dump(dataclasses.asdict(exported), sort_keys=False)
    )

    tensors, aliases = _dedupe(model.state_dict())  # the codec drops itself from state_dict (own subdir)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", _TIED_KEY: json.dumps(aliases)})
    match_mode(directory / WEIGHTS_FILE, like=directory / SPEECHLM_CONFIG_FILE)

    text_config = lm.config.get_text_config()
    info = {
        "architectures": [type(model).__name__],
        "model_type": f"speechlm_{model_type}",
        "speechlm_model_class": _model_class_path(model),
        "speechlm_format_version": FORMAT_VERSION,
        "hidden_size": int(text_config.hidden_size),
        "vocab_size": int(model.embed_tokens.num_embeddings),
        "llm_model_type": lm.config.model_type,
        "lora": "unmerged" if has_lora(model) else "none",
        "audio_codec": codec_dir,
        "source_sample_rate": data.source_sample_rate,
        "target_sample_rate": data.target_sample_rate if codec_dir else None,
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return directory


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def _model_class(directory: Path) -> type:
    info = json.loads((directory / CONFIG_FILE).read_text())
    class_path = info.get("speechlm_model_class", "")
    module_name, _, name = class_path.partition(":")
    if not module_name.startswith("speech_models."):  # never import arbitrary code named by a file
        raise ValueError(f"{directory / CONFIG_FILE}: speechlm_model_class {class_path!r} is not a speech_models class")
    return getattr(importlib.import_module(module_name), name)


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local model directory, or a hub repo id downloaded (with the Hugging Face cache) to one."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: not a model directory (nor a hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path)))
    except Exception as exc:  # offline, unknown repo, no access: say which and how to get around it
        raise FileNotFoundError(
            f"{name_or_path}: no such local directory, and the hub repo could not be fetched "
            f"({type(exc).__name__}: {exc}); download it first (huggingface-cli download) and pass the directory"
        ) from exc


def from_pretrained(
    directory: str | Path,
    expected_class: type | None = None,
    device: str | torch.device = "cpu",
    pretrained_llm: str | None = None,
    pretrained_audio_codec: str | None = None,
):
    """Rebuild the model saved in `directory` (an export of this project or a NeMo `save_pretrained` dir, local or
    a hub id), in eval mode, with no pretrained source but the LLM config and tokenizer a NeMo dir may name.

    `expected_class` (e.g. SALM when called as `SALM.from_pretrained`): the saved class must be it or a subclass.
    `pretrained_llm` / `pretrained_audio_codec`: replace a NeMo checkpoint's (see `nemo_format.read_nemo_dir`).
    """
    from speech_models import nemo_format
    from speech_models.registry import build_model

    directory = resolve_model_dir(directory)
    if nemo_format.is_nemo_dir(directory):
        model = nemo_format.load_nemo_model(directory, pretrained_llm, pretrained_audio_codec)
        _check_class(directory, type(model), expected_class)
        return model.to(device)
    if pretrained_llm is not None or pretrained_audio_codec is not None:
        raise ValueError(
            f"{directory} is a self-contained export; pretrained_llm / pretrained_audio_codec cannot change"
        )
    exported = read_exported_config(directory)
    saved_class = _model_class(directory)
    _check_class(directory, saved_class, expected_class)
    model = build_model(exported.model, exported.data)
    if type(model) is not saved_class:
        raise TypeError(
            f"{directory}: config builds a {type(model).__name__} but the weights are a {saved_class.__name__}"
        )
    _load_weights(directory, model)
    model.prompt_defaults = exported.prompt  # how `transcribe` prompts unless told otherwise
    return model.to(device).eval()


def _check_class(directory: Path, saved_class: type, expected_class: type | None) -> None:
    if expected_class is not None and not issubclass(saved_class, expected_class):
        raise TypeError(
            f"{directory} holds a {saved_class.__name__}, not a {expected_class.__name__}; load it with "
            f"{saved_class.__name__}.from_pretrained"
        )


# ----------------------------------------------------------------------------------------------
# init_from_checkpoint: start a model from another directory's weights (NeMo's key)
# ----------------------------------------------------------------------------------------------


def init_from_checkpoint(model: nn.Module, name_or_path: str) -> None:
    """Copy the weights of a model directory (NeMo `save_pretrained` or `speechlm export`) into `model`, by name.

    NeMo's semantics (`model.init_from_checkpoint`): tensors whose shape differs from the model's are skipped with
    a warning; the model's other tensors keep what building gave them. Names are matched without peft's wrapping,
    so a checkpoint saved with LoRA merged (plain names) starts a LoRA model, and the other way round (its LoRA
    tensors are then reported as unused).
    """
    from speech_models.freezing import canonical_param_name

    directory = resolve_model_dir(name_or_path)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"model.init_from_checkpoint={name_or_path!r}: {path} does not exist; give a NeMo save_pretrained "
            "directory or a `speechlm export` directory"
        )
    own = model.state_dict()
    by_canonical = {canonical_param_name(name): name for name in own}
    selected: dict[str, torch.Tensor] = {}
    wrong_shape, unused = [], []
    for name, tensor in _read_weights(path).items():
        target = by_canonical.get(canonical_param_name(name))
        if target is None:
            unused.append(name)
        elif tuple(tensor.shape) != tuple(own[target].shape):
            wrong_shape.append(f"{name} {tuple(tensor.shape)} vs {tuple(own[target].shape)}")
        else:
            selected[target] = tensor
    model.load_state_dict(selected, strict=False)
    untouched = [name for name in own if name not in selected]
    logger.info("init_from_checkpoint %s: %d of %d tensors loaded", directory, len(selected), len(own))
    if wrong_shape:
        logger.warning(
            "init_from_checkpoint %s: %d tensors skipped, shape differs: %s",
            directory,
            len(wrong_shape),
            wrong_shape[:5],
        )
    if unused:
        logger.warning(
            "init_from_checkpoint %s: %d tensors have no counterpart here, e.g. %s", directory, len(unused), unused[:5]
        )
    if untouched:
        logger.info(
            "init_from_checkpoint %s: %d tensors keep their initial values, e.g. %s",
            directory,
            len(untouched),
            untouched[:5],
        )
