"""SALM training-step time on reference config R1, side by side with a bare PyTorch step of the same modules and,
with `--nemo-python`, with NeMo 3.0's own SALM step.

R1 (issue #4): Llama (hidden 256, ffn 704, 4 layers, 4 heads, 2 kv heads, vocab ~1000) + FastConformer
(d_model 256, 4 layers, 4 heads, 8x dw_striding, 256 conv channels, ff x4, kernel 9) + identity adapter +
linear projection; batch of 8 x 4.0 s audio, llama2 prompts ("[INST] <audio> [/INST]" + a 23-token answer +
EOS); fp32; 2 threads.

(a) SALM: `SALM(batch)` on a batch made by `SALMCollator` (splicing, shifted targets, target-only logits),
    then backward and an AdamW step.
(b) bare: the same perception, LLM and embedding called directly, the way a hand-written loop would:
    perception -> torch.cat([prompt embeddings, audio embeddings, answer embeddings]) (the layout is known in
    advance, every row has the same shape) -> `llm(inputs_embeds=..., labels=...)` -> backward -> AdamW step.
(c) NeMo (`--nemo-python PATH`, a NeMo 3.0.0 venv's python: bench/nemo_env/setup_nemo_env.sh): NeMo's SALM on
    the same architecture (random weights) and the very same batch (the same llama2 prompt ids, NeMo's layout),
    `training_step` + backward + AdamW, in its own process (bench/nemo_env/nemo_salm_step.py).

All are timed alternately step by step (machines are noisy); figures are medians of wall time, with the process
CPU time next to them (on a shared machine, wall time also counts other tenants' load; the busy fraction of the
CPUs just before the run is printed for that reason). A NeMo ratio is printed only from NeMo's step measured
here, never from a stored figure.

`--tune-malloc` keeps freed memory in glibc's heap (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD): by
default every tensor above 128 KiB is mmap'ed and unmapped, and the first activations here are 64 MB, so
each step pays tens of thousands of page faults, which are expensive in a VM. It is a process setting
(what jemalloc/tcmalloc would also fix), applied to both (a) and (b).

    python bench/salm_step.py                  # 3 warm-up + 15 timed steps of each
    python bench/salm_step.py --tune-malloc
    python bench/salm_step.py --steps 30 --profile
    python bench/salm_step.py --nemo-python /tmp/nemoenv/bin/python   # + NeMo's step, alternating
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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

BATCH, SECONDS, SAMPLE_RATE, ANSWER_TOKENS = 8, 4.0, 16000, 23  # + the llama2 answer's trailing space and EOS
PROMPT_FORMAT = "llama2"  # NeMo has no "plain" format: both sides get the same llama2 prompt ids


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
    return ModelConfig(pretrained_llm=str(llm_dir), prompt_format=PROMPT_FORMAT, perception=perception)


def r1_batch(cfg, corpus: list[str]):
    from orchestrator.config.schema import DataConfig, DatasetConfig
    from speech_models.salm import SALMCollator

    collator = SALMCollator(cfg, DataConfig(), DatasetConfig())
    tok = collator.tokenizer
    rng = np.random.default_rng(0)
    examples = []
    sentences = iter(range(0, len(corpus) - 2, 3))
    while len(examples) < BATCH:  # answers that re-tokenise to the same length, so every row has one layout
        i = next(sentences)
        ids = tok(" ".join(corpus[i : i + 3]), add_special_tokens=False)["input_ids"][:ANSWER_TOKENS]
        if len(tok(tok.decode(ids) + " ", add_special_tokens=False)["input_ids"]) != ANSWER_TOKENS + 1:
            continue
        examples.append(
            {
                "id": f"r1-{len(examples)}",
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


class NemoStep:
    """NeMo's SALM step in its own venv and process (bench/nemo_env/nemo_salm_step.py), one step per `step()`."""

    def __init__(self, nemo_python: str, model, cfg, batch: dict, work_dir: Path, threads: int, lr: float):
        from safetensors.numpy import save_file

        from speech_models.nemo_format import nemo_perception_config, save_llm_config_for_nemo, save_tokenizer_for_nemo

        llm_dir = work_dir / "llm_for_nemo"  # the same LLM, in files NeMo's transformers reads
        save_llm_config_for_nemo(model._causal_lm(), llm_dir)
        save_tokenizer_for_nemo(cfg.tokenizer_source, llm_dir)
        save_file({k: batch[k] for k in ("audios", "audio_lens", "input_ids", "loss_mask")}, str(work_dir / "batch.st"))
        # R1 has no modality adapter: NeMo's IdentityConnector with R1's projection, the same architecture.
        perception = nemo_perception_config(cfg.perception, model.perception.proj.out_features)
        spec = {
            "llm_dir": str(llm_dir),
            "batch": str(work_dir / "batch.st"),
            "perception": perception,
            "prompt_format": cfg.prompt_format,
            "audio_locator_tag": cfg.audio_locator_tag,
            "lr": lr,
            "threads": threads,
        }
        (work_dir / "spec.json").write_text(json.dumps(spec))
        self.work_dir = work_dir
        script = ROOT / "bench" / "nemo_env" / "nemo_salm_step.py"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # NeMo's own packages only
        self.process = subprocess.Popen(
            [nemo_python, str(script), str(work_dir / "spec.json")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{script} did not start in {nemo_python}; see its output above")

    def step(self) -> tuple[float, float]:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        wall, cpu = self.process.stdout.readline().split()
        return float(wall), float(cpu)

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait(timeout=60)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of SALM steps")
    parser.add_argument("--tune-malloc", action="store_true", help="keep freed memory in the heap (see above)")
    parser.add_argument("--nemo-python", help="a NeMo 3.0.0 venv's python: also time NeMo's SALM step, alternating")
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
    lr = 1e-4
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    nemo = None
    if args.nemo_python:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="nemo-step-", dir=args.cache))
        nemo = NemoStep(args.nemo_python, model, cfg, batch, work_dir, args.threads, lr)

    # (b) bare: precomputed layout [prompt before the audio tag | audio frames | rest of the prompt, answer, EOS].
    input_ids = torch.from_numpy(batch["input_ids"])
    loss_mask = torch.from_numpy(batch["loss_mask"])
    assert bool((input_ids != model.text_pad_id).all()), "R1 rows must have equal length (no padding)"
    tag_at = int((input_ids[0] == model.audio_locator_tag_id).nonzero()[0])
    assert bool((input_ids[:, tag_at] == model.audio_locator_tag_id).all()), "R1 rows must share one layout"
    before, after = input_ids[:, :tag_at], input_ids[:, tag_at + 1 :]  # (B, Lb), (B, La)
    audio = torch.from_numpy(batch["audios"])
    audio_lens = torch.from_numpy(batch["audio_lens"])
    frames = int(model.perception.output_lengths(audio_lens).max())
    after_labels = after.masked_fill(~loss_mask[:, tag_at + 1 :], -100)
    labels = torch.cat([torch.full((BATCH, tag_at + frames), -100), after_labels], dim=1)  # HF shifts them
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
        audio_embeds, _ = model.perception(audio, audio_lens)  # (B, T', H); T' may hold a padded frame
        embeds = torch.cat(
            [model.embed_tokens(before), audio_embeds[:, :frames], model.embed_tokens(after)], dim=1
        )  # (B, Lb + frames + La, H)
        loss = llm(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    contenders = {"SALM": salm_step, "bare": bare_step}
    if nemo is not None:
        contenders["NeMo"] = nemo.step
    for _ in range(args.warmup):
        for step in contenders.values():
            step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(args.steps):
        for name, step in contenders.items():
            times[name].append(step())
    if nemo is not None:
        nemo.close()
    wall = {name: 1000 * statistics.median(t for t, _ in runs) for name, runs in times.items()}
    cpu = {name: 1000 * statistics.median(c for _, c in runs) for name, runs in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    seq = batch["input_ids"].shape[1] - 1 + frames
    print(
        f"R1: {n_params / 1e6:.2f}M params, vocab {model.embed_tokens.num_embeddings}, batch {BATCH} x {SECONDS:g} s, "
        f"{frames} audio frames + {batch['input_ids'].shape[1] - 1} text tokens per row ({PROMPT_FORMAT} prompt, "
        f"seq {seq}), fp32, {torch.get_num_threads()} threads, {args.steps} steps, "
        f"malloc {'tuned' if args.tune_malloc else 'default'}"
    )
    if busy is not None:
        print(f"CPUs busy before the run (other processes): {100 * busy:.0f}% of {os.cpu_count()}")

    def spread(name: str) -> str:
        walls = [1000 * t for t, _ in times[name]]
        return f"min {min(walls):.0f}, max {max(walls):.0f}"

    labels_of = {"SALM": "SALM step (fwd+bwd+AdamW)", "bare": "bare step (same modules)", "NeMo": "NeMo 3.0 SALM step"}
    for name in contenders:
        print(f"{labels_of[name] + ':':27}median {wall[name]:.0f} ms wall ({spread(name)}), {cpu[name]:.0f} ms CPU")
    print(
        "audio-seconds per second:  "
        + ", ".join(f"{name} {BATCH * SECONDS / (wall[name] / 1000):.1f}" for name in contenders)
    )
    print(f"SALM / bare step time:     {wall['SALM'] / wall['bare']:.3f}")
    if nemo is not None:
        print(
            f"SALM / NeMo step time:     {wall['SALM'] / wall['NeMo']:.3f} (side by side, same batch; "
            "issue #4 target <= 0.80)"
        )

    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(3):
                salm_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
