"""Memory levers (`speech_models.memory`, NeMo's `encoder_chunk_size_seconds`): activation checkpointing gives
the same loss and gradients while keeping fewer activations; chunked encoding of long audio keeps every frame
of every audio, in order, and fewer activations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speech_models.memory import apply_activation_checkpointing, model_blocks
from speech_models.perception import chunk_spans
from speech_models.salm import SALM, SALMCollator
from speech_models.testing import build_tiny_llm_dir, tiny_conformer_config, tiny_perception_config, tiny_salm_config


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm_dir(tmp_path_factory.mktemp("memory") / "llm")


def make_salm(llm_dir: Path, **overrides) -> SALM:
    torch.manual_seed(0)
    # dropout on: recomputation must draw the same masks again
    overrides.setdefault("perception", tiny_perception_config(dropout=0.1, dropout_att=0.1))
    return SALM(tiny_salm_config(llm_dir, prompt_format="plain", **overrides)).train()


def batch_of(model: SALM, seconds: list[float]) -> dict:
    rng = np.random.default_rng(0)
    examples = [
        {"id": str(i), "audio": (0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32), "text": "hello there"}
        for i, s in enumerate(seconds)
    ]
    return SALMCollator(model.cfg, None, None)(examples)


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn` runs: the activation memory."""
    total = 0

    def pack(tensor: torch.Tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_activation_checkpointing_same_loss_and_gradients_fewer_activations(llm_dir: Path) -> None:
    plain, recomputed = make_salm(llm_dir), make_salm(llm_dir)
    assert apply_activation_checkpointing(recomputed) == len(list(model_blocks(recomputed))) == 5
    assert {n for n, _ in plain.named_parameters()} == {n for n, _ in recomputed.named_parameters()}
    batch = batch_of(plain, [1.0, 1.6])
    results = []
    for model in (plain, recomputed):
        torch.manual_seed(1)
        out, saved = saved_activation_bytes(lambda m=model: m(batch)["loss"])
        out.backward()
        results.append((float(out.detach()), {n: p.grad for n, p in model.named_parameters()}, saved))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert loss_a == loss_b
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_b < 0.6 * saved_a


def test_chunk_spans_fold_a_short_tail() -> None:
    assert chunk_spans([10, 23, 3], chunk=10, min_tail=4) == [[(0, 10)], [(0, 10), (10, 23)], [(0, 3)]]
    assert chunk_spans([28], chunk=10, min_tail=4) == [[(0, 10), (10, 20), (20, 28)]]


def test_encoder_chunking_keeps_every_frame_in_order_with_fewer_activations(llm_dir: Path) -> None:
    perception = tiny_perception_config()
    perception.encoder = tiny_conformer_config(n_layers=2)
    whole = make_salm(llm_dir, perception=perception).eval()
    chunked = make_salm(llm_dir, perception=perception, encoder_chunk_size_seconds=2.0).eval()
    chunked.load_state_dict(whole.state_dict())
    batch = batch_of(whole, [7.0, 1.5, 4.1])  # 4 chunks, 1 (shorter than a chunk), 3 (the tail folded)

    frames, lens = chunked._encode_audio(batch["audios"], batch["audio_lens"])
    _, whole_lens = whole._encode_audio(batch["audios"], batch["audio_lens"])
    assert frames.shape[0] == int(lens.sum())
    assert (lens - whole_lens).abs().max() <= 3, "about one frame more or less per chunk edge"
    # an audio shorter than a chunk is encoded exactly as without chunking
    short = {k: v[1:2] for k, v in batch.items() if k in ("audios", "audio_lens")}
    torch.testing.assert_close(chunked._encode_audio(**short)[0], whole._encode_audio(**short)[0])
    # every frame of chunk k comes from audio k: encoding audio 0 alone gives its frames first, in order
    alone, alone_lens = chunked._encode_audio(batch["audios"][:1], batch["audio_lens"][:1])
    torch.testing.assert_close(frames[: int(alone_lens[0])], alone, rtol=1e-4, atol=1e-5)

    chunked.train(), whole.train()
    _, saved_whole = saved_activation_bytes(lambda: whole(batch)["loss"])
    loss, saved_chunked = saved_activation_bytes(lambda: chunked(batch)["loss"])
    assert torch.isfinite(loss)
    assert saved_chunked < saved_whole
