"""Typed schema of the `model:` section, with NeMo speechlm2's key names and defaults.

These dataclasses are the single place where model defaults live. `orchestrator.config` validates a user's
YAML against them (unknown keys, types, enum values) and builds these objects; the models in this package
receive them already validated and never call `cfg.get(key, default)`.

Keys follow NeMo's documented configs so that a NeMo user's YAML runs with at most path changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SelfAttentionModel = Literal["rel_pos", "abs_pos", "rel_pos_local_attn"]
Subsampling = Literal["dw_striding", "striding"]
AttContextStyle = Literal["regular", "chunked_limited"]
PromptFormat = Literal["llama2", "llama3", "qwen", "plain", "chat_template"]


@dataclass
class PreprocessorConfig:
    """Log-mel front end (NeMo AudioToMelSpectrogramPreprocessor)."""

    sample_rate: int = 16000
    features: int = 80  # number of mel bins; must equal encoder.feat_in
    window_size: float = 0.025  # seconds
    window_stride: float = 0.01  # seconds; 10 ms hop -> 8x subsampling gives 80 ms frames
    n_fft: int = 512
    window: Literal["hann", "hamming"] = "hann"
    normalize: Literal["per_feature", "all_features", "NA", "None"] = "per_feature"
    dither: float = 1.0e-5
    pad_to: int = 0
    log_zero_guard_value: float = 2.0**-24


@dataclass
class SpecAugmentConfig:
    """SpecAugment, applied in training only. Zero masks disable it."""

    freq_masks: int = 2
    time_masks: int = 10
    freq_width: int = 27
    time_width: float = 0.05  # a fraction of the utterance when < 1, else frames


@dataclass
class ConformerConfig:
    """FastConformer encoder (NeMo ConformerEncoder keys). Also used for the modality adapter."""

    _target_: str | None = None
    feat_in: int = 80
    feat_out: int = -1  # -1: output width is d_model
    n_layers: int = 17
    d_model: int = 512
    subsampling: Subsampling = "dw_striding"
    subsampling_factor: int = 8  # 8 -> 80 ms frames from 10 ms features; 1 for an adapter
    subsampling_conv_channels: int = 256  # -1 means d_model
    causal_downsampling: bool = False
    ff_expansion_factor: int = 4
    self_attention_model: SelfAttentionModel = "rel_pos"
    n_heads: int = 8
    att_context_size: list[int] = field(default_factory=lambda: [-1, -1])  # [left, right]; -1 = unlimited
    att_context_style: AttContextStyle = "regular"
    xscaling: bool = True
    untie_biases: bool = True
    pos_emb_max_len: int = 5000
    conv_kernel_size: int = 9
    conv_norm_type: str = "batch_norm"  # batch_norm | layer_norm | group_norm<N> (NeMo also spells groupnorm<N>)
    # null -> symmetric [(k-1)//2, (k-1)//2]; "causal" -> [k-1, 0]; or an explicit [left, right] pair
    conv_context_size: Literal["causal", "regular"] | list[int] | None = None
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.0
    dropout_att: float = 0.1


@dataclass
class PerceptionConfig:
    """Audio perception: preprocessor -> encoder -> modality adapter -> projection to the LLM width.

    With `model.pretrained_asr` set, `encoder` and `preprocessor` start from the pretrained model's own
    architecture and the keys given here override it (as in NeMo).
    """

    target: str = "speech_models.perception.AudioPerceptionModule"
    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    encoder: ConformerConfig = field(default_factory=ConformerConfig)
    # None means identity (encoder output goes straight to the projection)
    modality_adapter: ConformerConfig | None = None
    spec_augment: SpecAugmentConfig | None = None
    output_dim: int | None = None  # filled from the LLM hidden size when None


@dataclass
class LoraConfig:
    """Passed verbatim to `peft.LoraConfig`."""

    task_type: str = "CAUSAL_LM"
    r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: list[str] | str | None = None  # None: peft's default for the architecture
    bias: Literal["none", "all", "lora_only"] = "none"


@dataclass
class SpeechDecoderConfig:
    """Autoregressive transformer speech decoder of DuplexS2SSpeechDecoderModel."""

    target: str = "speech_models.duplex_s2s_speech_decoder.TransformerARSpeechDecoder"
    d_model: int = 1024
    n_layers: int = 12
    n_heads: int = 16
    d_kv: int = 64
    d_ff: int = 4096
    max_seq_len: int = 2048
    dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    activation_function: Literal["gelu", "gelu_new", "relu", "silu"] = "gelu_new"
    init_method_std: float = 0.02
    use_cache: bool = True


@dataclass
class ModelConfig:
    """The `model:` section shared by SALM, DuplexS2SModel and DuplexS2SSpeechDecoderModel."""

    # Every `pretrained_*` is a hub id (used online) or a local directory.
    pretrained_llm: str = "TinyLlama/TinyLlama_v1.1"
    pretrained_asr: str | None = None  # transformers Parakeet/FastConformer dir or hub id, or a local .nemo file
    pretrained_audio_codec: str | None = None  # duplex models only
    scoring_asr: str | None = None  # duplex validation only (ASR-BLEU)
    pretrained_weights: bool = True  # False: architecture from the pretrained config, random init
    # A registered model type (speech_models.registry), or "auto": speech_decoder set ->
    # duplex_s2s_speech_decoder; pretrained_audio_codec set -> duplex_s2s; else salm
    model_type: str = "auto"
    audio_locator_tag: str = "<|audioplaceholder|>"
    prompt_format: PromptFormat = "llama2"
    freeze_params: list[str] = field(default_factory=list)  # regexes over parameter names
    prevent_freeze_params: list[str] = field(default_factory=list)  # overrides freeze_params
    lora: LoraConfig | None = None
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    audio_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    speech_decoder: SpeechDecoderConfig | None = None
    # Free-form like NeMo: `_target_` picks the class (allow-listed), the other keys are its kwargs.
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "torch.optim.AdamW", "lr": 3e-4, "betas": [0.9, 0.98]}
    )
    lr_scheduler: dict[str, Any] | None = None

    def resolved_model_type(self) -> str:
        """Which of the three models this config builds."""
        if self.model_type != "auto":
            return self.model_type
        if self.speech_decoder is not None:
            return "duplex_s2s_speech_decoder"
        if self.pretrained_audio_codec is not None:
            return "duplex_s2s"
        return "salm"


@dataclass(frozen=True)
class AudioFrames:
    """The `data:` keys a model itself depends on (duplex models read them; SALM ignores them).

    The orchestrator's `DataConfig` has the same keys, so either can be passed where a model takes `data_cfg`.
    """

    frame_length: float = 0.08
    source_sample_rate: int = 16000
    target_sample_rate: int = 22050


@dataclass(frozen=True)
class PromptDefaults:
    """How a model was prompted in training; `speechlm infer` and exports use it unless told otherwise."""

    context: str | None = None  # e.g. "Transcribe:" (SALM user turn: "<context> <audio tag>")
    system_prompt: str | None = None
    prompt_format: str | None = None  # None: model.prompt_format
