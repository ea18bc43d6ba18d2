"""A NeMo speechlm2 checkpoint directory where a model is taken: `speechlm infer`, `eval`, `export` and `train`
(NeMo's `model.init_from_checkpoint`), on the NeMo-made SALM fixture (tests/fixtures/nemo/salm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

from orchestrator.cli.main import main
from orchestrator.demo.synthetic_shar import write_synthetic_shar
from orchestrator.inference.sources import SourceError, load_model, resolve_source
from speech_models.salm import SALM

FIXTURE = Path(__file__).parent / "fixtures" / "nemo" / "salm"
NEMO_DIR = FIXTURE / "nemo_salm"
LLM = f"model.pretrained_llm={FIXTURE / 'llm'}"  # the checkpoint names its LLM "llm", as a released one names a hub id


@pytest.fixture(scope="module")
def fixture_wavs(tmp_path_factory) -> list[Path]:
    """The fixture batch's two clips as float WAV files (exact samples)."""
    batch = load_file(FIXTURE / "batch.safetensors")
    root = tmp_path_factory.mktemp("wavs")
    paths = []
    for i, n in enumerate(batch["audio_lens"].tolist()):
        path = root / f"clip{i}.wav"
        sf.write(str(path), batch["audios"][i, :n].numpy(), 16000, subtype="FLOAT")
        paths.append(path)
    return paths


def test_resolve_source_recognises_a_nemo_checkpoint_and_needs_its_llm():
    source = resolve_source(str(NEMO_DIR), overrides=[LLM])
    assert source.kind == "nemo" and source.entry.name == "salm"
    assert source.model_cfg.pretrained_weights is False and source.model_cfg.init_from_checkpoint is None
    model, _ = load_model(source)
    assert isinstance(model, SALM) and not model.training
    with pytest.raises(SourceError, match=r"only model\.\* keys"):
        resolve_source(str(NEMO_DIR), overrides=["trainer.max_steps=3"])


def test_infer_from_a_nemo_checkpoint_gives_nemos_greedy_answer(fixture_wavs, capsys):
    """With NeMo's fixture prompt ("Transcribe: <audio>") the answer is the text of NeMo's own greedy ids."""
    argv = ["infer", str(NEMO_DIR), *map(str, fixture_wavs), "--set", LLM, "--prompt", "Transcribe:"]
    assert main([*argv, "--max-new-tokens", "8"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
    model = SALM.from_pretrained(NEMO_DIR, pretrained_llm=str(FIXTURE / "llm"))
    nemo_ids = load_file(FIXTURE / "expected.safetensors")["generated_ids"]
    expected = [t.strip() for t in model.tokenizer.batch_decode(nemo_ids, skip_special_tokens=True)]
    assert [text for _, text in lines] == expected


def test_eval_from_a_nemo_checkpoint(ray_session, tmp_path):
    shar = write_synthetic_shar(tmp_path / "shar", n_cuts=3, n_shards=1, durations=(0.5, 1.0))
    out = tmp_path / "eval"
    argv = ["eval", str(NEMO_DIR), "--data", str(shar), "--set", LLM, "--batch-size", "3", "--num-workers", "1"]
    assert main([*argv, "--max-new-tokens", "4", "--out", str(out), "--no-mlflow"]) == 0
    metrics = json.loads((out / "shar" / "metrics.json").read_text())
    assert metrics["kind"] == "nemo" and metrics["metrics"]["num_cuts"] == 3 and "wer" in metrics["metrics"]


def test_export_a_nemo_checkpoint_in_either_format(tmp_path, capsys):
    for fmt in ("nemo", "speechlm"):
        out = tmp_path / fmt
        assert main(["export", str(NEMO_DIR), "--set", LLM, "--format", fmt, "--out", str(out)]) == 0
        assert "reloaded export vs checkpoint logits: max |diff| 0" in capsys.readouterr().out
        assert isinstance(SALM.from_pretrained(out), SALM)  # self-contained: no pretrained_llm needed
    assert (tmp_path / "nemo" / "llm_backbone" / "config.json").is_file()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_train_three_steps_from_a_nemo_checkpoint(ray_session, tmp_path):
    """NeMo's config.json as the model section, NeMo's `init_from_checkpoint`: training starts from NeMo's weights.
    The LLM is frozen here, so after training it must still be NeMo's, tensor for tensor."""
    model = json.loads((NEMO_DIR / "config.json").read_text())  # as it stands, _target_s and all
    model.update(
        init_from_checkpoint=str(NEMO_DIR),
        pretrained_llm=str(FIXTURE / "llm"),
        freeze_params=["^perception\\.preprocessor\\..+$", "^llm\\..+$"],
    )
    shar = write_synthetic_shar(tmp_path / "shar", n_cuts=6, n_shards=1, durations=(0.5, 1.0))
    config = {
        "name": "from_nemo",
        "model": model,
        "trainer": {"max_steps": 3, "devices": 1, "accelerator": "cpu", "log_every_n_steps": 1},
        "exp_manager": {"explicit_log_dir": str(tmp_path / "run")},
        "data": {
            "train_ds": {"input_cfg": [{"shar_path": str(shar), "tags": {"context": "Transcribe:"}}], "batch_size": 2}
        },
    }
    path = tmp_path / "from_nemo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0

    trained, _ = load_model(resolve_source(str(tmp_path / "run"), which="latest"))
    nemo = load_file(NEMO_DIR / "model.safetensors")
    state = trained.state_dict()
    assert all(torch.equal(state[k], v) for k, v in nemo.items() if k.startswith("llm."))  # frozen: NeMo's
    assert not torch.equal(state["perception.proj.weight"], nemo["perception.proj.weight"])  # trained from there
