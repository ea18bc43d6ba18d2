"""NeMo 3.0.0's own SALM training step, timed on request. Runs in the NeMo venv only; bench/salm_step.py starts it
(`--nemo-python`) and alternates its steps with this project's, so both see the same machine load.

    $NEMO_PYTHON bench/nemo_env/nemo_salm_step.py SPEC.json

SPEC.json: {"llm_dir": a NeMo-readable LLM dir (config + tokenizer), "batch": a .safetensors with the SALM
collator's `audios`, `audio_lens`, `input_ids`, `loss_mask`, "perception": NeMo's perception config,
"prompt_format", "audio_locator_tag", "lr", "threads"}. The model is NeMo's SALM with random weights
(pretrained_weights false) on that architecture; one step is NeMo's `training_step` (prepare_inputs, full
logits, CE) + backward + AdamW step, as Lightning runs it (no logger).

Protocol on stdin/stdout, one line each: "step" -> "<wall seconds> <process CPU seconds>"; "quit" ends.
Everything else NeMo prints goes to stderr.
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build(spec: dict):
    import torch
    from nemo.collections.speechlm2.models import SALM

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    cfg = {
        "pretrained_llm": spec["llm_dir"],
        "pretrained_weights": False,
        "audio_locator_tag": spec["audio_locator_tag"],
        "prompt_format": spec["prompt_format"],
        "freeze_params": [],
        "prevent_freeze_params": [],
        "perception": spec["perception"],
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": spec["lr"]},
    }
    model = SALM(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
    return model, optimizer


def main(spec_path: str) -> None:
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # NeMo's prints must not mix with the protocol
    from safetensors.torch import load_file

    spec = json.loads(Path(spec_path).read_text())
    model, optimizer = build(spec)
    raw = load_file(spec["batch"])
    batch = {k: raw[k] for k in ("audios", "audio_lens", "input_ids", "loss_mask")}
    batch["loss_mask"] = batch["loss_mask"].bool()

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        loss = model.training_step(batch, 0)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    real_stdout.write("ready\n")
    real_stdout.flush()
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command != "step":
            raise SystemExit(f"unknown command {command!r}")
        wall, cpu = step()
        real_stdout.write(f"{wall} {cpu}\n")
        real_stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
