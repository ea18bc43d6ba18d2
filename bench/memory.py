"""Peak memory of one SALM training step on a long-audio batch, with and without activation checkpointing
(`trainer.activation_checkpointing`) and encoder chunking (`model.encoder_chunk_size_seconds`), side by side in
one run.

Each of the four settings runs in a fresh process: build the model (random init, the shapes below) and the
optimizer with its state (a zero-learning-rate step on zero gradients), then one measured step, then `--steps`
timed steps. The figure is the peak of the measured step minus what the process held before it (weights,
optimizer state, batch): the memory the step's activations and gradients take. On CPU the peak is the resident
set (Linux VmHWM, reset through /proc/self/clear_refs), in a process whose allocator returns every block of 64
KiB or more to the system when freed (MALLOC_MMAP_THRESHOLD_), so the resident set follows what is allocated;
on CUDA `torch.cuda.max_memory_allocated`.

    python bench/memory.py                           # CPU: 2 x 120 s audio, 8-layer 256-wide encoder, small LLM
    python bench/memory.py --seconds 30 --tiny       # a quick check
    python bench/memory.py --device cuda --seconds 300 --batch 4 --llm-layers 16 --hidden 2048   # on a GPU

Needs torch, transformers (speech_models only); the LLM is a random Llama of the requested shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = {  # name: (activation checkpointing, encoder chunk seconds or None)
    "baseline": (False, None),
    "activation checkpointing": (True, None),
    "encoder chunking": (False, "chunk"),
    "both": (True, "chunk"),
}


def build_llm(out: Path, layers: int, hidden: int) -> Path:
    from speech_models.testing import LLM_SIZES, build_tiny_llm_dir

    LLM_SIZES["bench"] = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        intermediate_size=hidden * 11 // 4,
    )
    return build_tiny_llm_dir(out, size="bench")


def model_config(args: argparse.Namespace, llm_dir: Path, chunk: float | None):
    from speech_models.testing import tiny_conformer_config, tiny_perception_config, tiny_salm_config

    perception = tiny_perception_config()
    perception.encoder = tiny_conformer_config(
        n_layers=args.encoder_layers,
        d_model=args.encoder_width,
        n_heads=max(1, args.encoder_width // 64),
        subsampling_conv_channels=args.encoder_width,
        ff_expansion_factor=4,
        conv_kernel_size=9,
    )
    return tiny_salm_config(llm_dir, prompt_format="plain", perception=perception, encoder_chunk_size_seconds=chunk)


def peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def memory_now(device) -> tuple[float, float]:
    """(current, peak since the last reset) in MiB."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {k: float(status[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024


def one_setting(args: argparse.Namespace) -> dict:
    """Runs in its own process: the step's peak memory above what the process held before it."""
    import numpy as np
    import torch

    from speech_models.memory import apply_activation_checkpointing
    from speech_models.precision import setup_precision
    from speech_models.salm import SALM, SALMCollator

    checkpointing, chunk = SETTINGS[args.setting]
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = model_config(args, Path(args.llm_dir), args.chunk_seconds if chunk else None)
    model = SALM(cfg).to(device).train()
    autocast = setup_precision(model, args.precision, device)
    if checkpointing:
        apply_activation_checkpointing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)
    examples = [
        {"id": str(i), "audio": (0.1 * rng.standard_normal(int(16000 * args.seconds))).astype(np.float32),
         "text": "the quick brown fox jumps over the lazy dog " * 4}
        for i in range(args.batch)
    ]  # fmt: skip
    batch = SALMCollator(cfg, None, None)(examples)

    def step() -> None:
        with autocast():
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for group in optimizer.param_groups:  # the optimizer's state, made before measuring: a step that moves nothing
        group["lr"], lr = 0.0, group["lr"]
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        group["lr"] = lr
    held, _ = memory_now(device)
    peak_reset(device)
    step()
    _, peak = memory_now(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    return {"setting": args.setting, "held_mib": held, "peak_mib": peak, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=120.0, help="length of every audio in the batch")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk-seconds", type=float, default=10.0)
    parser.add_argument("--encoder-layers", type=int, default=8)
    parser.add_argument("--encoder-width", type=int, default=256)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--precision", default="32")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide encoder and LLM: checks the script")
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--llm-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.encoder_layers, args.encoder_width, args.llm_layers, args.hidden = 2, 64, 2, 64
    if args.setting:
        print(json.dumps(one_setting(args)))
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        llm_dir = build_llm(Path(tmp) / "llm", args.llm_layers, args.hidden)
        rows = []
        for setting in SETTINGS:
            child = [a for a in sys.argv[1:] if a != "--tiny"] + (["--tiny"] if args.tiny else [])
            out = subprocess.run(
                [sys.executable, __file__, *child, "--setting", setting, "--llm-dir", str(llm_dir)],
                check=True,
                capture_output=True,
                text=True,
                # glibc: blocks of 64 KiB and more are mapped on their own and unmapped when freed, so the resident
                # set is what is allocated (no retained free heap hiding the next step's peak)
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_mib"] - rows[0]["held_mib"]
    base_time = rows[0]["step_s"]
    print(
        f"SALM step, {args.batch} x {args.seconds:g} s audio, encoder {args.encoder_layers} x {args.encoder_width}, "
        f"LLM {args.llm_layers} x {args.hidden}, chunks of {args.chunk_seconds:g} s, precision {args.precision}, "
        f"{args.device} (torch {torch.__version__}), load {os.getloadavg()[0]:.1f}\n"
    )
    print("| setting | step peak above weights + optimizer state (MiB) | vs baseline | step time (s) | vs baseline |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        used = row["peak_mib"] - row["held_mib"]
        print(
            f"| {row['setting']} | {used:,.0f} | {used / base:.2f}x | {row['step_s']:.2f} | "
            f"{row['step_s'] / base_time:.2f}x |"
        )


if __name__ == "__main__":
    main()
