"""FSDP2 against DDP on the same batches: the loss of every step, side by side in one run.

Two CPU processes (gloo) train a tiny SALM the training loop's way (`orchestrator.testing.
train_steps_on_process_group`: the loop's wrapping, optimizer, gradient clipping; fixed batches per rank and
step), once wrapped in DDP and once sharded by FSDP2, from the same initial weights. The table shows both loss
curves and their largest relative difference. With `--lora --precision bf16-mixed`: LoRA on the LLM, the encoder
frozen, FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 master weights and gradient reduction) against DDP
under autocast.

    python bench/fsdp_vs_ddp.py                                  # 20 steps, fp32, everything trained
    python bench/fsdp_vs_ddp.py --lora --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "bf16-true"])
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()

    from orchestrator.testing import StepRun, train_steps_on_process_group
    from speech_models.testing import build_tiny_llm_dir

    with tempfile.TemporaryDirectory() as tmp:
        llm = str(build_tiny_llm_dir(Path(tmp) / "llm"))
        results, seconds = {}, {}
        for strategy in ("ddp", "fsdp2"):
            started = time.perf_counter()
            run = StepRun(llm, strategy, 2, args.steps, f"{tmp}/{strategy}.json", args.precision, args.lora)
            results[strategy] = train_steps_on_process_group(run)
            seconds[strategy] = time.perf_counter() - started
    ddp, fsdp = results["ddp"]["losses"], results["fsdp2"]["losses"]
    what = "LoRA + frozen encoder" if args.lora else "all weights trained"
    print(f"tiny SALM, 2 gloo processes, {args.steps} steps, precision {args.precision}, {what}\n")
    print("| step | DDP loss | FSDP2 loss | relative difference |")
    print("| --- | --- | --- | --- |")
    worst = 0.0
    for step, (a, b) in enumerate(zip(ddp, fsdp, strict=True), start=1):
        diff = abs(a - b) / abs(a)
        worst = max(worst, diff)
        print(f"| {step} | {a:.6f} | {b:.6f} | {diff:.1e} |")
    f = results["fsdp2"]
    print(
        f"\nlargest relative difference {worst:.1e}; FSDP2 computed in {f.get('compute_dtype')}, kept "
        f"{f['param_dtype']} master weights and {f['grad_dtype']} gradients; frozen weights moved by "
        f"{f['frozen_change']:g}; wall time (process start included) DDP {seconds['ddp']:.0f} s, "
        f"FSDP2 {seconds['fsdp2']:.0f} s; load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
