"""WER / BLEU / accuracy with text normalisation, per validation set and averaged."""

from __future__ import annotations

import pytest

from speech_models.metrics import corpus_bleu, corpus_wer, normalize_text, text_metrics, token_accuracy


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


def test_text_metrics_per_dataset_and_mean():
    metrics = text_metrics(
        {
            "clean": (["the cat sat on the mat"], ["The cat sat on the mat."]),
            "noisy": (["the cat sat on the"], ["the cat sat on the mat"]),
        }
    )
    assert metrics["wer_clean"] == 0.0 and metrics["wer_noisy"] == pytest.approx(1 / 6)
    assert metrics["wer"] == pytest.approx(1 / 12)
    assert metrics["txt_bleu_clean"] == pytest.approx(100.0)
    assert metrics["txt_bleu"] == pytest.approx((metrics["txt_bleu_clean"] + metrics["txt_bleu_noisy"]) / 2)
    assert set(metrics) == {"wer_clean", "wer_noisy", "wer", "txt_bleu_clean", "txt_bleu_noisy", "txt_bleu"}
    assert text_metrics({}) == {}


def test_token_accuracy():
    assert token_accuracy(3, 4) == 0.75 and token_accuracy(0, 0) == 0.0
