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
    """Log-mel front end: NeMo's AudioToMelSpectrogramPreprocessor, with its constructor keys.

    Every key NeMo's class takes is accepted, so a NeMo config (or the config.json of a NeMo checkpoint) validates
    as it stands; options this front end does not implement are refused when set to anything but NeMo's default
    (`speech_models.perception.unsupported_options` names them). Where this project's default differs from
    NeMo's class default (window_size, features, n_fft, pad_to) it is the value of NeMo's speechlm2 configs.
    """

    _target_: str | None = (
        None  # NeMo class path, informational (e.g. ...asr.modules.AudioToMelSpectrogramPreprocessor)
    )
    sample_rate: int = 16000
    features: int = 80  # number of mel bins; must equal encoder.feat_in
    window_size: float = 0.025  # seconds
    window_stride: float = 0.01  # seconds; 10 ms hop -> 8x subsampling gives 80 ms frames
    n_window_size: int | None = None  # samples; overrides window_size when set
    n_window_stride: int | None = None  # samples; overrides window_stride when set
    n_fft: int | None = 512  # null: the next power of two >= the window length (NeMo)
    window: Literal["hann", "hamming", "blackman", "bartlett", "ones"] = "hann"
    normalize: Literal["per_feature", "all_features", "NA", "None"] | None = "per_feature"
    preemph: float | None = 0.97  # pre-emphasis coefficient; null disables it
    lowfreq: float = 0.0  # Hz, lowest mel filter edge
    highfreq: float | None = None  # Hz, highest mel filter edge; null: sample_rate / 2
    log: bool = True
    log_zero_guard_type: Literal["add", "clamp"] = "add"
    log_zero_guard_value: float | Literal["tiny", "eps"] = 2.0**-24
    dither: float = 1.0e-5
    pad_to: int = 0  # pad the feature frames to a multiple of this (0: no padding)
    mag_power: float = 2.0  # |STFT| ** mag_power before the mel filters
    mel_norm: Literal["slaney"] | None = "slaney"
    # NeMo options accepted at their defaults only (this front end does not implement others):
    frame_splicing: int = 1
    exact_pad: bool = False
    pad_value: float = 0.0
    nb_augmentation_prob: float = 0.0
    nb_max_freq: int = 4000
    use_torchaudio: bool = False
    stft_exact_pad: bool = False
    stft_conv: bool = False
    rng: Any = None


@dataclass
class SpecAugmentConfig:
    """SpecAugment, applied in training only (NeMo SpectrogramAugmentation keys). Zero masks disable it."""

    _target_: str | None = None  # NeMo class path, informational
    freq_masks: int = 2
    time_masks: int = 10
    freq_width: int = 27
    time_width: float = 0.05  # a fraction of the utterance when < 1, else frames
    # NeMo options accepted at their defaults only:
    rect_masks: int = 0
    rect_time: int = 5
    rect_freq: int = 20
    mask_value: float = 0.0
    rng: Any = None
    use_vectorized_spec_augment: bool = True
    use_numba_spec_augment: bool = False


