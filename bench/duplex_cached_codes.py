"""Duplex training step with the agent's codec codes cached with the data (`speechlm data add-codes`) against the
codec encoding the agent audio on every step, side by side in one run, at model level (no Ray).

The model is the demo duplex recipe (configs/demo/s2s_duplex.yaml: the shipped pretrained encoder and LLM, the
demo's tiny DAC codec, encoder and codec frozen); a batch is `--batch-seconds` of conversation (the demo's 40 s
per worker). Each step is forward + backward + optimizer step; the two variants alternate, so both see the same
machine state. Before timing, the bench checks that both variants give the same loss on the same batch: the
cached codes are the codes the codec makes.

    python bench/duplex_cached_codes.py                 # CPU, 1 thread per worker as in the demo
    python bench/duplex_cached_codes.py --device cuda   # GPU (speech_models only: no Ray, lhotse or MLflow needed)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRETRAINED = ROOT / "configs" / "demo" / "pretrained"


def demo_model(codec_dir: Path, device: str):
    """The demo duplex recipe's model: the encoder's architecture and weights come from the shipped .nemo archive."""
    from speech_models.config import ModelConfig
    from speech_models.duplex_s2s import DuplexS2SModel

    cfg = ModelConfig(
        pretrained_llm=str(PRETRAINED / "llm"),
        pretrained_asr=str(PRETRAINED / "asr_ctc.nemo"),
        pretrained_audio_codec=str(codec_dir),
        freeze_params=[r"^audio_codec\..+$", r"^perception\.encoder\..+$"],
    )
    return DuplexS2SModel(cfg).to(device).train()


def batches(model, seconds: float) -> tuple[dict, dict]:
    """One batch of 5 s conversations as the collator makes it from agent audio, and the same with cached codes."""
    from speech_models.duplex_data import DuplexS2SCollator
    from speech_models.testing import make_duplex_example

    data = {"frame_length": 0.08, "source_sample_rate": 16000, "target_sample_rate": 22050}
    data |= {"input_roles": ["user"], "output_roles": ["agent"]}
    collate = DuplexS2SCollator(model.cfg, type("Data", (), data))
    examples = [
        make_duplex_example(f"c{i}", 5.0, [(2.4, 2.4, "the cat lives in the house")], [(0.2, 2.0, "where")], seed=i)
        for i in range(max(1, round(seconds / 5.0)))
    ]
    with_audio = collate(examples)
    cached = []
    for ex in examples:  # what `speechlm data add-codes` stores: each cut encoded alone
        audio = torch.from_numpy(ex["target_audio"])[None]
        codes, _ = model.audio_codec.encode(audio.to(model.device), torch.tensor([audio.shape[1]]), 22050)
        cached.append({**{k: v for k, v in ex.items() if k != "target_audio"}, "target_codes": codes[0].cpu().numpy()})
        cached[-1]["target_codes_fingerprint"] = model.audio_codec.fingerprint
    with_codes = collate(cached)
    assert "target_audio" not in with_codes and "target_codes" in with_codes
    return with_audio, with_codes


def step(model, optimizer, batch: dict) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the demo's workers use 1 each)")
    parser.add_argument("--batch-seconds", type=float, default=40.0)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from speech_models.testing import build_tiny_codec_dir

    with tempfile.TemporaryDirectory() as tmp:
        codec_dir = build_tiny_codec_dir(Path(tmp) / "codec", seed=0)  # the codec `speechlm data demo` makes
        model = demo_model(codec_dir, args.device)
        with_audio, with_codes = batches(model, args.batch_seconds)
        with torch.no_grad():
            model.eval()
            same = model(with_audio)["loss"].item(), model(with_codes)["loss"].item()
            model.train()
        assert same[0] == same[1], f"cached codes give loss {same[1]}, the codec's own {same[0]}"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times: dict[str, list[float]] = {"codec every step": [], "cached codes": []}
        for i in range(args.steps + 2):
            for name, batch in (("codec every step", with_audio), ("cached codes", with_codes)):
                elapsed = step(model, optimizer, batch)
                if i >= 2:
                    times[name].append(elapsed)

    seconds = args.batch_seconds
    print(f"duplex demo model, {seconds:g} s of conversation a step, {args.device}, {args.threads} thread(s)")
    print(f"same loss from both before timing: {same[0]:.6f}")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(f"  {name:18s} {1000 * value:8.1f} ms/step   {seconds / value:7.1f} audio-s/s")
    print(f"cached codes: {median['codec every step'] / median['cached codes']:.2f}x the steps per second")


if __name__ == "__main__":
    main()
