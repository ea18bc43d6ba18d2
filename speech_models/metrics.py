"""Corpus scores of generated text: WER (jiwer) and BLEU (sacrebleu).

Texts are normalised before scoring (lowercase, punctuation removed, whitespace collapsed), so
"Hello, world!" and "hello world" count as a match. Which model reports which score, and under which name
(`val_wer`, `val_txt_bleu`, as NeMo speechlm2 logs them), is in `speech_models.registry`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation (Unicode category P*; apostrophes inside words kept), collapse spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    chars = []
    for i, ch in enumerate(text):
        if unicodedata.category(ch).startswith("P"):
            inside_word = ch in "'’" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
            chars.append(ch if inside_word else " ")
        else:
            chars.append(ch)
    return _SPACES.sub(" ", "".join(chars)).strip()


def corpus_wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER: (substitutions + deletions + insertions) / reference words, after normalisation.

    Pairs with an empty (normalised) reference contribute their hypothesis words as insertions; with no
    reference words at all, WER is 0.0 when there are no errors and 1.0 otherwise.
    """
    import jiwer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    hyps = [normalize_text(h) for h in hypotheses]
    refs = [normalize_text(r) for r in references]
    errors = sum(len(h.split()) for h, r in zip(hyps, refs, strict=True) if not r)
    pairs = [(h, r) for h, r in zip(hyps, refs, strict=True) if r]
    words = 0
    if pairs:
        out = jiwer.process_words([r for _, r in pairs], [h for h, _ in pairs])
        errors += out.substitutions + out.deletions + out.insertions
        words = out.substitutions + out.deletions + out.hits
    if words == 0:
        return 0.0 if errors == 0 else 1.0
    return errors / words


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) after normalisation."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    hyps = [normalize_text(h) for h in hypotheses]
    refs = [normalize_text(r) for r in references]
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)
