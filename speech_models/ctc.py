"""A CTC ASR model on this project's FastConformer, saved as a NeMo `.nemo` archive (EncDecCTCModelBPE layout).

It exists to make pretrained encoders: the demo trains one on its own corpus (`orchestrator.demo.parts`), and
`model.pretrained_asr: <file>.nemo` then loads its front end and encoder into a SALM exactly as it loads one of
NVIDIA's `.nemo` ASR checkpoints (`speech_models.perception.load_nemo_asr`).

Module names are NeMo's (`preprocessor.featurizer.*`, `encoder.*`, and the CTC head as NeMo's ConvASRDecoder:
`decoder.decoder_layers.0`, a kernel-1 Conv1d to the vocabulary plus blank, blank last). Targets are token ids
of any tokenizer; the demo uses its LLM's own tokenizer, so the encoder learns the units the LLM reads.

`label_frames` > 1 (not a NeMo option) makes the head emit that many label distributions per encoder frame, read
as consecutive CTC frames, so character targets fit 80 ms frames (a character is often shorter than a frame).
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speech_models.config import ConformerConfig, PreprocessorConfig, SpecAugmentConfig
from speech_models.perception import (
    NEMO_CONFIG_FILE,
    NEMO_WEIGHTS_FILE,
    AudioToMelSpectrogramPreprocessor,
    ConformerEncoder,
    SpecAugment,
    nemo_asr_architecture,
    read_nemo_members,
)

NEMO_CTC_TARGET = "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"


class ConvASRDecoder(nn.Module):
    """NeMo's CTC head: a kernel-1 Conv1d from the encoder width to `label_frames` x (vocabulary + blank)."""

    def __init__(self, feat_in: int, num_classes: int, label_frames: int = 1) -> None:
        super().__init__()
        self.label_frames = label_frames
        self.decoder_layers = nn.Sequential(nn.Conv1d(feat_in, label_frames * (num_classes + 1), kernel_size=1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) encoder frames -> (B, T * label_frames, classes + 1) log-probabilities."""
        conv = self.decoder_layers[0]
        logits = F.linear(hidden, conv.weight.squeeze(-1), conv.bias)  # a kernel-1 conv on time-major frames
        batch, frames, _ = logits.shape
        return logits.view(batch, frames * self.label_frames, -1).log_softmax(dim=-1)


@dataclasses.dataclass
class CTCModelConfig:
    preprocessor: PreprocessorConfig
    encoder: ConformerConfig
    spec_augment: SpecAugmentConfig | None
    vocabulary_size: int  # classes without the blank
    label_frames: int = 1


class CTCModel(nn.Module):
    """Front end -> SpecAugment (training only) -> FastConformer -> CTC head; NeMo EncDecCTCModel's names."""

    def __init__(self, cfg: CTCModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.preprocessor = AudioToMelSpectrogramPreprocessor(cfg.preprocessor)
        self.spec_augmentation = SpecAugment(cfg.spec_augment) if cfg.spec_augment is not None else None
        self.encoder = ConformerEncoder(cfg.encoder)
        self.decoder = ConvASRDecoder(self.encoder.output_dim, cfg.vocabulary_size, cfg.label_frames)

    @property
    def blank(self) -> int:
        return self.cfg.vocabulary_size

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, samples) audio -> (B, T, classes + 1) log-probabilities and (B,) valid frames."""
        feats, lens = self.preprocessor(audio, audio_lens)
        if self.spec_augmentation is not None:
            feats = self.spec_augmentation(feats, lens)
        hidden, lens = self.encoder(feats, lens)
        return self.decoder(hidden), lens * self.cfg.label_frames

    def loss(self, audio: torch.Tensor, audio_lens: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """Mean CTC loss per target token (torch's "mean"); impossible alignments count zero, not inf."""
        log_probs, lens = self(audio, audio_lens)
        return F.ctc_loss(
            log_probs.transpose(0, 1),
            torch.tensor([t for target in targets for t in target], dtype=torch.long),
            lens,
            torch.tensor([len(t) for t in targets], dtype=torch.long),
            blank=self.blank,
            zero_infinity=True,
        )

    @torch.no_grad()
    def greedy_ids(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> list[list[int]]:
        """Best path per utterance, repeats merged and blanks removed."""
        log_probs, lens = self(audio, audio_lens)
        out = []
        for row, length in zip(log_probs.argmax(dim=-1).tolist(), lens.tolist(), strict=True):
            ids, previous = [], None
            for label in row[:length]:
                if label != previous and label != self.blank:
                    ids.append(label)
                previous = label
            out.append(ids)
        return out


# ----------------------------------------------------------------------------------------------
# The .nemo archive
# ----------------------------------------------------------------------------------------------


def nemo_config(cfg: CTCModelConfig, vocabulary: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """model_config.yaml with NeMo's section names and class paths. Every key is written out, so NeMo's class
    defaults (which differ from this schema's) never fill a gap when the archive is read back."""

    def plain(section: Any) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(section).items() if k != "_target_"}

    config: dict[str, Any] = {
        "target": NEMO_CTC_TARGET,
        "sample_rate": cfg.preprocessor.sample_rate,
        "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor"}
        | plain(cfg.preprocessor),
        "spec_augment": None
        if cfg.spec_augment is None
        else {"_target_": "nemo.collections.asr.modules.SpectrogramAugmentation"} | plain(cfg.spec_augment),
        "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder"} | plain(cfg.encoder),
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": cfg.encoder.d_model if cfg.encoder.feat_out <= 0 else cfg.encoder.feat_out,
            "num_classes": cfg.vocabulary_size,
            "vocabulary": vocabulary,
            "label_frames": cfg.label_frames,
        },
    }
    if extra:
        config["train_info"] = extra
    return config


