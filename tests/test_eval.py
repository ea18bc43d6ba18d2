"""`speechlm eval`: data-parallel scoring on Ray that reproduces validation's figures for the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from orchestrator.cli.main import main
from orchestrator.config import experiment_from_dict, to_dict
from orchestrator.config.schema import ExperimentConfig
from orchestrator.data.plan import plan_dataset, validation_sets
from orchestrator.data.read_task import run_read_task
from orchestrator.data.stream import iterate_batches
from orchestrator.demo.synthetic_shar import write_synthetic_shar
from orchestrator.inference.evaluate import evaluate
from orchestrator.inference.scoring_asr import ScoringASR
from orchestrator.testing import write_checkpoint
from orchestrator.tracking import mlflow_runs
from orchestrator.tracking.mlflow_runs import experiment_name_for, tracking_uri_for
from speech_models.metrics import corpus_bleu, corpus_wer
from speech_models.registry import build_collator, build_model
from speech_models.testing import build_tiny_codec_dir, build_tiny_llm_dir, tiny_duplex_model_config, tiny_salm_config


def experiment(model_cfg, train: Path, val: Path, run_dir: Path, batch_size: int = 4) -> ExperimentConfig:
    tags = {"context": "Transcribe:"}
    return experiment_from_dict(
        {
            "name": "tiny",
            "model": to_dict(ExperimentConfig(model=model_cfg))["model"],
            "trainer": {"max_steps": 2, "val_check_interval": 2, "accelerator": "cpu"},
            "exp_manager": {"explicit_log_dir": str(run_dir), "checkpoint_callback_params": {"monitor": "val_loss"}},
            "data": {
                "train_ds": {"input_cfg": [{"shar_path": str(train), "tags": tags}], "batch_size": 2},
                "validation_ds": {
                    "datasets": {
                        "tiny_val": {"input_cfg": [{"shar_path": str(val), "tags": tags}], "batch_size": batch_size}
                    }
                },
            },
        }
    ).cfg


def validate_locally(model, cfg: ExperimentConfig, name: str, speech: dict | None = None) -> dict[str, tuple[str, str]]:
    """What the training loop's validation computes for one set (same plan, collator, validation_step), in-process:
    {cut id: (hypothesis, reference)}; duplex models' generated speech goes into `speech` by cut id."""
    dataset = validation_sets(cfg.data)[name]
    plan = plan_dataset(
        f"val_{name}", dataset, cfg.data, build_collator(cfg.model, cfg.data, dataset), epochs=1, equal_split=False
    )
    tables = [table for task in range(plan.num_tasks) for table in run_read_task(plan, task)]
    hypotheses: dict[str, tuple[str, str]] = {}
    model.eval()
    with torch.no_grad():
        for batch, _ in iterate_batches(tables):
            out = model.validation_step(batch)
            hypotheses.update(
                zip(batch["cut_ids"], zip(out["hypotheses"], out["references"], strict=True), strict=True)
            )
            if speech is not None:
                speech.update(zip(batch["cut_ids"], out["generated_audio"], strict=True))
    return hypotheses


def manifest(path: str) -> dict[str, dict]:
    return {row["cut_id"]: row for row in map(json.loads, Path(path).read_text().splitlines())}


@pytest.fixture(scope="module")
def salm_run(tmp_path_factory):
    """A run dir with a tiny SALM checkpoint whose state.json holds the WER that validation computed, and the
    run's MLflow run (found again through its speechlm.run_dir tag)."""
    root = tmp_path_factory.mktemp("eval")
    llm = build_tiny_llm_dir(root / "llm")
    train = write_synthetic_shar(root / "train", n_cuts=4, n_shards=1)
    val = write_synthetic_shar(root / "val", n_cuts=10, n_shards=2, durations=(0.4, 1.5), id_prefix="val")
    run_dir = root / "run"
    cfg = experiment(tiny_salm_config(llm), train, val, run_dir)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model, cfg.data)
    validated = validate_locally(model, cfg, "tiny_val")
    wer = corpus_wer([h for h, _ in validated.values()], [r for _, r in validated.values()])
    write_checkpoint(run_dir / "step=0000002", model, cfg, step=2, metrics={"val_wer_tiny_val": wer, "val_wer": wer})
    uri = tracking_uri_for(cfg.exp_manager, str(run_dir))
    run_id = mlflow_runs.start_or_resume_run(uri, experiment_name_for(cfg.exp_manager), str(run_dir), "tiny", {}, {})
    mlflow.MlflowClient(uri).set_terminated(run_id, "FINISHED")
    return run_dir, val, validated, wer, (uri, run_id)


def test_eval_on_two_replicas_reproduces_validation_wer(ray_session, salm_run):
    run_dir, val, validated, wer, (uri, run_id) = salm_run
    report = evaluate(str(run_dir), [str(val)], num_workers=2, cpus_per_worker=1)
    (result,) = report.sets
    assert result.name == "tiny_val"  # recognised as the checkpoint's validation set: its batching is used
    assert result.metrics["num_cuts"] == 10 and result.metrics["wer"] == wer
    rows = manifest(result.manifest)
    assert {cut: (row["hypothesis"], row["reference"]) for cut, row in rows.items()} == validated
    assert result.metrics["rtf"] > 0 and result.metrics["audio_seconds"] == pytest.approx(
        sum(row["duration"] for row in rows.values()), abs=1e-3
    )
    assert Path(result.manifest).parent == run_dir / "eval" / "step=0000002" / "tiny_val"

    # logged into the training run's MLflow run at the checkpoint's step, which stays FINISHED
    assert report.mlflow_run_id == run_id
    client = mlflow.MlflowClient(uri)
    (logged,) = client.get_metric_history(run_id, "eval_wer_tiny_val")
    assert (logged.value, logged.step) == (pytest.approx(wer), 2)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.list_artifacts(run_id, "eval/run_step=0000002/tiny_val")


