"""WER / BLEU / accuracy with text normalisation, per validation set and averaged, as each model's registry
entry defines them."""

from __future__ import annotations

import pytest

from orchestrator.training.validation import SetTotals, average_over_sets, set_metrics
from speech_models.metrics import corpus_bleu, corpus_wer, normalize_text
from speech_models.registry import ACCURACY, MODELS


def test_normalize_text():
    assert normalize_text("  Hello,   World!! ") == "hello world"
    assert normalize_text("It's a dog's life.") == "it's a dog's life"
    assert normalize_text("'quoted' — text…") == "quoted text"
    assert normalize_text("Ünïcode\tTABS\nand-dashes") == "ünïcode tabs and dashes"


def test_wer():
    assert corpus_wer(["the cat sit"], ["the cat sat"]) == pytest.approx(1 / 3)
    assert corpus_wer(["The cat, sat!"], ["the cat sat"]) == 0.0  # case and punctuation ignored
    # corpus-level: (1 substitution + 1 insertion) / 5 reference words
    assert corpus_wer(["a b x", "c d e"], ["a b c", "d e"]) == pytest.approx(0.4)
    assert corpus_wer(["extra words"], [""]) == 1.0 and corpus_wer([""], [""]) == 0.0
    assert corpus_wer(["", "a"], ["", "a"]) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_wer(["a", "b"], ["a"])


def test_bleu():
    ref = "the quick brown fox jumps over the lazy dog"
    assert corpus_bleu([ref.upper() + "."], [ref]) == pytest.approx(100.0)
    assert corpus_bleu(["completely different words here"], [ref]) < 10.0
    assert corpus_bleu([], []) == 0.0


def _text_metrics(model_type: str, per_set: dict[str, tuple[list[str], list[str]]]) -> dict[str, float]:
    """Validation metrics of `model_type` for sets of (hypotheses, references), counts all zero."""
    entry = MODELS[model_type]
    totals = {
        name: SetTotals(dict.fromkeys(entry.count_names(), 0.0), list(hyps), list(refs))
        for name, (hyps, refs) in per_set.items()
    }
    return average_over_sets(set_metrics(entry, totals), entry, list(per_set))


def test_text_metrics_per_dataset_and_mean():
    sets = {
        "clean": (["the cat sat on the mat"], ["The cat sat on the mat."]),
        "noisy": (["the cat sat on the"], ["the cat sat on the mat"]),
    }
    salm = _text_metrics("salm", sets)
    assert salm["val_wer_clean"] == 0.0 and salm["val_wer_noisy"] == pytest.approx(1 / 6)
    assert salm["val_wer"] == pytest.approx(1 / 12)
    assert set(salm) == {f"val_{m}{s}" for m in ("loss", "acc", "wer") for s in ("_clean", "_noisy", "")}
    duplex = _text_metrics("duplex_s2s", sets)
    assert duplex["val_txt_bleu_clean"] == pytest.approx(100.0)
    assert duplex["val_txt_bleu"] == pytest.approx((duplex["val_txt_bleu_clean"] + duplex["val_txt_bleu_noisy"]) / 2)
    assert _text_metrics("salm", {}) == {}
    # a set without references (nothing to score) reports no text metric, and is left out of the mean
    assert "val_wer_empty" not in _text_metrics("salm", {"empty": ([], []), **sets})


def test_token_accuracy():
    assert ACCURACY.value({"num_correct": 3, "num_tokens": 4}, [], []) == 0.75
    assert ACCURACY.value({"num_correct": 0, "num_tokens": 0}, [], []) == 0.0
