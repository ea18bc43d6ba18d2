"""Tiny, offline builders of pretrained parts, shared by tests, benchmarks and the demo.

Nothing here downloads: every asset is made locally from random weights and a tokenizer trained
on a few sentences, then saved with ``save_pretrained`` so it is loaded through exactly the same
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` path as a real hub model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# Tiny LLM directory (tokenizer + random-init Llama)
# ----------------------------------------------------------------------------------------------

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

LLM_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=704,
    ),
}

DEFAULT_TINY_CORPUS: tuple[str, ...] = (
    "the quick brown fox jumps over the lazy dog",
    "a small model learns to listen and to speak",
    "what is the colour of the sky today",
    "the sky is blue and the sun is bright",
    "how many birds sit on the old green tree",
    "three birds sit on the old green tree",
    "please open the window in the kitchen",
    "my sister reads a long book every night",
    "where did you leave the red umbrella",
    "i left the red umbrella near the door",
    "one two three four five six seven eight nine ten",
    "hello how are you doing this morning",
)

# Written last into the directory; its presence (with matching parameters) makes a rebuild a no-op.
_STAMP = "tiny_llm_build.json"
_CODEC_STAMP = "tiny_codec_build.json"


def check_replaceable(out_dir: str | os.PathLike, builder: str = "llm") -> None:
    """Raise FileExistsError unless `out_dir` is absent, empty, or was made by this builder (`builder`: "llm"
    or "codec"): a rebuild replaces the directory, and must never delete something a user put there."""
    out = Path(out_dir)
    stamp = out / (_STAMP if builder == "llm" else _CODEC_STAMP)
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"{out} exists and is a file, not a tiny {builder} directory; move it or pick another path"
        )
    if out.is_dir() and any(out.iterdir()) and not stamp.is_file():
        raise FileExistsError(
            f"{out} exists, is not empty and was not made by build_tiny_{builder}_dir (no {stamp.name}); "
            "nothing was changed: move it away or pick another output directory"
        )


def _move_into_place(tmp: Path, out: Path, builder: str) -> None:
    """Replace `out` (absent, empty or ours: checked again right before deleting) with the finished `tmp`."""
    check_replaceable(out, builder)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def build_tokenizer(texts: Iterable[str] = DEFAULT_TINY_CORPUS, vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on `texts` (pad, bos, eos, unk special tokens), as a transformers
    PreTrainedTokenizerFast; it adds no BOS/EOS by itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def build_tiny_llm_dir(
    out_dir: str | os.PathLike,
    texts: Iterable[str] = DEFAULT_TINY_CORPUS,
    size: str = "tiny",
    seed: int = 0,
    vocab_size: int = 1000,
) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it with a seeded random Llama.

    The directory is built in a temporary sibling and renamed into place, so an interrupted build
    never leaves a half-written model behind; calling again with the same arguments is a no-op.
    The tokenizer adds no BOS/EOS by itself (prompt formatters insert them explicitly).
    Returns ``out_dir`` as a Path.
    """
    if size not in LLM_SIZES:
        raise ValueError(f"llm size {size!r} is unknown; choose one of {sorted(LLM_SIZES)}")
    out = Path(out_dir)
    texts = list(texts)
    corpus_sha = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    params = {"size": size, "seed": seed, "vocab_size": vocab_size, "corpus_sha256": corpus_sha}
    stamp = out / _STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return out
    check_replaceable(out, "llm")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_tok = build_tokenizer(texts, vocab_size)

    config = LlamaConfig(
        vocab_size=len(hf_tok),
        max_position_embeddings=2048,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
        **LLM_SIZES[size],
    )
    # Seed a private generator state so building a model does not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_tok.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / _STAMP).write_text(json.dumps(params))
        _move_into_place(tmp, out, "llm")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# Tiny audio codecs and duplex model configs (speech_models.codec, duplex_s2s*, tests and demo)
