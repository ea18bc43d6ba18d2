"""The SALM training step on one GPU at canary-qwen scale: bf16 step time, tokens/s, audio-s/s and MFU, without
and with activation checkpointing, side by side in one run.

The model (random weights, nothing downloaded): a Qwen3-1.7B-shaped LLM (transformers `Qwen3Config`: 28 layers,
hidden 2048, 16 query / 8 KV heads of 128, FFN 6144, vocab 151936, tied embeddings), frozen, with LoRA (r 128 on
q/k/v/o); a 600M-class FastConformer encoder (24 layers, d_model 1024, 8 heads, 128 mels, 8x dw-striding
subsampling), trained; NeMo's 2-layer Conformer modality adapter and the projection to the LLM width, trained;
the token embedding frozen (tied to the LM head, which LoRA freezes). A batch: 32 utterances of 10 s with a
~60-token transcript each. AdamW, bf16-true (NeMo's salm.yaml precision; `--precision bf16-mixed` for autocast
over fp32 weights).

tokens/s counts the LLM positions a step processes (text tokens and audio frames, padding excluded). MFU = model
FLOPs per step / (step time x the GPU's dense bf16 peak). Model FLOPs are counted once by
`torch.utils.flop_counter.FlopCounterMode` over a whole step (forward + backward, matmuls, convolutions and
attention; frozen weights get no weight-gradient FLOPs), without activation checkpointing, so the recomputation
checkpointing adds shows up as a lower MFU, not as more useful work. Peaks (dense bf16): H100/H200 SXM 989
TFLOPS, A100 312; others take `--peak-tflops`.

    python bench/gpu.py                    # one GPU, the shapes above (about 3-5 minutes on an H200)
    python bench/gpu.py --batch 16 --steps 20
    python bench/gpu.py --dry-run          # tiny shapes on whatever device there is (CPU in CI): checks the script

Needs torch, transformers and peft only: it imports `speech_models` (never Ray, lhotse or MLflow; checked at
the end) and works from a bare CUDA image with those three packages and this repository on the path.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
FORBIDDEN_IMPORTS = ("ray", "lhotse", "mlflow")
DEADLINE_S = 7 * 60  # the whole script stays under 8 minutes on one GPU: timing stops early if it must


@dataclass(frozen=True)
class Shapes:
    llm_layers: int = 28
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 6144
    vocab: int = 151936
    encoder_layers: int = 24
    encoder_width: int = 1024
    encoder_heads: int = 8
    mels: int = 128
    adapter_layers: int = 2
    lora_rank: int = 128
    batch: int = 32
    seconds: float = 10.0
    words: int = 40  # transcript length; ~1.5 tokens a word with the bench tokenizer


TINY = Shapes(
    llm_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=1000, encoder_layers=2,
    encoder_width=64, encoder_heads=4, mels=64, adapter_layers=1, lora_rank=4, batch=2, seconds=1.0, words=8,
)  # fmt: skip


def write_llm_dir(out: Path, shapes: Shapes) -> Path:
    """config.json of a Qwen3-shaped LLM + a tokenizer: all `pretrained_weights: false` needs (random init)."""
    from transformers import Qwen3Config

    from speech_models.testing import DEFAULT_TINY_CORPUS, build_tokenizer

    tokenizer = build_tokenizer(DEFAULT_TINY_CORPUS, vocab_size=1000)
    tokenizer.save_pretrained(out)
    Qwen3Config(
        vocab_size=max(shapes.vocab, len(tokenizer)),
        hidden_size=shapes.hidden,
        intermediate_size=shapes.ffn,
        num_hidden_layers=shapes.llm_layers,
        num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads,
        head_dim=shapes.head_dim,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)
    return out


def model_config(llm_dir: Path, shapes: Shapes):
    from speech_models.config import ConformerConfig, LoraConfig, ModelConfig, PerceptionConfig, PreprocessorConfig

    def conformer(**kw):
        return ConformerConfig(
            d_model=shapes.encoder_width, n_heads=shapes.encoder_heads, ff_expansion_factor=4, conv_kernel_size=9,
            dropout=0.1, dropout_pre_encoder=0.1, dropout_att=0.1, **kw,
        )  # fmt: skip

    return ModelConfig(
        pretrained_llm=str(llm_dir),
        pretrained_weights=False,  # random init from the configs: nothing to download or load
        prompt_format="plain",  # LoRA freezes the LLM, and with it the token embedding (tied to the LM head)
        lora=LoraConfig(
            r=shapes.lora_rank,
            lora_alpha=2 * shapes.lora_rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
        perception=PerceptionConfig(
            preprocessor=PreprocessorConfig(features=shapes.mels),
            encoder=conformer(feat_in=shapes.mels, n_layers=shapes.encoder_layers, subsampling_conv_channels=256),
            modality_adapter=conformer(
                feat_in=shapes.encoder_width, n_layers=shapes.adapter_layers, subsampling_factor=1
            ),
        ),
    )


def make_batch(cfg, shapes: Shapes) -> dict:
    import numpy as np

    from speech_models.salm import SALMCollator
    from speech_models.testing import DEFAULT_TINY_CORPUS

    words = sorted({word for line in DEFAULT_TINY_CORPUS for word in line.split()})
    rng = np.random.default_rng(0)
    samples = int(16000 * shapes.seconds)
    examples = [
        {
            "id": str(i),
            "audio": (0.1 * rng.standard_normal(samples)).astype(np.float32),
            "text": " ".join(rng.choice(words, shapes.words)),
        }
        for i in range(shapes.batch)
    ]
    return SALMCollator(cfg, None, None)(examples)


def build(cfg, device, precision: str, checkpointing: bool):
    import torch

    from speech_models.memory import apply_activation_checkpointing
    from speech_models.precision import setup_precision
    from speech_models.salm import SALM

    torch.manual_seed(0)
    with device:  # parameters are made on the GPU: no host copy of a 2B model, no slow CPU init
        model = SALM(cfg)
    model = model.to(device).train()
    autocast = setup_precision(model, precision, device)
    if checkpointing:
        apply_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    return model, autocast, optimizer


def count_params(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def measure(cfg, batch, device, precision: str, checkpointing: bool, steps: int, warmup: int, deadline: float):
    import torch

    model, autocast, optimizer = build(cfg, device, precision, checkpointing)
    batch = {k: torch.as_tensor(v).to(device) if hasattr(v, "shape") else v for k, v in batch.items()}
    stats: dict = {}

    def step() -> None:
        with autocast():
            out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats["tokens"] = int(out["num_target_tokens"])

    flops = None
    if not checkpointing:  # model FLOPs: what the step computes once, recomputation excluded
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        if time.monotonic() > deadline:
            break
    trainable, total = count_params(model)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    # LLM positions the step processes, padding excluded: each row's text, its placeholder replaced by its frames
    frames = model.perception.output_lengths(batch["audio_lens"])
    text = (batch["input_ids"] != model.text_pad_id).sum(dim=1)
    stats["positions"] = int((text - 1 + frames).sum())
    times.sort()
    result = {
        "step_s": times[len(times) // 2],
        "steps_timed": len(times),
        "flops": flops,
        "peak_gib": peak,
        "trainable": trainable,
        "params": total,
        "positions": stats["positions"],
        "target_tokens": stats["tokens"],
    }
    return result


def peak_tflops(device, override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, device.type
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name.replace(" ", ""):
            return value, name
    return None, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--precision", default="bf16-true", choices=["bf16-true", "bf16-mixed"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 steps: checks the script (CPU ok)")
    args = parser.parse_args()
    started = time.monotonic()

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.dry_run:
        print("bench/gpu.py needs a CUDA GPU; --dry-run runs it at tiny shapes on this machine")
        return
    shapes = TINY if args.dry_run else Shapes()
    if args.batch or args.seconds:
        from dataclasses import replace

        shapes = replace(shapes, batch=args.batch or shapes.batch, seconds=args.seconds or shapes.seconds)
    steps, warmup = (2, 1) if args.dry_run else (args.steps, args.warmup)
    deadline = started + DEADLINE_S

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        cfg = model_config(write_llm_dir(Path(tmp) / "llm", shapes), shapes)
        batch = make_batch(cfg, shapes)
        rows = {}
        for name, checkpointing in (("plain", False), ("activation checkpointing", True)):
            rows[name] = measure(cfg, batch, device, args.precision, checkpointing, steps, warmup, deadline)
            gc.collect()  # the previous model and optimizer, before the next is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    flops = rows["plain"]["flops"]
    peak, where = peak_tflops(device, args.peak_tflops)
    llm_tokens = rows["plain"]["positions"]
    audio_seconds = shapes.batch * shapes.seconds
    plain = rows["plain"]
    print(
        f"SALM, {shapes.llm_layers}-layer {shapes.hidden}-wide Qwen3-shaped LLM (frozen, LoRA r {shapes.lora_rank}), "
        f"{shapes.encoder_layers} x {shapes.encoder_width} FastConformer + {shapes.adapter_layers}-layer adapter "
        f"(trained): {plain['params'] / 1e9:.2f} B parameters, {plain['trainable'] / 1e6:.0f} M trained; "
        f"batch {shapes.batch} x {shapes.seconds:g} s: {llm_tokens} LLM positions (text + audio frames, no padding), "
        f"{plain['target_tokens']} target tokens; "
        f"{args.precision}, {where}, torch {torch.__version__}; {flops / 1e12:.1f} TFLOP a step (counted)\n"
    )
    print("| | step time (s) | tokens/s | audio-s/s | MFU | peak memory (GiB) | vs plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    figures = {}
    for name, row in rows.items():
        step_s = row["step_s"]
        mfu = flops / step_s / (peak * 1e12) if peak else None
        figures[name] = {
            **row,
            "tokens_per_s": llm_tokens / step_s,
            "audio_s_per_s": audio_seconds / step_s,
            "mfu": mfu,
            "model_flops": flops,
        }
        peak_mem = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "n/a"
        print(
            f"| {name} | {step_s:.3f} | {llm_tokens / step_s:,.0f} | {audio_seconds / step_s:,.0f} | "
            f"{f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | {peak_mem} | "
            f"{step_s / plain['step_s']:.2f}x |"
        )
    leaked = [m for m in FORBIDDEN_IMPORTS if m in sys.modules]
    if leaked:
        raise SystemExit(f"bench/gpu.py imported {leaked}: speech_models must run on torch + transformers + peft")
    print(f"\n{time.monotonic() - started:.0f} s in all; imports: torch, transformers, peft (no {FORBIDDEN_IMPORTS})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
