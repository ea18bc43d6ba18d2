"""Freezing regexes and LoRA: trainable counts computed independently from the architecture."""

from __future__ import annotations

import logging

import pytest
import torch

from speech_models.config import LoraConfig
from speech_models.freezing import canonical_param_name, count_params
from speech_models.salm import SALM
from speech_models.testing import LLM_SIZES, build_tiny_llm_dir, tiny_salm_config

TINY = LLM_SIZES["tiny"]  # hidden 64, 2 layers, 4 heads, 2 kv heads, ffn 128


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return build_tiny_llm_dir(tmp_path_factory.getbasetemp() / "tiny_llm")


def llama_layer_params() -> int:
    h, ffn = TINY["hidden_size"], TINY["intermediate_size"]
    kv = TINY["num_key_value_heads"] * h // TINY["num_attention_heads"]
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o (no biases)
    mlp = 3 * h * ffn  # gate, up, down
    return attention + mlp + 2 * h  # two RMSNorms


def lora_params(r: int) -> int:
    """peft's default Llama targets: q_proj (h -> h) and v_proj (h -> kv) in every layer, A (r x in) + B (out x r)."""
    h = TINY["hidden_size"]
    kv = TINY["num_key_value_heads"] * h // TINY["num_attention_heads"]
    return TINY["num_hidden_layers"] * (r * (h + h) + r * (h + kv))


def numel(model, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def test_canonical_names():
    assert canonical_param_name("llm.base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight") == (
        "llm.model.layers.3.self_attn.q_proj.weight"
    )
    assert canonical_param_name("llm.model.layers.3.mlp.up_proj.weight") == "llm.model.layers.3.mlp.up_proj.weight"
    assert canonical_param_name("perception.encoder.layers.0.conv.batch_norm.weight") == (
        "perception.encoder.layers.0.conv.batch_norm.weight"
    )


def test_freeze_layers_and_prevent(llm_dir):
    plain = SALM(tiny_salm_config(llm_dir))
    total = count_params(plain)[1]
    assert plain.trainable_summary.trainable == total

    model = SALM(tiny_salm_config(llm_dir, freeze_params=[r"^llm\.model\.layers\.[0]\..+$"]))
    assert model.trainable_summary.trainable == total - llama_layer_params()
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("llm.model.layers.0."))

    model = SALM(
        tiny_salm_config(
            llm_dir,
            freeze_params=[r"^llm\..+$", r"^embed_tokens\..+$"],
            prevent_freeze_params=[r"^llm\.model\.layers\.1\.mlp\..+$"],
        )
    )
    h, ffn = TINY["hidden_size"], TINY["intermediate_size"]
    expected = numel(model, "perception.") + 3 * h * ffn
    assert model.trainable_summary.trainable == expected == count_params(model)[0]


def test_lora_trains_adapters_and_keeps_pattern_meaning(llm_dir, caplog):
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    model = SALM(tiny_salm_config(llm_dir, lora=lora))
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A") for n in names)
    # As NeMo: the base LLM is frozen, LoRA weights train; embed_tokens lives outside the LLM and stays trainable.
    expected = lora_params(4) + numel(model, "perception.") + numel(model, "embed_tokens.")
    assert model.trainable_summary.trainable == expected
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("llm.") and "lora_" not in n)

    # The documented pattern means the same under peft's renaming, and never freezes LoRA weights.
    caplog.set_level(logging.WARNING)
    model = SALM(
        tiny_salm_config(
            llm_dir,
            lora=lora,
            freeze_params=[
                r"^llm\.model\.layers\.[0-4]\..+$",
                r"^embed_tokens\..+$",
                r"^perception\..+$",
                r"^nothing\..+$",
            ],
        )
    )
    assert model.trainable_summary.trainable == lora_params(4)
    assert model.trainable_summary.frozen_by_pattern > 0  # perception + embedding tensors
    assert "'^nothing\\\\..+$' matches no parameter" in caplog.text
    assert "layers\\\\.[0-4]" not in caplog.text  # the layer pattern did match (base_layer names)

    # LoRA models train and generate (the embedding is lent back into the wrapped LLM).
    import numpy as np

    from orchestrator.config.schema import DataConfig, DatasetConfig
    from speech_models.salm import SALMCollator

    examples = [
        {"id": "a", "duration": 0.5, "audio": np.zeros(8000, np.float32), "text": "three birds", "supervisions": []}
    ]
    batch = SALMCollator(model.cfg, DataConfig(), DatasetConfig())(examples)
    model(batch)["loss"].backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    ids, _ = model.eval().generate(batch["prompt_ids"], batch["audios"], batch["audio_lens"], max_new_tokens=3)
    assert ids.shape == (1, 3) or ids.shape[1] < 3


def _batch_norm_means(module) -> list:
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d)]


def test_frozen_parts_run_in_eval_mode_while_training(llm_dir):
    """As NeMo's training step: a wholly frozen encoder (or LLM) trains nothing, so it runs as it was trained to be
    used, without dropout and with its own batch-norm statistics, which freezing alone would let the new task's
    batches overwrite. Parts that train stay in training mode."""
    import numpy as np

    from orchestrator.config.schema import DataConfig, DatasetConfig
    from speech_models.salm import SALMCollator

    examples = [
        {"id": "a", "duration": 0.5, "audio": np.random.default_rng(0).normal(size=8000).astype(np.float32),
         "text": "three birds", "supervisions": []}
    ]  # fmt: skip
    frozen = SALM(tiny_salm_config(llm_dir, freeze_params=[r"^perception\.encoder\..+$"]))
    trained = SALM(tiny_salm_config(llm_dir))
    batch = SALMCollator(frozen.cfg, DataConfig(), DatasetConfig())(examples)
    for model in (frozen, trained):
        model.eval().train()  # the training loop calls train() before every step
    assert not frozen.perception.encoder.training and not frozen.perception.preprocessor.training
    assert frozen.perception.proj.training and frozen.llm.training and frozen.training
    assert trained.perception.encoder.training

    before = {"frozen": _batch_norm_means(frozen.perception.encoder), "trained": _batch_norm_means(trained.perception)}
    assert before["frozen"]  # the tiny encoder has batch norms, so the test can tell
    frozen(batch)["loss"].backward()
    trained(batch)["loss"].backward()
    after = {"frozen": _batch_norm_means(frozen.perception.encoder), "trained": _batch_norm_means(trained.perception)}
    assert all(torch.equal(a, b) for a, b in zip(before["frozen"], after["frozen"], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before["trained"], after["trained"], strict=True))

    # A frozen LLM is kept in eval mode too; one with LoRA weights in it trains.
    frozen_llm = SALM(tiny_salm_config(llm_dir, freeze_params=[r"^llm\..+$"])).train()
    assert not frozen_llm.llm.training and frozen_llm.perception.encoder.training
    lora = SALM(tiny_salm_config(llm_dir, lora=LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0))).train()
    assert lora.llm.training