# ----------------------------------------------------------------------------------------------

# Hops are chosen so that codec frames line up with 80 ms model frames (see speech_models.codec):
# "dac" / "encodec": 22050 Hz / hop 882 (2*3*3*7*7) = 25 Hz -> 2 codec frames per frame, no resampling of
#   22.05 kHz agent audio; "dac_16k": 16 kHz / hop 320 = 50 Hz -> 4 per frame (agent audio is resampled);
# "mimi": 16 kHz / frame size 640 = 25 Hz -> 2 per frame; "dac_misaligned": 16 kHz / hop 512 = 31.25 Hz,
#   2.5 codec frames per 80 ms frame, which the codec wrapper refuses.
_TINY_DAC = dict(encoder_hidden_size=4, n_codebooks=2, codebook_size=32, codebook_dim=4, hidden_size=16)
TINY_CODECS: dict[str, dict] = {
    "dac": dict(
        _TINY_DAC,
        sampling_rate=22050,
        downsampling_ratios=[2, 3, 3, 7, 7],
        upsampling_ratios=[7, 7, 3, 3, 2],
        decoder_hidden_size=32,
        hop_length=882,
    ),
    # The codebook layout of the NeMo duplex fixtures' codec (K = 2 codebooks of 16 codes, one per 80 ms at
    # 22.05 kHz), for loading those checkpoints; the fixtures' codes themselves come from NeMo's codec.
    "dac_k2": dict(
        _TINY_DAC,
        codebook_size=16,
        sampling_rate=22050,
        downsampling_ratios=[2, 2, 3, 3, 7, 7],
        upsampling_ratios=[7, 7, 3, 3, 2, 2],
        decoder_hidden_size=64,  # halved per upsampling stage: 1 channel after the sixth
        hop_length=1764,
    ),
    "dac_16k": dict(
        _TINY_DAC,
        sampling_rate=16000,
        downsampling_ratios=[2, 4, 5, 8],
        upsampling_ratios=[8, 5, 4, 2],
        decoder_hidden_size=16,
        hop_length=320,
    ),
    "dac_misaligned": dict(
        _TINY_DAC,
        sampling_rate=16000,
        downsampling_ratios=[2, 4, 8, 8],
        upsampling_ratios=[8, 8, 4, 2],
        decoder_hidden_size=16,
        hop_length=512,
    ),
    "encodec": dict(
        sampling_rate=22050,
        upsampling_ratios=[7, 7, 3, 3, 2],
        hidden_size=16,
        num_filters=4,
        num_lstm_layers=1,
        codebook_size=32,
        codebook_dim=16,
        target_bandwidths=[0.25],  # 25 Hz x 5 bits x 2 quantizers
        use_causal_conv=True,
    ),
    "mimi": dict(
        sampling_rate=16000,
        upsampling_ratios=[5, 4, 4, 4],
        hidden_size=16,
        num_filters=4,
        codebook_size=32,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=2,
        num_semantic_quantizers=1,
        upsample_groups=16,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=16,
    ),
}


def _spread_codebooks(model, kind: str, generator) -> None:
    """Random EnCodec/Mimi codebooks start as zeros (every frame -> code 0); spread them over the encoder's
    output range so that tiny codecs emit varied codes and the audio loss has something to learn."""
    import torch

    if kind == "encodec":
        h = model.encoder(torch.randn(1, 1, model.config.sampling_rate, generator=generator) * 0.1)[0]  # (D, T)
        mean, std = h.mean(1), h.std(1)
        for i, layer in enumerate(model.quantizer.layers):
            embed = layer.codebook.embed
            embed.copy_((mean if i == 0 else 0) + std * 0.5**i * torch.randn(embed.shape, generator=generator))
    elif kind == "mimi":
        for module in model.modules():
            if "embed_sum" in module._buffers:
                module.embed_sum.copy_(torch.randn(module.embed_sum.shape, generator=generator) * 0.05)
                module._embed = None  # Mimi caches embed_sum / cluster_usage


