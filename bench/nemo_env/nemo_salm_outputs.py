"""Run NeMo 3.0.0's own SALM on a model directory and a batch; write its outputs. Runs in the NeMo venv only.

    HF_HUB_OFFLINE=1 $NEMO_PYTHON bench/nemo_env/nemo_salm_outputs.py MODEL_DIR BATCH.safetensors OUT.safetensors

MODEL_DIR is anything NeMo's `SALM.from_pretrained` takes (e.g. `speechlm export ... --format nemo` output).
BATCH holds `audios`, `audio_lens`, `input_ids`, `loss_mask` and `prompt_ids` (the SALM collator's keys). OUT gets
what tests/fixtures/nemo/salm/expected.safetensors holds, computed the same way: `logits`, `target_ids`,
`attention_mask` (NeMo's training-step path), `loss`, `perception_out`, `perception_lens` and `generated_ids`
(greedy, 8 new tokens). One CPU thread: NeMo's logits move by ~1e-6 with the thread count.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file, save_file


def main(model_dir: str, batch_path: str, out_path: str) -> None:
    from nemo.collections.speechlm2.models import SALM

    torch.set_num_threads(1)
    model = SALM.from_pretrained(model_dir).eval()
    batch = load_file(batch_path)
    with torch.no_grad():
        inputs = model.prepare_inputs(
            {
                "audios": batch["audios"],
                "audio_lens": batch["audio_lens"],
                "input_ids": batch["input_ids"],
                "loss_mask": batch["loss_mask"].bool(),
            }
        )
        logits = model(inputs["input_embeds"], attention_mask=inputs["attention_mask"])["logits"]
        targets = inputs["target_ids"]
        valid = targets != -100
        loss = torch.nn.functional.cross_entropy(logits[valid], targets[valid], reduction="sum") / valid.sum()
        perception_out, perception_lens = model.perception(
            input_signal=batch["audios"], input_signal_length=batch["audio_lens"]
        )
        generated = model.generate(
            prompts=batch["prompt_ids"],
            audios=batch["audios"],
            audio_lens=batch["audio_lens"],
            max_new_tokens=8,
            do_sample=False,
        )
    save_file(
        {
            "logits": logits.float().contiguous(),
            "target_ids": targets.contiguous(),
            "attention_mask": inputs["attention_mask"].bool().contiguous(),
            "loss": loss.reshape(1).float(),
            "perception_out": perception_out.float().contiguous(),
            "perception_lens": perception_lens.long().contiguous(),
            "generated_ids": generated.long().contiguous(),
        },
        out_path,
    )
    print(f"nemo SALM outputs written to {out_path}: logits {tuple(logits.shape)}, loss {float(loss):.6f}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
