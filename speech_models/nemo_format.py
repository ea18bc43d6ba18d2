"""NeMo speechlm2 checkpoint directories: read them (`from_pretrained`, `init_from_checkpoint`) and write them.

NeMo's `model.save_pretrained(DIR)` (every speechlm2 model, through Hugging Face's hub mixin) writes

    DIR/config.json        the model config as the model held it (the `model:` section of the training YAML, with
                           NeMo's `_target_` class paths and a pretrained ASR's architecture merged in), plus
                           `model_type: nemo_speechlm` and `architectures`
    DIR/model.safetensors  every tensor (parameters and persistent buffers) under NeMo's names

and may hold the tokenizer files at its root and `llm_backbone/` (the LLM's config): NeMo's
`from_pretrained` then reads the tokenizer and the LLM architecture from there instead of `pretrained_llm`
(usually a hub id). This project's parameter and buffer names are NeMo's (`embed_tokens.*`, `llm.*`,
`perception.preprocessor.featurizer.*`, ...), so weights load by name, bit-exact.

What does not carry over: NeMo's audio codec (duplex models: a NeMo `AudioCodecModel`, which this project does not
re-implement; its `audio_codec.*` tensors are skipped and `pretrained_audio_codec` must name a transformers codec),
and the two tensors NeMo's speech-decoder model creates but never uses (`embed_audio_tokens.*`, `audio_head.*`).

The writer (`write_nemo_dir`, `speechlm export --format nemo`) produces NeMo's self-contained layout, which NeMo
3.0.0's `SALM.from_pretrained(DIR)` loads from any working directory without a hub.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from speech_models.config import AudioFrames, ModelConfig, PerceptionConfig
from speech_models.perception import stft_sizes, with_nemo_class_defaults
from speech_models.typed_data import build

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LLM_BACKBONE_DIR = "llm_backbone"
NEMO_MODEL_TYPE = "nemo_speechlm"
NEMO_ARCHITECTURES = ["NeMoSpeechLMForConditionalGeneration"]
HUB_KEYS = ("model_type", "architectures")  # added to config.json by NeMo's HFHubMixin
# Keys that load other weights over the model's. A checkpoint's config records them from its own training run
# (paths on another machine): executing them while loading that checkpoint would overwrite its weights.
INIT_KEYS = ("init_from_checkpoint", "pretrained_s2s_model", "pretrained_perception_from_s2s")

NEMO_TARGETS = {
    "perception": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
    "preprocessor": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
    "encoder": "nemo.collections.asr.modules.ConformerEncoder",
    "modality_adapter": "nemo.collections.asr.modules.ConformerEncoder",
    "spec_augment": "nemo.collections.asr.modules.SpectrogramAugmentation",
}
IDENTITY_ADAPTER = "IdentityConnector"


# ----------------------------------------------------------------------------------------------
# Recognise and read
# ----------------------------------------------------------------------------------------------


def read_config_json(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_nemo_dir(directory: str | Path) -> bool:
    """A NeMo speechlm2 `save_pretrained` directory: config.json says `model_type: nemo_speechlm`, or holds a
    NeMo model config (`perception` and `pretrained_llm`), next to model.safetensors."""
    directory = Path(directory)
    data = read_config_json(directory)
    if data is None or not (directory / WEIGHTS_FILE).is_file():
        return False
    return data.get("model_type") == NEMO_MODEL_TYPE or ("perception" in data and "pretrained_llm" in data)


def drop_hub_metadata(model: dict[str, Any]) -> dict[str, Any]:
    """A NeMo config.json's model section without the keys Hugging Face's hub mixin added (`model_type:
    nemo_speechlm` would otherwise read as this schema's `model.model_type`)."""
    out = dict(model)
    if out.get("model_type") == NEMO_MODEL_TYPE:
        del out["model_type"]
    out.pop("architectures", None)
    return out


@dataclass
class NemoCheckpoint:
    """A NeMo directory's model config made this project's, ready to build (`pretrained_weights` false)."""

    model: ModelConfig
    frames: AudioFrames
    notes: list[str] = field(default_factory=list)  # what was dropped or redirected, for the log


def _perception_with_nemo_defaults(perception: dict[str, Any], source: str) -> dict[str, Any]:
    """NeMo builds each perception part from its own class defaults: fill the keys the config leaves out. NeMo's
    IdentityConnector adapter with a `d_model` (NeMo then projects from that width) is this schema's null adapter."""
    out = dict(perception)
    for section in ("preprocessor", "encoder", "spec_augment"):
        if isinstance(out.get(section), dict):
            out[section] = with_nemo_class_defaults(section, out[section])
    adapter = out.get("modality_adapter")
    if not isinstance(adapter, dict):
        return out
    target = str(adapter.get("_target_") or adapter.get("target") or "")
    if target.endswith(IDENTITY_ADAPTER):
        if "d_model" not in adapter or "output_dim" in adapter:
            raise ValueError(
                f"{source}: perception.modality_adapter is NeMo's {IDENTITY_ADAPTER} without `d_model`, so NeMo built "
                "no projection to the LLM width; this project always has one, so such a checkpoint does not load"
            )
        out["modality_adapter"] = None
    elif target.endswith("ConformerEncoder"):
        out["modality_adapter"] = with_nemo_class_defaults("encoder", adapter)
    else:
        raise ValueError(
            f"{source}: perception.modality_adapter {target!r} is not supported; NeMo's ConformerEncoder or "
            f"{IDENTITY_ADAPTER} (with d_model) are"
        )
    return out


def _redirect_local_artifacts(raw: dict[str, Any], directory: Path, notes: list[str]) -> None:
    """NeMo's `_inject_local_artifact_paths`: the directory's own tokenizer and LLM config win over the names."""
    if (directory / "tokenizer_config.json").is_file():
        raw["tokenizer_path"] = str(directory)
        notes.append(f"tokenizer from {directory}")
    if (directory / LLM_BACKBONE_DIR / "config.json").is_file():
        raw["pretrained_llm"] = str(directory / LLM_BACKBONE_DIR)
        notes.append(f"LLM architecture from {directory / LLM_BACKBONE_DIR}")


def frames_of(perception: PerceptionConfig, target_sample_rate: int = AudioFrames.target_sample_rate) -> AudioFrames:
    """Frame length and sample rates a perception config implies (a NeMo config holds no `data` section)."""
    _, hop, _ = stft_sizes(perception.preprocessor)
    factor = perception.encoder.subsampling_factor
    if perception.modality_adapter is not None:
        factor *= max(perception.modality_adapter.subsampling_factor, 1)
    rate = perception.preprocessor.sample_rate
    return AudioFrames(frame_length=hop * factor / rate, source_sample_rate=rate, target_sample_rate=target_sample_rate)


def read_nemo_dir(
    directory: str | Path,
    pretrained_llm: str | None = None,
    pretrained_audio_codec: str | None = None,
    target_sample_rate: int = AudioFrames.target_sample_rate,
) -> NemoCheckpoint:
    """config.json of a NeMo directory -> this project's ModelConfig, as NeMo's `from_pretrained` would use it.

    As NeMo: `pretrained_weights` becomes false (no LLM or ASR weights are read; model.safetensors has them all);
    the directory's tokenizer files and `llm_backbone/` replace `tokenizer_path` / `pretrained_llm`.
    `pretrained_llm` (a local dir of the same LLM, when the checkpoint names a hub id) overrides both names.
    Keys that would load other weights (`init_from_checkpoint`, ...) are dropped, never executed. Duplex models
    need `pretrained_audio_codec`: NeMo's own codec (a NeMo `.nemo`) is not implemented here.
    """
    directory = Path(directory)
    source = str(directory / CONFIG_FILE)
    data = read_config_json(directory)
    if data is None:
        raise FileNotFoundError(f"{directory}: no readable {CONFIG_FILE}; not a NeMo speechlm2 checkpoint directory")
    raw = drop_hub_metadata(data)
    notes: list[str] = []
    for key in INIT_KEYS:
        if raw.pop(key, None):
            notes.append(f"{key} dropped (the weights are in {WEIGHTS_FILE})")
    raw["pretrained_weights"] = False
    raw["pretrained_asr"] = None  # the perception architecture is in the config, its weights in the directory
    raw["scoring_asr"] = None  # validation-only, and usually a NeMo model name; `speechlm eval --scoring-asr`
    if isinstance(raw.get("perception"), dict):
        raw["perception"] = _perception_with_nemo_defaults(raw["perception"], source)
    _redirect_local_artifacts(raw, directory, notes)
    if pretrained_llm is not None:
        raw["pretrained_llm"] = pretrained_llm
        if raw.get("tokenizer_path") != str(directory):  # the checkpoint's own tokenizer files still win
            raw["tokenizer_path"] = None
        notes.append(f"pretrained_llm overridden: {pretrained_llm}")
    if raw.get("pretrained_audio_codec") is not None or raw.get("speech_decoder") is not None:
        if pretrained_audio_codec is None:  # NeMo's duplex models always hold a NeMo AudioCodecModel
            raise ValueError(
                f"{source}: a NeMo duplex checkpoint; its codec ({raw.get('pretrained_audio_codec')!r}) is a NeMo "
                "AudioCodecModel, which this project does not implement: pass pretrained_audio_codec= a transformers "
                "Mimi/EnCodec/DAC codec with the same codebook size and number of codebooks (its codes will not "
                "mean what NeMo's meant)"
            )
        raw["pretrained_audio_codec"] = pretrained_audio_codec
    problems: list[str] = []
    model = build(ModelConfig, raw, "model", problems)
    if problems:
        raise ValueError(f"{source} is not a model config this project can build: " + "; ".join(problems))
    model = dataclasses.replace(model, model_type=model.resolved_model_type())
    return NemoCheckpoint(model, frames_of(model.perception, target_sample_rate), notes)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

# NeMo tensors with no counterpart here, by model type: NeMo's codec (its weights come from
# `pretrained_audio_codec`), the control-code buffer (rebuilt from the codec), and the speech-decoder model's
# unused `embed_audio_tokens` / `audio_head` and its causal-mask buffers (rebuilt from the config).
_SKIPPED_PREFIXES = {
    "salm": (),
    "duplex_s2s": ("audio_codec.", "_control_codes"),
    "duplex_s2s_speech_decoder": ("audio_codec.", "_control_codes", "embed_audio_tokens.", "audio_head."),
}
_SKIPPED_SUFFIXES = (".self_attention.causal_mask",)
# Tensors a NeMo writer may leave out (NeMo itself loads with strict=False): rebuilt identically from the config.
_OPTIONAL_PREFIXES = ("perception.preprocessor.featurizer.",)


def load_nemo_weights(model: nn.Module, directory: str | Path, model_type: str) -> None:
    """Load `directory`/model.safetensors into `model` by name; every tensor of the model must be there (but the
    front-end buffers) and every tensor there must fit (but the ones listed above)."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    state = load_file(str(path))
    skip = _SKIPPED_PREFIXES.get(model_type, ())
    kept = {k: v for k, v in state.items() if not k.startswith(skip) and not k.endswith(_SKIPPED_SUFFIXES)}
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in kept.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{path}: {len(mismatched)} tensors do not fit the model its config.json builds ({'; '.join(mismatched[:3])})"
            "; with a different pretrained_llm, use one of the same architecture and vocabulary"
        )
    result = model.load_state_dict(kept, strict=False)
    loaded = {own[k].data_ptr() for k in kept if k in own}
    missing = [  # tied tensors (e.g. an LM head sharing the embedding) are stored once, under one name
        k for k in result.missing_keys if not k.startswith(_OPTIONAL_PREFIXES) and own[k].data_ptr() not in loaded
    ]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit the model its config.json builds: {len(missing)} tensors missing (e.g. "
            f"{missing[:3]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


def load_nemo_model(
    directory: str | Path,
    pretrained_llm: str | None = None,
    pretrained_audio_codec: str | None = None,
    target_sample_rate: int = AudioFrames.target_sample_rate,
) -> nn.Module:
    """Build the model of a NeMo directory and load its weights (eval mode, on CPU)."""
    from speech_models.registry import build_model

    checkpoint = read_nemo_dir(directory, pretrained_llm, pretrained_audio_codec, target_sample_rate)
    for note in checkpoint.notes:
        logger.info("%s: %s", directory, note)
    model = build_model(checkpoint.model, checkpoint.frames)
    load_nemo_weights(model, directory, checkpoint.model.resolved_model_type())
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Write (SALM): NeMo's self-contained layout
# ----------------------------------------------------------------------------------------------


def _with_target(section: str, values: dict[str, Any]) -> dict[str, Any]:
    return {"_target_": NEMO_TARGETS[section], **{k: v for k, v in values.items() if k != "_target_"}}


def _nemo_adapter_config(perception: PerceptionConfig) -> dict[str, Any]:
    """The modality adapter as NeMo builds it. No adapter is NeMo's IdentityConnector given a `d_model`: NeMo then
    projects from that width to the LLM's, as this project does (the connector ignores the key itself)."""
    if perception.modality_adapter is not None:
        return _with_target("modality_adapter", dataclasses.asdict(perception.modality_adapter))
    enc = perception.encoder
    width = enc.feat_out if enc.feat_out > 0 else enc.d_model
    return {"_target_": NEMO_TARGETS["perception"].rpartition(".")[0] + "." + IDENTITY_ADAPTER, "d_model": width}


def nemo_perception_config(perception: PerceptionConfig, output_dim: int) -> dict[str, Any]:
    """The perception section NeMo's AudioPerceptionModule builds from: every key a NeMo constructor argument."""
    out: dict[str, Any] = {
        "target": NEMO_TARGETS["perception"],
        "preprocessor": _with_target("preprocessor", dataclasses.asdict(perception.preprocessor)),
        "encoder": _with_target("encoder", dataclasses.asdict(perception.encoder)),
        "modality_adapter": _nemo_adapter_config(perception),
        "output_dim": output_dim,
    }
    if perception.spec_augment is not None:
        out["spec_augment"] = _with_target("spec_augment", dataclasses.asdict(perception.spec_augment))
    return out


def nemo_model_config(model: nn.Module) -> dict[str, Any]:
    """The config.json NeMo's SALM builds this model from (its training keys included, so NeMo's tools run)."""
    cfg: ModelConfig = model.cfg
    lora = cfg.lora if hasattr(model.llm, "get_base_model") else None
    prevent = list(cfg.prevent_freeze_params)
    if lora is not None and r"^.+\.lora_.+$" not in prevent:
        prevent.append(r"^.+\.lora_.+$")  # NeMo adds it when it installs LoRA, and asserts the list exists
    out: dict[str, Any] = {
        "pretrained_llm": cfg.pretrained_llm,  # informational: NeMo reads llm_backbone/ and the root tokenizer
        "pretrained_weights": False,  # every weight is in model.safetensors
        "audio_locator_tag": cfg.audio_locator_tag,
        "prompt_format": cfg.prompt_format,
        "freeze_params": list(cfg.freeze_params),
        "prevent_freeze_params": prevent,
        "perception": nemo_perception_config(model.perception.cfg, model.perception.proj.out_features),
        "optimizer": dict(cfg.optimizer),
    }
    if cfg.lr_scheduler is not None:
        out["lr_scheduler"] = dict(cfg.lr_scheduler)
    if lora is not None:
        out["lora"] = {k: v for k, v in dataclasses.asdict(lora).items() if v is not None}
    out["model_type"] = NEMO_MODEL_TYPE
    out["architectures"] = list(NEMO_ARCHITECTURES)
    return out


def save_llm_config_for_nemo(lm: nn.Module, directory: Path) -> None:
    """The LLM's config (and generation config) in files NeMo's transformers reads. Transformers 5 writes RoPE
    settings only as `rope_parameters`; older transformers (NeMo 3.0 pins 4.57) read `rope_theta` /
    `rope_scaling`, so both spellings are written."""
    lm.config.save_pretrained(directory)
    path = directory / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", rope)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(directory)


# tokenizer_config.json entries transformers 5 writes that older transformers (NeMo 3.0 pins 4.57) cannot read.
_TOKENIZER_CLASS_FOR_OLDER_TRANSFORMERS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
_TOKENIZER_KEYS_OF_THIS_MACHINE = ("is_local", "local_files_only", "backend")


def save_tokenizer_for_nemo(source: str, directory: Path) -> None:
    """The tokenizer as the LLM ships it (NeMo adds the audio tag itself and gets the same id), in files that both
    transformers 5 and NeMo's transformers 4.57 read."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    cls = config.get("tokenizer_class")
    config["tokenizer_class"] = _TOKENIZER_CLASS_FOR_OLDER_TRANSFORMERS.get(cls, cls)
    for key in _TOKENIZER_KEYS_OF_THIS_MACHINE:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_nemo_dir(model: nn.Module, directory: str | Path) -> Path:
    """Write a SALM as NeMo's self-contained `save_pretrained` directory (config.json, model.safetensors, the
    tokenizer without the audio tag, llm_backbone/). The directory must be empty or not exist."""
    from safetensors.torch import save_model

    from speech_models.pretrained import match_mode

    if model.cfg.resolved_model_type() != "salm":
        raise ValueError(
            f"NeMo's format is written for SALM only: NeMo's {type(model).__name__} needs a NeMo AudioCodecModel "
            "(.nemo), and this model's codec is a transformers one that NeMo cannot load"
        )
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; pick a new directory or remove it")
    config = nemo_model_config(model)
    directory.mkdir(parents=True, exist_ok=True)
    lm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    save_llm_config_for_nemo(lm, directory / LLM_BACKBONE_DIR)
    save_tokenizer_for_nemo(model.cfg.tokenizer_source, directory)
    save_model(model, str(directory / WEIGHTS_FILE))  # NeMo's own writer: full state dict, shared tensors once
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    match_mode(directory / WEIGHTS_FILE, like=directory / CONFIG_FILE)
    return directory