@dataclass
class ConformerConfig:
    """FastConformer encoder (NeMo ConformerEncoder keys). Also used for the modality adapter.

    Every key NeMo's ConformerEncoder takes is accepted; the options this encoder does not implement are refused
    unless they are at NeMo's default (see `speech_models.perception.unsupported_options`).
    """

    _target_: str | None = None
    feat_in: int = 80
    feat_out: int = -1  # -1: output width is d_model
    n_layers: int = 17
    d_model: int = 512
    subsampling: Subsampling = "dw_striding"
    subsampling_factor: int = 8  # 8 -> 80 ms frames from 10 ms features; 1 for an adapter
    subsampling_conv_channels: int = 256  # -1 means d_model
    subsampling_conv_chunking_factor: int = 1  # NeMo's memory option; this encoder chunks on its own (same maths)
    causal_downsampling: bool = False
    ff_expansion_factor: int = 4
    self_attention_model: SelfAttentionModel = "rel_pos"
    n_heads: int = 8
    # [left, right]; -1 = unlimited. NeMo's multi-lookahead form, a list of such pairs, is accepted: the first
    # pair is used (NeMo's default context at inference), and training does not sample the others.
    att_context_size: list[int] | list[list[int]] = field(default_factory=lambda: [-1, -1])
    att_context_probs: list[float] | None = None
    att_context_style: AttContextStyle = "regular"
    xscaling: bool = True
    untie_biases: bool = True
    pos_emb_max_len: int = 5000
    conv_kernel_size: int = 9
    conv_norm_type: str = "batch_norm"  # batch_norm | layer_norm | group_norm<N> (NeMo also spells groupnorm<N>)
    # null -> symmetric [(k-1)//2, (k-1)//2]; "causal" -> [k-1, 0]; or an explicit [left, right] pair
    conv_context_size: Literal["causal", "regular"] | list[int] | None = None
    use_bias: bool = True  # biases of the linear and convolution layers
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.0
    dropout_att: float = 0.1
    # NeMo options accepted at their defaults only (stochastic depth is dropped with a warning):
    reduction: str | None = None
    reduction_position: int | None = None
    reduction_factor: int = 1
    att_chunk_context_size: Any = None
    conv_context_style: str = "regular"
    stochastic_depth_drop_prob: float = 0.0
    stochastic_depth_mode: str = "linear"
    stochastic_depth_start_layer: int = 1
    global_tokens: int = 0
    global_tokens_spacing: int = 1
    global_attn_separate: bool = False
    use_pytorch_sdpa: bool = False  # accepted either way: the same maths
    use_pytorch_sdpa_backends: list[str] | None = None
    sync_max_audio_length: bool = True

    @property
    def context_size(self) -> list[int]:
        """The [left, right] attention context in use (the first pair of a multi-lookahead list)."""
        size = self.att_context_size
        return list(size[0]) if size and isinstance(size[0], list) else list(size)


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
    """Autoregressive speech decoder of DuplexS2SSpeechDecoderModel: NeMo's TransformerARSpeechDecoder, with the
    keys of NeMo's code (those its `transformer_2501.Transformer` takes, as in NeMo's released
    s2s_duplex_speech_decoder.yaml). NeMo's documentation page lists another key set (d_kv, d_ff, ...), which NeMo's
    code does not accept; `orchestrator.config.nemo_compat` translates it.
    """

    target: str = "speech_models.duplex_s2s_speech_decoder.TransformerARSpeechDecoder"
    n_layers: int = 12
    d_model: int = 1024
    d_ffn: int = 4096  # width of the convolutional feed-forward block
    sa_n_heads: int = 16  # self-attention heads; head width is d_model / sa_n_heads
    kernel_size: int = 3  # causal convolution width of the feed-forward block (1 = a position-wise MLP)
    p_dropout: float = 0.1
    p_dropout_out: float = 0.0  # dropout on the decoder output
    is_causal: bool = True
    apply_norm_out: bool = False  # a final LayerNorm
    max_length_causal_mask: int = 4096  # longest frame sequence (and learned position table size)
    use_learnable_pos_emb: bool = False  # learned absolute positions added to the input
    cond_on_prev_audio_tokens: bool = True  # add the mean embedding of the previous frame's codes to the input
    detach_input: bool = False  # stop gradients into the LLM (and the code embeddings) from the audio loss
    # NeMo options accepted at their defaults only (this decoder does not implement others):
    has_xattn: bool = False
    xa_d_memory: int | None = None
    xa_n_heads: int | None = None
    xa_d_head: int | None = None
    apply_norm_to_cond: bool = True  # cross-attention only
    make_prior_window_strict: bool = False  # cross-attention only
    use_moe: bool = False
    num_experts: int = 8
    top_k_experts: int = 2
    router_jitter_noise: float = 0.0
    routing_strategy: str = "top_k"
    cfg_unconditional_prob: float | None = None  # classifier-free guidance
    cfg_scale: float = 2.5
    # This project's: keys/values and convolution inputs are cached during greedy decoding (same outputs).
    use_cache: bool = True


@dataclass
class ModelConfig:
    """The `model:` section shared by SALM, DuplexS2SModel and DuplexS2SSpeechDecoderModel."""

    # Every `pretrained_*` is a hub id (used online) or a local directory.
    pretrained_llm: str = "TinyLlama/TinyLlama_v1.1"
    pretrained_asr: str | None = None  # transformers Parakeet/FastConformer dir or hub id, or a local .nemo file
    pretrained_audio_codec: str | None = None  # duplex models only
    scoring_asr: str | None = None  # duplex validation only (ASR-BLEU)
    # False: random init; the LLM architecture from pretrained_llm's config, the perception from model.perception
    # as written (pretrained_asr is not read, as in NeMo)
    pretrained_weights: bool = True
    # NeMo's key: after building (and loading the pretrained parts), load the weights of this model directory (a
    # NeMo `save_pretrained` dir or a `speechlm export` dir, local or a hub id). Tensors whose shape differs are
    # skipped with a warning, as in NeMo. Never executed from a checkpoint that is being loaded.
    init_from_checkpoint: str | None = None
    tokenizer_path: str | None = None  # NeMo's key: the tokenizer, when not pretrained_llm's own
    # A registered model type (speech_models.registry), or "auto": speech_decoder set ->
    # duplex_s2s_speech_decoder; pretrained_audio_codec set -> duplex_s2s; else salm
    model_type: str = "auto"
    audio_locator_tag: str = "<|audioplaceholder|>"
    prompt_format: PromptFormat = "llama2"
    freeze_params: list[str] = field(default_factory=list)  # regexes over parameter names
    prevent_freeze_params: list[str] = field(default_factory=list)  # overrides freeze_params
    lora: LoraConfig | None = None
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    # NeMo's key (SALM): encode audio longer than this in chunks of at most this many seconds, each attended
    # on its own, then join their frames. Long audio then costs memory linear in its length instead of
    # quadratic (the encoder's attention); frames near a chunk edge see less context. None: whole audio.
    encoder_chunk_size_seconds: float | None = None
    audio_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    duplex_user_channel_weight: float = 1.0  # duplex: scale of the user's perception frames in the LLM input
    speech_decoder: SpeechDecoderConfig | None = None
    # Free-form like NeMo: `_target_` picks the class (allow-listed), the other keys are its kwargs.
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "torch.optim.AdamW", "lr": 3e-4, "betas": [0.9, 0.98]}
    )
    lr_scheduler: dict[str, Any] | None = None

    @property
    def tokenizer_source(self) -> str:
        """Where the tokenizer is loaded from: tokenizer_path when set, else pretrained_llm (as NeMo)."""
        return self.tokenizer_path or self.pretrained_llm

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


