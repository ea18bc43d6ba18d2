"""Pretrained parts for the demo: a CTC ASR encoder and a small causal LM, made from the demo corpus, offline.

Real SALM training starts from a pretrained ASR encoder and a pretrained LLM (canary-qwen-2.5b: a FastConformer
from an ASR model, Qwen3). The demo has no hub to download them from, so this module makes both from the demo
grammar, with the project's own model code, and saves them in the formats users point the config at:

- `llm/`: the demo's tiny Llama (`speech_models.testing.build_tiny_llm_dir`, same tokenizer as `data/demo/llm`)
  trained on the grammar's text (sentences and question/answer pairs), saved with `save_pretrained`: what
  `model.pretrained_llm` loads, like a hub id.
- `asr_ctc.nemo`: a FastConformer + CTC head (`speech_models.ctc`) trained on synthesised demo speech, saved as
  a NeMo `.nemo` archive: what `model.pretrained_asr` loads, like one of NVIDIA's ASR checkpoints. It is trained
  in two stages: characters first (a small alphabet is quick to align from scratch), then the LLM's own tokens,
  every word in the form it takes inside a sentence, so the encoder's frames already speak the units the LLM
  reads; the SALM's projection then has little to translate.

The repository ships the result (`configs/demo/pretrained/`, a few MB), because making it takes about 40 CPU
minutes, more than `make demo`'s budget; `speechlm data demo-parts` re-makes it from scratch (README, "The demo").
Training here is a plain single-process loop: the parts are small, the data fits in memory, and what is being
demonstrated is the SALM recipe that starts from them, which trains with the real Ray pipeline.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.demo import grammar
from orchestrator.storage import atomic

SAMPLE_RATE = 16000


def _log(message: str) -> None:
    print(f"[demo-parts] {message}", flush=True)


def _cosine_lr(peak: float, step: int, steps: int, warmup: int, floor: float) -> float:
    """Linear warm-up, then cosine decay to floor x peak at the last step."""
    decay = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps))
    return peak * min(1.0, (step + 1) / warmup) * decay


# ----------------------------------------------------------------------------------------------
# The language model
# ----------------------------------------------------------------------------------------------


@dataclass
class LMRecipe:
    size: str = "tiny"
    steps: int = 1500
    batch: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 100
    qa_fraction: float = 0.3
    examples: int = 100_000  # distinct training examples drawn from the grammar


def lm_examples(split: str, seed: int, qa_fraction: float) -> Iterator[list[str]]:
    """Endless mix of [sentence] and [question, answer] examples of one split (a stream apart from the ASR
    corpus's: `seed + 1000`)."""
    rng = random.Random(f"lm-{split}-{seed}")
    sentences = grammar.generate_sentences(split, seed + 1000)
    pairs = grammar.generate_qa_pairs(split, seed + 1000)
    while True:
        if rng.random() < qa_fraction:
            pair = next(pairs)
            yield [pair.question, pair.answer]
        else:
            yield [next(sentences)]


def _packed_ids(tokenizer, examples: list[list[str]]) -> torch.Tensor:
    """Every text of every example followed by EOS, back to back (1-D). Each text is tokenized on its own, as
    SALM's plain prompt format tokenizes an answer."""
    texts = [t for example in examples for t in example]
    out: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        out += [*ids, tokenizer.eos_token_id]
    return torch.tensor(out)


@torch.no_grad()
def heldout_perplexity(model, tokenizer, examples: list[list[str]]) -> float:
    """Per-token perplexity of BOS + example (EOS after each text), averaged over tokens."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(examples), 64):
        rows = [[tokenizer.bos_token_id, *_packed_ids(tokenizer, [ex]).tolist()] for ex in examples[i : i + 64]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for k, row in enumerate(rows):
            ids[k, : len(row)], mask[k, : len(row)] = torch.tensor(row), 1
        labels = ids.masked_fill(mask == 0, -100)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        tokens = int((labels[:, 1:] != -100).sum())
        nll, count = nll + float(out.loss) * tokens, count + tokens
    model.train()
    return math.exp(nll / count)


def train_lm(out: Path, work: Path, seed: int, recipe: LMRecipe) -> dict[str, Any]:
    """Pretrain the demo LLM into `out` (a save_pretrained directory); returns its training record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.demo.assets import tokenizer_corpus
    from speech_models.testing import build_tiny_llm_dir

    init = build_tiny_llm_dir(work / "llm_init", tokenizer_corpus(seed), size=recipe.size, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    torch.manual_seed(seed)
    corpus = _packed_ids(
        tokenizer, list(itertools.islice(lm_examples("train", seed, recipe.qa_fraction), recipe.examples))
    )
    # Rows start right after an EOS (an example boundary) and get a BOS, as a prompt starts.
    starts = torch.cat([torch.tensor([0]), (corpus == tokenizer.eos_token_id).nonzero().squeeze(-1) + 1])
    starts = starts[starts < len(corpus) - recipe.seq_len]
    held_out = list(itertools.islice(lm_examples("val", seed, recipe.qa_fraction), 400))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    history = [{"step": 0, "val_ppl": round(heldout_perplexity(model, tokenizer, held_out), 3)}]
    _log(f"LLM ({recipe.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters): "
         f"{len(corpus):,} training tokens, held-out perplexity {history[0]['val_ppl']} before training")  # fmt: skip
    started = time.perf_counter()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(recipe.lr, step, recipe.steps, recipe.warmup, floor=0.05)
        pick = starts[torch.randint(len(starts), (recipe.batch,), generator=generator)]
        rows = corpus[pick[:, None] + torch.arange(recipe.seq_len - 1)[None, :]]
        batch = torch.cat([torch.full((recipe.batch, 1), tokenizer.bos_token_id), rows], dim=1)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 250 == 0 or step + 1 == recipe.steps:
            history.append({"step": step + 1, "val_ppl": round(heldout_perplexity(model, tokenizer, held_out), 3)})
            _log(f"LLM step {step + 1}/{recipe.steps}: loss {loss.item():.3f}, held-out perplexity "
                 f"{history[-1]['val_ppl']} ({time.perf_counter() - started:.0f} s)")  # fmt: skip
    record = {"recipe": recipe.__dict__, "history": history, "train_seconds": round(time.perf_counter() - started)}
    # An existing `out` (only with --overwrite: make_demo_parts checks) is replaced once the new one is complete.
    with atomic.atomic_dir(out, merge_into_existing=True, replace=lambda name: True) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        (partial / "pretraining.json").write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------------------------
# The CTC ASR encoder
# ----------------------------------------------------------------------------------------------


@dataclass
class EncoderRecipe:
    train_hours: float = 8.0  # synthesised demo speech; its first hour is the demo's own train split
    char_steps: int = 1000  # stage 1: characters, from scratch
    token_steps: int = 3000  # stage 2: the LLM's tokens, from stage 1
    batch_seconds: float = 120.0  # padded audio per step
    lr: float = 2e-3
    eval_every: int = 500


@dataclass
class Utterance:
    audio: np.ndarray
    text: str


def load_utterances(shar_dir: Path) -> list[Utterance]:
    from lhotse import CutSet

    return [
        Utterance(cut.load_audio().reshape(-1).astype(np.float32), " ".join(s.text for s in cut.supervisions))
        for cut in CutSet.from_shar(in_dir=str(shar_dir))
    ]


def _batches(utterances: list[Utterance], batch_seconds: float, rng: random.Random | None) -> list[list[int]]:
    """Index batches of at most batch_seconds of padded audio, similar lengths together (shuffled windows of 256
    when rng is given, else one sorted pass)."""
    order = list(range(len(utterances)))
    if rng is not None:
        rng.shuffle(order)
    windows = [order[i : i + 256] for i in range(0, len(order), 256)] if rng is not None else [order]
    batches: list[list[int]] = []
    for window in windows:
        batch: list[int] = []
        for i in sorted(window, key=lambda i: len(utterances[i].audio)):
            if batch and len(utterances[i].audio) * (len(batch) + 1) > batch_seconds * SAMPLE_RATE:
                batches.append(batch)
                batch = []
            batch.append(i)
        batches.append(batch)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def _padded(utterances: list[Utterance]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(u.audio) for u in utterances])
    audio = torch.zeros(len(utterances), int(lens.max()))
    for k, u in enumerate(utterances):
        audio[k, : len(u.audio)] = torch.from_numpy(u.audio)
    return audio, lens


@dataclass
class Labels:
    """How texts become CTC targets and back."""

    name: str
    size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    vocabulary: list[str]


def character_labels(texts: list[str]) -> Labels:
    alphabet = sorted({c for t in texts for c in t})
    index = {c: i for i, c in enumerate(alphabet)}
    return Labels(
        "characters",
        len(alphabet),
        lambda t: [index[c] for c in t if c in index],
        lambda ids: "".join(alphabet[i] for i in ids),
        alphabet,
    )


def llm_token_labels(tokenizer) -> Labels:
    """The LLM's tokens, each word in its mid-sentence form (" word"), as the LLM reads words after a prompt."""
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return Labels(
        "llm_tokens",
        len(tokenizer),
        lambda t: tokenizer(" " + t.strip(), add_special_tokens=False)["input_ids"],
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        vocabulary,
    )


@torch.no_grad()
def ctc_wer(model, labels: Labels, utterances: list[Utterance]) -> tuple[float, list[tuple[str, str]]]:
    """Greedy-decoding WER and the first (reference, hypothesis) pairs."""
    import jiwer

    model.eval()
    refs, hyps = [], []
    for batch in _batches(utterances, 60.0, rng=None):
        audio, lens = _padded([utterances[i] for i in batch])
        for i, ids in zip(batch, model.greedy_ids(audio, lens), strict=True):
            refs.append(utterances[i].text)
            hyps.append(" ".join(labels.decode(ids).split()))
    model.train()
    return float(jiwer.wer(refs, hyps)), list(zip(refs, hyps, strict=True))[:3]


def train_ctc_stage(
    model, labels: Labels, train: list[Utterance], val: list[Utterance], steps: int, recipe: EncoderRecipe, seed: int
) -> list[dict[str, Any]]:
    targets = [labels.encode(u.text) for u in train]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 1e-3}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    rng = random.Random(seed)
    history, step, started = [], 0, time.perf_counter()
    model.train()
    while step < steps:
        for batch in _batches(train, recipe.batch_seconds, rng):
            if step >= steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(recipe.lr, step, steps, warmup=100, floor=0.02)
            audio, lens = _padded([train[i] for i in batch])
            loss = model.loss(audio, lens, [targets[i] for i in batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 100 == 0:
                _log(f"encoder ({labels.name}) step {step}/{steps}: CTC loss {loss.item():.3f} "
                     f"({(time.perf_counter() - started) / 60:.1f} min)")  # fmt: skip
            if step % recipe.eval_every == 0 or step == steps:
                wer, pairs = ctc_wer(model, labels, val)
                history.append({"stage": labels.name, "step": step, "val_wer": round(wer, 4)})
                _log(f"encoder ({labels.name}) step {step}: val WER {wer:.3f}, e.g. {pairs[0]}")
    return history


def train_encoder(
    out: Path, llm_dir: Path, train: list[Utterance], val: list[Utterance], seed: int, recipe: EncoderRecipe
) -> dict[str, Any]:
    """Characters, then the LLM's tokens (the encoder and front end carried over, a new head); saves `out`."""
    from transformers import AutoTokenizer

    from speech_models.config import ConformerConfig, PreprocessorConfig, SpecAugmentConfig
    from speech_models.ctc import CTCModel, CTCModelConfig, nemo_config, save_nemo

    preprocessor = PreprocessorConfig(features=64, normalize="per_feature")
    encoder = ConformerConfig(
        feat_in=64, n_layers=4, d_model=128, n_heads=4, subsampling="dw_striding", subsampling_factor=8,
        subsampling_conv_channels=128, ff_expansion_factor=4, conv_kernel_size=9, conv_norm_type="batch_norm",
        dropout=0.1, dropout_pre_encoder=0.0, dropout_att=0.0,
    )  # fmt: skip
    spec_augment = SpecAugmentConfig(freq_masks=2, time_masks=2, freq_width=8, time_width=0.05)
    torch.manual_seed(seed)
    chars = character_labels([u.text for u in train])
    # Characters are often shorter than an 80 ms frame: two label frames per encoder frame.
    model = CTCModel(CTCModelConfig(preprocessor, encoder, spec_augment, chars.size, label_frames=2))
    history = train_ctc_stage(model, chars, train, val, recipe.char_steps, recipe, seed)

    tokens = llm_token_labels(AutoTokenizer.from_pretrained(llm_dir))
    token_model = CTCModel(CTCModelConfig(preprocessor, encoder, spec_augment, tokens.size, label_frames=1))
    carried = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    token_model.load_state_dict(carried, strict=False)
    history += train_ctc_stage(token_model, tokens, train, val, recipe.token_steps, recipe, seed + 1)
    record = {"recipe": recipe.__dict__, "history": history, "labels": tokens.name, "llm": str(llm_dir)}
    tokenizer_json = (Path(llm_dir) / "tokenizer.json").read_bytes()
    save_nemo(
        out, token_model, nemo_config(token_model.cfg, tokens.vocabulary, record), {"tokenizer.json": tokenizer_json}
    )
    return record


# ----------------------------------------------------------------------------------------------
# Both
# ----------------------------------------------------------------------------------------------


def make_demo_parts(
    out_dir: str | Path,
    work_dir: str | Path,
    seed: int = 0,
    lm: LMRecipe | None = None,
    encoder: EncoderRecipe | None = None,
    num_workers: int = 2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Make `llm/` and `asr_ctc.nemo` in out_dir (see the module docstring). work_dir keeps the synthesised
    speech, so a re-run skips synthesis. Refuses to replace existing parts unless overwrite."""
    from orchestrator.demo import synth
    from orchestrator.demo.assets import HELDOUT_FRACTION, write_demo_split

    lm, encoder = lm or LMRecipe(), encoder or EncoderRecipe()
    out, work = Path(out_dir), Path(work_dir)
    llm_dir, asr_path = out / "llm", out / "asr_ctc.nemo"
    if not overwrite and (llm_dir.exists() or asr_path.exists()):
        raise FileExistsError(f"{out} already holds demo parts; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = {"train": encoder.train_hours * 3600, "val": 3600 * HELDOUT_FRACTION}
    pool = synth.worker_pool(num_workers, preload=["orchestrator.demo.assets"]) if num_workers > 1 else None
    try:
        for split, seconds in splits.items():
            if not (work / "asr" / split).is_dir():
                _log(f"synthesising {seconds / 3600:.2f} h of demo speech ({split}) into {work / 'asr' / split}")
                write_demo_split(
                    work / "asr" / split, "asr", split, seed, target_s=seconds, min_cuts=50, pool=pool, progress=True
                )
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    lm_record = train_lm(llm_dir, work, seed, lm)
    train, val = load_utterances(work / "asr" / "train"), load_utterances(work / "asr" / "val")
    _log(
        f"encoder: {len(train)} training utterances ({sum(len(u.audio) for u in train) / SAMPLE_RATE / 3600:.1f} h), {len(val)} val"
    )
    encoder_record = train_encoder(asr_path, llm_dir, train, val, seed, encoder)
    summary = {
        "seed": seed,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "llm": lm_record,
        "encoder": encoder_record,
    }
    atomic.write_text(out / "MADE_BY.json", json.dumps(summary, indent=1))
    _log(f"done in {summary['minutes']} min: {llm_dir}, {asr_path}")
    return summary
