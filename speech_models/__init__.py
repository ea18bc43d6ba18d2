"""Speech-augmented LLMs in the style of NVIDIA NeMo speechlm2 (SALM, DuplexS2S), without NeMo.

Modules: `registry` (one entry per model type: what the orchestrator needs from it), `config` (typed model
schema) built by `typed_data`, `perception` (log-mel + FastConformer + adapter), `salm`, `duplex_s2s*`,
`ctc` (a CTC ASR model saved as a `.nemo` archive: pretrained encoders), `codec`, `prompts`, `freezing`, `audio` (resampling), `metrics` (WER/BLEU), `precision`, `pretrained`
(self-contained exports, `from_pretrained`, `init_from_checkpoint`), `nemo_format` (NeMo speechlm2 checkpoint
directories, read and written), `testing` (tiny offline builders). Nothing heavy is imported here: Ray Data tasks
that only collate batches stay light, and nothing here imports the orchestrator.

The models import lazily, so `from speech_models import SALM` costs torch + transformers only when used:

    from speech_models import SALM
    model = SALM.from_pretrained("exported/salm")        # a `speechlm export` dir, a NeMo checkpoint dir or hub id
    print(model.transcribe("clip.wav"))                  # or a list of paths / float32 waveforms
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speech_models.duplex_s2s import DuplexS2SModel
    from speech_models.duplex_s2s_speech_decoder import DuplexS2SSpeechDecoderModel
    from speech_models.salm import SALM

_LAZY = {
    "SALM": "speech_models.salm",
    "DuplexS2SModel": "speech_models.duplex_s2s",
    "DuplexS2SSpeechDecoderModel": "speech_models.duplex_s2s_speech_decoder",
}
__all__ = ["SALM", "DuplexS2SModel", "DuplexS2SSpeechDecoderModel"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'speech_models' has no attribute {name!r}")
