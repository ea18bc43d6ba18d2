"""SALM training-step time on reference config R1, side by side with a bare PyTorch step of the same modules.

R1 (issue #4): Llama (hidden 256, ffn 704, 4 layers, 4 heads, 2 kv heads, vocab ~1000) + FastConformer
(d_model 256, 4 layers, 4 heads, 8x dw_striding, 256 conv channels, ff x4, kernel 9) + identity adapter +
linear projection; batch of 8 x 4.0 s audio with 24 text tokens each; fp32; 2 threads.

(a) SALM: `SALM(batch)` on a batch made by `SALMCollator` (splicing, shifted targets, target-only logits),
    then backward and an AdamW step.
(b) bare: the same perception, LLM and embedding called directly, the way a hand-written loop would:
    perception -> torch.cat([audio embeddings, answer embeddings]) (the layout is known in advance, every
    row has the same shape) -> `llm(inputs_embeds=..., labels=...)` -> backward -> AdamW step.

The two are timed alternately in one process (machines are noisy); figures are medians of wall time, with
the process CPU time next to them (on a shared machine, wall time also counts other tenants' load; the
busy fraction of the CPUs just before the run is printed for that reason).

`--tune-malloc` keeps freed memory in glibc's heap (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD): by
default every tensor above 128 KiB is mmap'ed and unmapped, and the first activations here are 64 MB, so
each step pays tens of thousands of page faults, which are expensive in a VM. It is a process setting
(what jemalloc/tcmalloc would also fix), applied to both (a) and (b).

    python bench/salm_step.py                  # 3 warm-up + 15 timed steps of each
    python bench/salm_step.py --tune-malloc
    python bench/salm_step.py --steps 30 --profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.training.worker_io import keep_freed_memory_in_heap  # noqa: E402

BATCH, SECONDS, SAMPLE_RATE, ANSWER_TOKENS = 8, 4.0, 16000, 23  # + EOS = 24 target tokens


def r1_corpus(n_sentences: int = 3000, seed: int = 0) -> list[str]:
    """Pseudo-words from random syllables: enough distinct merges for a ~1000-token BPE vocabulary."""
    rng = np.random.default_rng(seed)
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr", "st"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
    words = sorted(
        {"".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.integers(1, 4))) for _ in range(3000)}
    )
    return [" ".join(rng.choice(words, size=rng.integers(8, 16))) for _ in range(n_sentences)]


def r1_config(llm_dir: Path):
    from speech_models.config import ConformerConfig, ModelConfig, PerceptionConfig, PreprocessorConfig

    encoder = ConformerConfig(
        feat_in=80,
        n_layers=4,
        d_model=256,
        n_heads=4,
        subsampling="dw_striding",
        subsampling_factor=8,
        subsampling_conv_channels=256,
        ff_expansion_factor=4,
        conv_kernel_size=9,
    )
    perception = PerceptionConfig(preprocessor=PreprocessorConfig(features=80), encoder=encoder, modality_adapter=None)
    return ModelConfig(pretrained_llm=str(llm_dir), prompt_format="plain", perception=perception)


def r1_batch(cfg, corpus: list[str]):
    from orchestrator.config.schema import DataConfig, DatasetConfig
    from speech_models.salm import SALMCollator

    collator = SALMCollator(cfg, DataConfig(), DatasetConfig())
    tok = collator.tokenizer
    rng = np.random.default_rng(0)
    examples = []
    for i in range(BATCH):
        ids = tok(" ".join(corpus[3 * i : 3 * i + 3]), add_special_tokens=False)["input_ids"][:ANSWER_TOKENS]
        examples.append(
            {
                "id": f"r1-{i}",
                "duration": SECONDS,
                "audio": (rng.standard_normal(int(SECONDS * SAMPLE_RATE)) * 0.1).astype(np.float32),
                "text": tok.decode(ids),
                "supervisions": [],
            }
        )
    return collator(examples)


def cpu_busy_fraction(seconds: float = 2.0) -> float | None:
    """Fraction of all CPUs busy (any process) over `seconds`, from /proc/stat; None off Linux."""
    try:

        def read() -> list[int]:
            with open("/proc/stat") as f:
                return [int(v) for v in f.readline().split()[1:8]]

        a = read()
        time.sleep(seconds)
        b = read()
    except OSError:
        return None
    busy = sum(b[i] - a[i] for i in (0, 1, 2, 5, 6))
    total = sum(b[i] - a[i] for i in range(7))
    return busy / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of SALM steps")
    parser.add_argument("--tune-malloc", action="store_true", help="keep freed memory in the heap (see above)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "speechlm-bench"))
    args = parser.parse_args()

    if args.tune_malloc and not keep_freed_memory_in_heap():
        raise OSError("mallopt failed")
    busy = cpu_busy_fraction()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from speech_models.salm import SALM
    from speech_models.testing import build_tiny_llm_dir

    corpus = r1_corpus()
    llm_dir = build_tiny_llm_dir(Path(args.cache) / "r1-llm", texts=corpus, size="small", vocab_size=1000)
    cfg = r1_config(llm_dir)
    model = SALM(cfg).train()
    batch = r1_batch(cfg, corpus)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    # (b) bare: precomputed layout [audio frames | answer tokens], labels -100 on audio frames.
    input_ids = torch.from_numpy(batch["input_ids"])
    loss_mask = torch.from_numpy(batch["loss_mask"])
    assert bool((input_ids != model.text_pad_id).all()), "R1 rows must have equal length (no padding)"
    answer_ids = input_ids[:, 1:]  # the plain prompt is [audio tag] + answer + eos
    audio = torch.from_numpy(batch["audios"])
    audio_lens = torch.from_numpy(batch["audio_lens"])
    frames = int(model.perception.output_lengths(audio_lens).max())
    labels = torch.cat([torch.full((BATCH, frames), -100), answer_ids.masked_fill(~loss_mask[:, 1:], -100)], dim=1)
    llm = model._causal_lm()

    def salm_step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    def bare_step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        audio_embeds, _ = model.perception(audio, audio_lens)  # (B, frames, H)
        embeds = torch.cat([audio_embeds, model.embed_tokens(answer_ids)], dim=1)  # (B, frames + 24, H)
        loss = llm(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    for _ in range(args.warmup):
        salm_step()
        bare_step()
    salm_times, bare_times = [], []
    for _ in range(args.steps):
        salm_times.append(salm_step())
        bare_times.append(bare_step())
    salm_ms = 1000 * statistics.median(t for t, _ in salm_times)
    bare_ms = 1000 * statistics.median(t for t, _ in bare_times)
    salm_cpu = 1000 * statistics.median(c for _, c in salm_times)
    bare_cpu = 1000 * statistics.median(c for _, c in bare_times)
    n_params = sum(p.numel() for p in model.parameters())
    seq = batch["input_ids"].shape[1] - 1 + frames
    print(
        f"R1: {n_params / 1e6:.2f}M params, vocab {len(model.tokenizer)}, batch {BATCH} x {SECONDS:g} s, "
        f"{frames} audio frames + {batch['input_ids'].shape[1] - 1} text tokens per row (seq {seq}), "
        f"fp32, {torch.get_num_threads()} threads, {args.steps} steps, malloc {'tuned' if args.tune_malloc else 'default'}"
    )
    if busy is not None:
        print(f"CPUs busy before the run (other processes): {100 * busy:.0f}% of {os.cpu_count()}")

    def spread(times: list[tuple[float, float]]) -> str:
        walls = [1000 * t for t, _ in times]
        return f"min {min(walls):.0f}, max {max(walls):.0f}"

    print(f"SALM step (fwd+bwd+AdamW): median {salm_ms:.0f} ms wall ({spread(salm_times)}), {salm_cpu:.0f} ms CPU")
    print(f"bare step (same modules):  median {bare_ms:.0f} ms wall ({spread(bare_times)}), {bare_cpu:.0f} ms CPU")
    print(
        f"audio-seconds per second:  SALM {BATCH * SECONDS / (salm_ms / 1000):.1f}, bare {BATCH * SECONDS / (bare_ms / 1000):.1f}"
    )
    print(f"SALM / bare step time:     {salm_ms / bare_ms:.3f}")
    print(f"vs NeMo 3.0 SALM on R1 (~1060 ms/step): {salm_ms / 1060:.2f}x  (issue #4 target <= 0.80x, i.e. <= 850 ms)")

    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(3):
                salm_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
