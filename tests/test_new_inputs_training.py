"""End-to-end SALM runs on the data NeMo users bring, on the `tiny_demo` assets: speech mixed with text-only data
3:1, multi-turn conversations with two audios each, a NeMo tarred manifest, a Lhotse cut manifest, and NeMo's
released salm.yaml with its optional bucketing block. Each trains and validates on 2 Ray Train workers; runs that
end with their single epoch prove that `streaming_split(equal=True)` gave both ranks the same number of steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import load_experiment
from orchestrator.storage import checkpoints
from orchestrator.testing import tiny_training_overrides
from orchestrator.training.driver import run_training

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo" / "salm.yaml"
TOKENS = [
    "+data.train_ds.use_multimodal_sampling=true",
    "+data.train_ds.batch_tokens=700",
    "data.train_ds.token_equivalent_duration=0.08",
    "data.train_ds.batch_duration=null",
]


def train(demo: Path, run_dir: Path, *extra: str, max_steps: int = 6, config: Path = DEMO_CONFIG):
    overrides = [*tiny_training_overrides(demo, run_dir, max_steps), "trainer.devices=2", *extra]
    result = run_training(load_experiment(config, overrides).cfg)
    assert result.ok, result.error
    return result


def history(run_dir: Path, experiment: str = "demo_salm") -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == experiment]
    (run,) = client.search_runs([exp.experiment_id])
    return {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        for key in run.data.metrics
    }


def report(name: str, run_dir: Path, keys: list[str], experiment: str = "demo_salm") -> dict:
    """The figures the README quotes: first and last value of each key (printed with -s)."""
    metrics = history(run_dir, experiment)
    figures = {k: [round(metrics[k][0][1], 3), round(metrics[k][-1][1], 3), metrics[k][-1][0]] for k in keys}
    print(f"\n[{name}] " + json.dumps(figures), file=sys.stderr)
    return metrics


def validation_sets(**sets: str) -> str:
    """`data.validation_ds.datasets={name: {input_cfg: [...]}}` for named validation sets."""
    return "data.validation_ds.datasets={" + ", ".join(f"{k}: {{input_cfg: [{v}]}}" for k, v in sets.items()) + "}"


def test_salm_mixes_speech_and_text_only_data_3_to_1(ray_session, tiny_demo: Path, tmp_path: Path) -> None:
    d = tiny_demo
    run_dir = tmp_path / "run"
    train(
        d,
        run_dir,
        "data.train_ds.input_cfg=["
        f"{{type: lhotse_shar, shar_path: {d}/asr/train, weight: 3, tags: {{context: 'Transcribe:'}}}}, "
        f"{{type: txt, paths: {d}/text/train/sentences.txt, weight: 1}}]",
        *TOKENS,
        validation_sets(
            speech=f"{{type: lhotse_shar, shar_path: {d}/asr/val, tags: {{context: 'Transcribe:'}}}}",
            text=f"{{type: multimodal_conversation, manifest_filepath: {d}/text/val/qa.jsonl}}",
        ),
        max_steps=8,
    )
    metrics = report(
        "mix 3:1",
        run_dir,
        ["loss", "val_loss_speech", "val_acc_speech", "val_wer_speech", "val_loss_text", "val_acc_text"],
    )
    assert [s for s, _ in metrics["loss"]] == list(range(1, 9))
    # The text-only validation set reports loss and accuracy (and WER of its answers); the speech set all three.
    for key in ("val_loss_text", "val_acc_text", "val_wer_text", "val_loss_speech", "val_wer_speech"):
        assert [s for s, _ in metrics[key]] == [3, 6, 8], key
    assert metrics["data/cuts_batched"] and "padding_fraction" in metrics


def test_salm_trains_on_multi_turn_conversations_with_two_audios(ray_session, tiny_demo: Path, tmp_path: Path) -> None:
    d = tiny_demo
    run_dir = tmp_path / "run"
    # Braces doubled twice: the f-string leaves `{{` for .format() to turn into the YAML's `{`.
    conversations = (
        f"{{{{type: multimodal_conversation, manifest_filepath: {d}/conversations/{{split}}/conversations.jsonl}}}}"
    )
    train(
        d,
        run_dir,
        f"data.train_ds.input_cfg=[{conversations.format(split='train')}]",
        *TOKENS,
        validation_sets(conversations=conversations.format(split="val")),
        "trainer.max_epochs=1",
        max_steps=10_000,
    )
    metrics = report("conversations", run_dir, ["loss", "val_loss", "val_acc", "val_wer"])
    steps = [s for s, _ in checkpoints.list_checkpoints(str(run_dir))]
    assert 0 < steps[-1] < 10_000 and metrics["val_loss"], "one epoch, ended on both ranks at the same step"


@pytest.mark.parametrize("kind", ["nemo_tarred", "lhotse"])
def test_salm_trains_on_a_nemo_tarred_or_lhotse_manifest(ray_session, tiny_demo: Path, tmp_path: Path, kind) -> None:
    d = tiny_demo
    run_dir = tmp_path / "run"

    def entry(split: str) -> str:
        if kind == "lhotse":
            return f"{{type: lhotse, cuts_path: {d}/lhotse/{split}/cuts.jsonl.gz, tags: {{context: 'Transcribe:'}}}}"
        shards = len(list((d / "nemo_tarred" / split).glob("manifest_*.json")))
        return (
            f"{{type: nemo_tarred, manifest_filepath: {d}/nemo_tarred/{split}/manifest__OP_0..{shards - 1}_CL_.json, "
            f"tarred_audio_filepaths: {d}/nemo_tarred/{split}/audio__OP_0..{shards - 1}_CL_.tar, "
            "tags: {context: 'Transcribe:'}}"
        )

    train(
        d,
        run_dir,
        f"data.train_ds.input_cfg=[{entry('train')}]",
        validation_sets(**{kind: entry("val")}),
        "trainer.max_epochs=1",
        max_steps=10_000,
    )
    metrics = report(kind, run_dir, ["loss", "val_loss", "val_acc", "val_wer"])
    steps = [s for s, _ in checkpoints.list_checkpoints(str(run_dir))]
    assert 0 < steps[-1] < 10_000 and metrics["val_wer"]


def test_nemos_released_salm_config_with_its_bucketing_block_trains_on_the_demo(
    ray_session, tiny_demo: Path, tmp_path: Path
) -> None:
    from test_config_data import released_salm

    d = tiny_demo
    run_dir = tmp_path / "run"
    config = released_salm(tmp_path)
    overrides = [
        # Paths, the CPU and a model a CPU trains in seconds; the data section is NeMo's as released.
        f"model.pretrained_llm={d}/llm",
        "model.pretrained_asr=null",
        "+model.perception.preprocessor={features: 64}",
        "+model.perception.encoder={feat_in: 64, n_layers: 1, d_model: 32, n_heads: 2, subsampling_factor: 8, "
        "subsampling_conv_channels: 16}",
        "model.perception.modality_adapter.feat_in=32",
        "model.perception.modality_adapter.d_model=32",
        "model.perception.modality_adapter.n_heads=2",
        "model.perception.modality_adapter.n_layers=1",
        "model.perception.modality_adapter.subsampling_conv_channels=16",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "+trainer.cpus_per_worker=0.5",
        "trainer.max_steps=4",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        f"data.train_ds.input_cfg.0.cuts_path={d}/lhotse/train/cuts.jsonl.gz",
        f"data.validation_ds.datasets.val_set_0.input_cfg.0.cuts_path={d}/lhotse/val/cuts.jsonl.gz",
        "data.validation_ds.batch_size=8",
        "data.train_ds.batch_tokens=600",
        f"exp_manager.explicit_log_dir={run_dir}",
        "exp_manager.use_datetime_version=false",
    ]
    result = run_training(load_experiment(config, overrides).cfg)
    assert result.ok, result.error
    metrics = report("NeMo salm.yaml", run_dir, ["loss", "val_loss", "val_acc"], experiment="salm")
    assert [s for s, _ in metrics["val_acc"]] == [2, 4]