def save_nemo(
    path: str | os.PathLike, model: CTCModel, config: dict[str, Any], files: dict[str, bytes] | None = None
) -> Path:
    """Write the archive atomically (a partial file renamed into place), byte-reproducible (mtime 0).
    files: more members, e.g. the tokenizer the targets were made with."""
    import yaml

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    weights = io.BytesIO()
    torch.save(state, weights)
    members = {
        NEMO_CONFIG_FILE: yaml.safe_dump(config, sort_keys=False).encode(),
        NEMO_WEIGHTS_FILE: weights.getvalue(),
    }
    members.update(files or {})
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    partial.replace(path)
    return path


def load_nemo_ctc(path: str | os.PathLike) -> tuple[CTCModel, dict[str, Any], dict[str, bytes]]:
    """(model in eval mode, its model_config.yaml, every archive member) of a NeMo CTC archive, such as those
    `save_nemo` writes. Its front end and encoder are read as `load_nemo_asr` reads them."""
    import yaml

    members = read_nemo_members(path)
    if NEMO_CONFIG_FILE not in members or NEMO_WEIGHTS_FILE not in members:
        raise ValueError(f"{path}: not a .nemo archive ({NEMO_CONFIG_FILE} and {NEMO_WEIGHTS_FILE} expected)")
    config = yaml.safe_load(members[NEMO_CONFIG_FILE])
    decoder = config.get("decoder") or {}
    if "num_classes" not in decoder:
        raise ValueError(f"{path}: model_config.yaml has no decoder.num_classes; is it a CTC model?")
    preprocessor, encoder = nemo_asr_architecture(config, str(path))
    cfg = CTCModelConfig(
        preprocessor=PreprocessorConfig(**preprocessor),
        encoder=ConformerConfig(**encoder),
        spec_augment=None,  # inference or a new training run's choice, not the archive's
        vocabulary_size=int(decoder["num_classes"]),
        label_frames=int(decoder.get("label_frames", 1)),
    )
    model = CTCModel(cfg)
    state = torch.load(io.BytesIO(members[NEMO_WEIGHTS_FILE]), map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    return model.eval(), config, members