# ----------------------------------------------------------------------------------------------
# NeMo options accepted only at the value this project implements
# ----------------------------------------------------------------------------------------------

# (key, the value implemented here, what another value would need)
_PREPROCESSOR_FIXED = (
    ("frame_splicing", 1, "frame splicing"),
    ("exact_pad", False, "exact padding"),
    ("pad_value", 0.0, "a non-zero pad value"),
    ("nb_augmentation_prob", 0.0, "narrowband augmentation"),
    ("use_torchaudio", False, "torchaudio's featurizer (this front end is NeMo's torch.stft one)"),
    ("stft_exact_pad", False, "exact STFT padding"),
    ("stft_conv", False, "a convolutional STFT"),
)
_SPEC_AUGMENT_FIXED = (("rect_masks", 0, "rectangle masks"), ("mask_value", 0.0, "a non-zero mask value"))
_ENCODER_FIXED = (
    ("reduction", None, "time reduction"),
    ("att_chunk_context_size", None, "chunked context sizes"),
    ("conv_context_style", "regular", "other convolution context styles"),
    ("global_tokens", 0, "global tokens"),
    ("global_attn_separate", False, "separate global attention"),
)
_SPEECH_DECODER_FIXED = (
    ("is_causal", True, "a non-causal decoder (it would see the codes it predicts)"),
    ("has_xattn", False, "cross-attention"),
    ("use_moe", False, "mixture-of-experts feed-forward blocks"),
    ("cfg_unconditional_prob", None, "classifier-free guidance"),
)


def _fixed_option_problems(cfg: Any, fixed: tuple, path: str) -> list[str]:
    return [
        f"{path}.{key}: {getattr(cfg, key)!r} is not supported ({what} is not implemented here); set it to "
        f"{value!r} or remove the key"
        for key, value, what in fixed
        if getattr(cfg, key) != value and not (value is None and not getattr(cfg, key))
    ]


def perception_option_problems(cfg: PerceptionConfig, path: str = "model.perception") -> list[str]:
    """NeMo perception options set to values this project does not implement, one message each."""
    problems = _fixed_option_problems(cfg.preprocessor, _PREPROCESSOR_FIXED, f"{path}.preprocessor")
    if cfg.spec_augment is not None:
        problems += _fixed_option_problems(cfg.spec_augment, _SPEC_AUGMENT_FIXED, f"{path}.spec_augment")
    for name, enc in (("encoder", cfg.encoder), ("modality_adapter", cfg.modality_adapter)):
        if enc is not None:
            problems += _fixed_option_problems(enc, _ENCODER_FIXED, f"{path}.{name}")
    return problems


def speech_decoder_option_problems(cfg: SpeechDecoderConfig, path: str = "model.speech_decoder") -> list[str]:
    """NeMo speech-decoder options set to values this project does not implement, one message each."""
    problems = _fixed_option_problems(cfg, _SPEECH_DECODER_FIXED, path)
    if cfg.d_model % cfg.sa_n_heads:
        problems.append(f"{path}.d_model: {cfg.d_model} is not divisible by sa_n_heads ({cfg.sa_n_heads})")
    if cfg.kernel_size < 1:
        problems.append(f"{path}.kernel_size: {cfg.kernel_size} must be at least 1")
    return problems


def unsupported_options(cfg: ModelConfig) -> list[str]:
    """Every NeMo option of a model config that this project accepts only at its implemented value."""
    problems = perception_option_problems(cfg.perception)
    if cfg.speech_decoder is not None:
        problems += speech_decoder_option_problems(cfg.speech_decoder)
    return problems