def test_eval_cli_other_batching_and_exported_models(ray_session, salm_run, tmp_path):
    run_dir, val, validated, _, _ = salm_run
    out = tmp_path / "out"
    argv = ["eval", str(run_dir / "step=0000002"), "--data", str(val), "--batch-size", "3", "--num-workers", "1"]
    assert main([*argv, "--out", str(out), "--no-mlflow"]) == 0
    rows = manifest(str(out / "tiny_val" / "hypotheses.jsonl"))
    assert set(rows) == set(validated) and all(row["reference"] == validated[c][1] for c, row in rows.items())
    metrics = json.loads((out / "tiny_val" / "metrics.json").read_text())["metrics"]
    assert metrics["wer"] == corpus_wer(
        [r["hypothesis"] for r in rows.values()], [r["reference"] for r in rows.values()]
    )

    # an exported model is evaluated the same way; logged to a new run in the given tracking store
    from orchestrator.inference.export import export_model

    exported = export_model(str(run_dir), tmp_path / "export").out_dir
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = evaluate(exported, [str(val)], batch_size=4, num_workers=1, out_dir=tmp_path / "e", tracking_uri=uri)
    (result,) = report.sets
    assert result.name == "val" and set(manifest(result.manifest)) == set(validated)
    run = mlflow.MlflowClient(uri).get_run(report.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["eval_wer_val"] == result.metrics["wer"]


def test_eval_bad_input_exits_2(salm_run, tmp_path):
    run_dir, val, *_ = salm_run
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "missing")]) == 2
    assert main(["eval", str(tmp_path), "--data", str(val)]) == 2  # no checkpoints there
    assert main(["eval", str(run_dir), "--data", str(val), "--scoring-asr", str(run_dir)]) == 2  # SALM: no speech


def test_duplex_eval_reports_validation_bleu_and_asr_bleu(ray_session, tmp_path):
    llm = build_tiny_llm_dir(tmp_path / "llm")
    codec = build_tiny_codec_dir(tmp_path / "codec", "dac")
    train = write_synthetic_shar(tmp_path / "train", n_cuts=2, n_shards=1, with_target_audio=True)
    val = write_synthetic_shar(tmp_path / "val", n_cuts=4, n_shards=1, durations=(0.5, 1.0), with_target_audio=True)
    cfg = experiment(tiny_duplex_model_config(llm, codec), train, val, tmp_path / "run", batch_size=2)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model, cfg.data)
    speech: dict = {}
    validated = validate_locally(model, cfg, "tiny_val", speech)
    ckpt = write_checkpoint(tmp_path / "run" / "step=0000002", model, cfg, step=2)
    asr_cfg = experiment(tiny_salm_config(llm), train, val, tmp_path / "asr")
    torch.manual_seed(0)
    scorer = write_checkpoint(tmp_path / "asr" / "step=0000001", build_model(asr_cfg.model, asr_cfg.data), asr_cfg)

    report = evaluate(str(ckpt), [str(val)], num_workers=1, scoring_asr=str(scorer), save_audio=True, mlflow=False)
    (result,) = report.sets
    rows = manifest(result.manifest)
    assert {cut: (row["hypothesis"], row["reference"]) for cut, row in rows.items()} == validated
    hyps, refs = [h for h, _ in validated.values()], [r for _, r in validated.values()]
    assert result.metrics["txt_bleu"] == corpus_bleu(hyps, refs)
    # validation's scorer on validation's speech gives the same transcripts (and so the same ASR-BLEU)
    cuts = list(validated)
    transcripts = ScoringASR(str(scorer)).transcribe([speech[c] for c in cuts], cfg.data.target_sample_rate)
    assert [rows[c]["asr_hypothesis"] for c in cuts] == transcripts
    assert result.metrics["asr_bleu"] == corpus_bleu(transcripts, refs)
    assert all((Path(result.manifest).parent / row["audio"]).is_file() for row in rows.values())


@pytest.mark.integration
def test_eval_of_a_real_training_run_reproduces_its_validation_wer(ray_session, tiny_demo: Path, tmp_path: Path):
    """Train 3 steps with the real driver (validation + checkpoint at step 3), then eval that checkpoint."""
    from orchestrator.config import load_experiment
    from orchestrator.testing import tiny_training_overrides
    from orchestrator.training.driver import run_training

    run_dir = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / "salm.yaml"
    overrides = [
        *tiny_training_overrides(tiny_demo, run_dir, max_steps=3),
        "trainer.devices=1",
        "trainer.limit_val_batches=null",
    ]  # validation sees the whole set, as eval does
    result = run_training(load_experiment(config, overrides).cfg)
    assert result.ok, result.error
    state = json.loads((run_dir / "step=0000003" / "state.json").read_text())

    report = evaluate(str(run_dir), [str(tiny_demo / "asr" / "val")], num_workers=1)
    (evaluated,) = report.sets
    assert evaluated.name == "demo_val"
    assert evaluated.metrics["wer"] == pytest.approx(state["metrics"]["val_wer_demo_val"], abs=1e-12)
    assert evaluated.metrics["loss"] == pytest.approx(state["metrics"]["val_loss_demo_val"], rel=1e-5)
    client = mlflow.MlflowClient(report.tracking_uri)
    assert report.mlflow_run_id == result.mlflow_run_id
    assert client.get_metric_history(result.mlflow_run_id, "eval_wer_demo_val")[0].step == 3