def build_tiny_codec_dir(out_dir: str | os.PathLike, kind: str = "dac", seed: int = 0) -> Path:
    """Save a seeded random tiny transformers codec (``TINY_CODECS[kind]``) with ``save_pretrained``.

    Loaded back by path through ``AutoModel.from_pretrained`` like a real codec. Like ``build_tiny_llm_dir``
    it is built in a temporary sibling and renamed into place (replacing an earlier tiny codec, never a
    directory it did not make); a second call with the same arguments is a no-op.
    """
    import torch
    from transformers import AutoConfig, AutoModel

    if kind not in TINY_CODECS:
        raise ValueError(f"tiny codec kind {kind!r} is unknown; choose one of {sorted(TINY_CODECS)}")
    out = Path(out_dir)
    params = {"kind": kind, "seed": seed, **TINY_CODECS[kind]}
    stamp = out / _CODEC_STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return out
    check_replaceable(out, "codec")
    model_type = kind.split("_")[0]  # "dac_16k" -> "dac"
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = AutoModel.from_config(AutoConfig.for_model(model_type, **TINY_CODECS[kind])).eval()
        _spread_codebooks(model, kind, torch.Generator().manual_seed(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # built aside, renamed into place
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / stamp.name).write_text(json.dumps(params))
        _move_into_place(tmp, out, "codec")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_parakeet_dir(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a seeded random tiny transformers Parakeet encoder (1 layer, 32 wide, 80 mel bins, 8x subsampling =
    80 ms frames) with its feature extractor: a `pretrained_asr` that loads like a real hub Parakeet checkpoint.
    Unlike the LLM and codec builders it writes `out_dir` directly, which must not exist yet."""
    import torch
    from transformers import ParakeetEncoder, ParakeetEncoderConfig, ParakeetFeatureExtractor

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; build_tiny_parakeet_dir writes a new directory")
    config = ParakeetEncoderConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        subsampling_conv_channels=16,
        num_mel_bins=80,
        dropout=0.0,
        layerdrop=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ParakeetEncoder(config).save_pretrained(out, safe_serialization=True)
    ParakeetFeatureExtractor().save_pretrained(out)
    return out


def tiny_duplex_model_config(
    llm_dir: str | os.PathLike, codec_dir: str | os.PathLike, speech_decoder: bool = False, **overrides
):
    """A ModelConfig for a CPU-sized DuplexS2SModel (with ``speech_decoder``: DuplexS2SSpeechDecoderModel).

    One 32-wide FastConformer layer on 32 mel bins (10 ms x 8 = 80 ms frames), no dropout, the given tiny
    LLM and codec; ``overrides`` are other ModelConfig fields (e.g. ``audio_loss_weight=2.0``).
    """
    from speech_models.config import (
        ConformerConfig,
        ModelConfig,
        PerceptionConfig,
        PreprocessorConfig,
        SpeechDecoderConfig,
    )

    perception = PerceptionConfig(
        preprocessor=PreprocessorConfig(features=32, dither=0.0),
        encoder=ConformerConfig(
            feat_in=32,
            n_layers=1,
            d_model=32,
            n_heads=2,
            subsampling_conv_channels=16,
            ff_expansion_factor=2,
            conv_kernel_size=3,
            dropout=0.0,
            dropout_pre_encoder=0.0,
            dropout_att=0.0,
        ),
    )
    decoder = None
    if speech_decoder:
        decoder = SpeechDecoderConfig(
            d_model=32,
            n_layers=2,
            sa_n_heads=2,
            d_ffn=64,
            kernel_size=3,
            max_length_causal_mask=512,
            use_learnable_pos_emb=True,
            apply_norm_out=True,
            p_dropout=0.0,
        )
    return ModelConfig(
        pretrained_llm=str(llm_dir),
        pretrained_audio_codec=str(codec_dir),
        perception=perception,
        speech_decoder=decoder,
        **overrides,
    )


def make_duplex_example(
    cut_id: str,
    duration: float,
    agent_turns: Iterable[tuple[float, float, str]],
    user_turns: Iterable[tuple[float, float, str]] = (),
    source_sample_rate: int = 16000,
    target_sample_rate: int = 22050,
    seed: int = 0,
) -> dict:
    """A DuplexS2SCollator input example with tones for speech: the user channel holds a 220 Hz tone during
    user turns, the agent channel a 330 Hz tone during agent turns (silence elsewhere). Turns are
    (start, duration, text) in seconds."""
    import numpy as np

    rng = np.random.default_rng(seed)
    agent_turns, user_turns = list(agent_turns), list(user_turns)

    def channel(sr: int, turns: list, freq: float) -> np.ndarray:
        audio = (rng.standard_normal(round(duration * sr)) * 1e-3).astype(np.float32)
        for start, dur, _ in turns:
            a, b = int(start * sr), min(int((start + dur) * sr), len(audio))
            audio[a:b] += 0.3 * np.sin(2 * np.pi * freq * np.arange(b - a) / sr).astype(np.float32)
        return audio

    supervisions = [
        {"speaker": speaker, "start": start, "duration": dur, "text": text}
        for speaker, turns in (("user", user_turns), ("agent", agent_turns))
        for start, dur, text in turns
    ]
    supervisions.sort(key=lambda s: s["start"])
    return {
        "id": cut_id,
        "duration": duration,
        "audio": channel(source_sample_rate, user_turns, 220.0),
        "target_audio": channel(target_sample_rate, agent_turns, 330.0),
        "supervisions": supervisions,
        "text": " ".join(s["text"] for s in supervisions),
    }


# ----------------------------------------------------------------------------------------------
# Tiny perception / SALM configs (random init, no pretrained ASR)
# ----------------------------------------------------------------------------------------------


def tiny_conformer_config(**overrides):
    """A 2-layer, 32-wide FastConformer with 8x dw_striding subsampling and no dropout."""
    from speech_models.config import ConformerConfig

    values = dict(
        feat_in=80,
        n_layers=2,
        d_model=32,
        n_heads=4,
        subsampling_factor=8,
        subsampling_conv_channels=16,
        ff_expansion_factor=2,
        conv_kernel_size=5,
        dropout=0.0,
        dropout_pre_encoder=0.0,
        dropout_att=0.0,
    )
    values.update(overrides)
    return ConformerConfig(**values)


def tiny_perception_config(adapter: bool = False, spec_augment: bool = False, **encoder_overrides):
    """Perception with the tiny encoder, optionally a 1-layer Conformer adapter and SpecAugment."""
    from speech_models.config import PerceptionConfig, PreprocessorConfig, SpecAugmentConfig

    adapter_cfg = None
    if adapter:
        adapter_cfg = tiny_conformer_config(feat_in=32, n_layers=1, subsampling_factor=1)
    return PerceptionConfig(
        preprocessor=PreprocessorConfig(dither=0.0),
        encoder=tiny_conformer_config(**encoder_overrides),
        modality_adapter=adapter_cfg,
        spec_augment=SpecAugmentConfig(freq_masks=2, time_masks=2, freq_width=10, time_width=0.1)
        if spec_augment
        else None,
    )


def tiny_salm_config(llm_dir: str | os.PathLike, **overrides):
    """A SALM ModelConfig on a local tiny LLM dir (see build_tiny_llm_dir) with the tiny perception."""
    from speech_models.config import ModelConfig

    values = dict(
        pretrained_llm=str(llm_dir),
        pretrained_asr=None,
        prompt_format="llama2",
        perception=tiny_perception_config(),
    )
    values.update(overrides)
    return ModelConfig(**values)
