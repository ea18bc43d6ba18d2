"""Hostile-but-realistic inputs (issue 17): each numbered case of the issue gets a clear error with exit 2, or
safe behaviour, with nothing deleted and nothing executed. Fast: no Ray cluster.

The cases that could run code (a `_target_`, a pickled checkpoint, a manifest's shell command, a YAML tag)
plant a payload that would write a marker file, and assert that the marker was never written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from orchestrator.cli.main import main
from orchestrator.config import ConfigError, experiment_from_dict, load_experiment, to_dict, to_yaml
from orchestrator.demo.synthetic_shar import write_synthetic_shar
from orchestrator.storage import checkpoints

ROOT = Path(__file__).resolve().parents[1]
SALM = ROOT / "configs" / "salm.yaml"


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def shar(tmp_path_factory) -> Path:
    return write_synthetic_shar(tmp_path_factory.mktemp("shar") / "set", n_cuts=4, n_shards=2)


@pytest.fixture(scope="module")
def data_overrides(shar: Path) -> list[str]:
    """configs/salm.yaml's data paths pointed at a real (tiny) Shar set."""
    return [
        f"data.train_ds.input_cfg.0.shar_path={shar}",
        f"data.validation_ds.datasets.val_set_0.input_cfg.0.shar_path={shar}",
    ]


def validate(capsys, *overrides: str, config: Path = SALM) -> tuple[int, str]:
    code = main(["validate", str(config), *overrides])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16000, subtype: str = "PCM_16", text: str | None = None):
    t = np.arange(round(seconds * rate)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, subtype=subtype)
    if text is not None:
        path.with_suffix(".txt").write_text(text)
    return path


def payload(marker: Path) -> str:
    """Python source that, if it ever ran, would leave `marker` behind."""
    return f"open({str(marker)!r}, 'w').write('the payload ran')\n"


class Evil:
    """Unpickling this runs `exec(payload)`: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.code = payload(marker)

    def __reduce__(self):
        return (exec, (self.code,))


# ------------------------------------------------------------------- 1. code execution from a config


def test_1_a_target_outside_the_allow_list_is_refused_and_never_imported(capsys, tmp_path, data_overrides):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(payload(marker))
    code, out = validate(
        capsys,
        *data_overrides,
        "model.optimizer._target_=transformers.dynamic_module_utils.get_class_in_module",
        "+model.optimizer.class_name=Evil",
        f"+model.optimizer.module_path={evil}",
    )
    assert code == 2
    assert "model.optimizer._target_: 'transformers.dynamic_module_utils.get_class_in_module' is not an allowed" in out
    from orchestrator.config.targets import instantiate

    with pytest.raises(ValueError, match="is not an allowed target"):
        instantiate({"_target_": "transformers.dynamic_module_utils.get_class_in_module", "module_path": str(evil)})
    assert not marker.exists()


def test_1_a_sweep_spec_cannot_name_one_either(tmp_path):
    from orchestrator.sweep.spec import sweep_from_dict

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(payload(marker))
    gadget = "transformers.dynamic_module_utils.get_class_in_module"
    spec = {
        "name": "t",
        "base": str(ROOT / "configs" / "demo" / "salm.yaml"),
        "search_space": {
            "model.lr_scheduler": {
                "choice": {"evil": {"_target_": gadget, "module_path": str(evil), "class_name": "X"}}
            }
        },
        "metric": "val_loss",
        "scheduler": {"type": "fifo"},
    }
    with pytest.raises(ConfigError) as info:
        sweep_from_dict(spec)
    assert any("preset 'evil'" in p and "is not an allowed LR scheduler" in p for p in info.value.problems)
    spec["search_space"] = {"model.optimizer.lr": {"choice": [1e-3, 2e-3]}}
    with pytest.raises(ConfigError) as info:
        sweep_from_dict(spec, [f"model.optimizer._target_={gadget}", f"+model.optimizer.module_path={evil}"])
    assert any("is not an allowed optimizer" in p for p in info.value.problems)
    assert not marker.exists()


def test_1_misspelled_targets_and_unknown_arguments_fail_validate_with_a_did_you_mean(capsys, data_overrides):
    code, out = validate(capsys, *data_overrides, "model.optimizer._target_=torch.optim.AdamWW")
    assert code == 2 and "Did you mean 'torch.optim.AdamW'?" in out
    code, out = validate(capsys, *data_overrides, "+model.optimizer.weight_decy=0.1")
    assert code == 2 and "model.optimizer.weight_decy: AdamW takes no argument 'weight_decy'" in out
    assert "Did you mean 'weight_decay'?" in out
    code, out = validate(capsys, *data_overrides, "~model.lr_scheduler.max_steps")
    assert code == 2 and "model.lr_scheduler.max_steps: CosineAnnealing needs it" in out


# ------------------------------------------------------------------------------- 2. pickle on resume


def test_2_a_crafted_trainer_state_is_refused_and_its_payload_never_runs(tmp_path):
    from orchestrator.storage.checkpoints import TrainingState, load_checkpoint, mark_complete, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    directory = tmp_path / "step=0000001"
    save_checkpoint(directory, model, optimizer, None, TrainingState(step=1), "name: x\n", True, 0)
    marker = tmp_path / "ran"
    torch.save({"optimizer": Evil(marker), "scheduler": None}, directory / checkpoints.TRAINER_STATE_FILE)
    mark_complete(str(directory))  # an attacker forges the marker too
    with pytest.raises(checkpoints.CheckpointError, match="refused to load: it holds pickled Python objects"):
        load_checkpoint(directory, model, optimizer, None, 0)
    assert not marker.exists()


def test_2_a_genuine_trainer_state_still_loads(tmp_path):
    from orchestrator.storage.checkpoints import TrainingState, load_checkpoint, mark_complete, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(tmp_path, model, optimizer, scheduler, TrainingState(step=7), "name: x\n", True, 0)
    mark_complete(str(tmp_path))
    fresh = torch.nn.Linear(2, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=1)
    state = load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_scheduler, 0)
    assert state.step == 7 and torch.equal(fresh.weight, model.weight)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch


# ---------------------------------------------------------------------- 3. shell commands in manifests


def command_manifest(tmp_path: Path, marker: Path) -> Path:
    from lhotse import AudioSource, CutSet, Recording

    wav = write_wav(tmp_path / "real.wav")
    recording = Recording.from_file(wav, recording_id="cmd")
    recording.sources = [AudioSource(type="command", channels=[0], source=f"touch {marker}; cat {wav}")]
    manifest = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts([recording.to_cut()]).to_file(manifest)
    return manifest


def test_3_command_audio_sources_are_refused_without_the_flag(capsys, tmp_path):
    marker = tmp_path / "ran"
    manifest = command_manifest(tmp_path, marker)
    out = tmp_path / "out"
    assert main(["data", "shar", "--manifest", str(manifest), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cut 'cmd' (recording) takes its audio from a shell command" in err and "--allow-command-sources" in err
    assert not marker.exists() and not out.exists()
    # the user's explicit consent runs it, once, and the audio is written
    assert main(["data", "shar", "--manifest", str(manifest), "--out", str(out), "--allow-command-sources"]) == 0
    assert marker.exists() and (out / "recording.000000.tar").is_file()


# -------------------------------------------------------------------------------- 4. secrets in logs


SECRET = "s3cr3t-Token-42"
URI = f"https://alice:{SECRET}@mlflow.example.com"


def test_4_credentials_never_reach_prints_params_artifacts_or_checkpoints(capsys, tmp_path, data_overrides):
    import mlflow

    from orchestrator.config import flatten
    from orchestrator.tracking import mlflow_runs
    from orchestrator.training.driver import TrainingResult, print_summary
    from speech_models.registry import entry_for

    overrides = [*data_overrides, f"exp_manager.mlflow_logger_kwargs.tracking_uri={URI}"]
    code, out = validate(capsys, *overrides)
    assert code == 0 and "https://alice:***@mlflow.example.com" in out and SECRET not in out
    cfg = load_experiment(SALM, overrides).cfg
    assert SECRET not in to_yaml(cfg)  # what checkpoints, MLflow artifacts and best_config.yaml hold

    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = mlflow_runs.start_or_resume_run(store, "e", str(tmp_path / "run"), "r", flatten(to_dict(cfg)), {})
    mlflow_runs.log_text_artifact(store, run_id, f"tracking_uri: {URI}\n", "config.yaml")
    run = mlflow.MlflowClient(store).get_run(run_id)
    assert run.data.params["exp_manager.mlflow_logger_kwargs.tracking_uri"] == "https://alice:***@mlflow.example.com"
    artifact = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", tracking_uri=store)
    assert SECRET not in Path(artifact).read_text()

    result = TrainingResult(False, str(tmp_path), None, None, {}, None, None, error=f"connect to {URI} failed")
    print_summary(result, entry_for(cfg.model))
    printed = capsys.readouterr().out
    assert "FAILED" in printed and SECRET not in printed


def test_4_env_derived_keys_are_masked_and_a_masked_uri_is_asked_for_again(monkeypatch):
    from orchestrator.config.schema import ExpManagerConfig
    from orchestrator.redaction import redact
    from orchestrator.storage import filesystems
    from orchestrator.tracking.mlflow_runs import tracking_uri_for

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    text = redact(f"storage options: {filesystems.fsspec_options()}")
    assert "EXAMPLEKEY" not in text and "AKIAIOSFODNN7EXAMPLE" not in text and "minio:9000" in text
    saved = ExpManagerConfig(mlflow_logger_kwargs={"tracking_uri": "https://alice:***@mlflow.example.com"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="had its credentials removed"):
        tracking_uri_for(saved, "/tmp/run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URI)
    assert tracking_uri_for(saved, "/tmp/run") == URI


def test_4_redaction_survives_a_variable_unset_by_another_thread_while_it_reads_the_environment(monkeypatch):
    """MLflow's telemetry thread unsets `_MLFLOW_TELEMETRY_SESSION_ID` while a run logs its params; a sweep trial
    once failed with KeyError from iterating os.environ at that moment."""
    import orchestrator.redaction as redaction

    class VanishingEnviron(Mapping):
        """Lists a name that is gone by the time it is read, as os._Environ does when another thread unsets it."""

        values: ClassVar = {"MY_API_TOKEN": "s3cr3t-value-123"}

        def __iter__(self):
            yield from [*self.values, "_GONE_TOKEN"]

        def __getitem__(self, key):
            return self.values[key]

        def __len__(self):
            return len(self.values) + 1

    monkeypatch.setattr(redaction, "os", SimpleNamespace(environ=VanishingEnviron()))
    assert redaction.redact("key s3cr3t-value-123 in a param") == f"key {redaction.REDACTED} in a param"


# ---------------------------------------------------------------------- 5. demo --out over a user's dir


@pytest.mark.parametrize("part", ["codec", "llm"])
def test_5_demo_never_replaces_a_directory_it_did_not_make(capsys, tmp_path, part):
    precious = tmp_path / part / "my_model.safetensors"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"weeks of training")
    code = main(["data", "demo", "--out", str(tmp_path), "--hours", "0.001", "--workers", "1", "--no-progress"])
    assert code == 2
    assert (
        f"{tmp_path / part} exists, is not empty and was not made by build_tiny_{part}_dir" in capsys.readouterr().err
    )
    assert precious.read_bytes() == b"weeks of training"
    assert not (tmp_path / "asr").exists(), "it must stop before synthesising anything"


# --------------------------------------------------- 6. an interrupted `data shar`, and inspect's false OK


def test_6_a_conversion_that_fails_halfway_leaves_nothing_and_a_rerun_works(capsys, tmp_path):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for name in ("a", "b", "c"):
        write_wav(wavs / f"{name}.wav", text=name)
    (wavs / "d.wav").write_bytes(os.urandom(3000))  # written last: the first shards are already out
    (wavs / "d.txt").write_text("d")
    out = tmp_path / "out"
    args = ["data", "shar", "--wav-dir", str(wavs), "--out", str(out), "--shard-size", "1"]
    assert main(args) == 2
    assert "d.wav is not an audio file soundfile can read" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wavs"], "no output and no partial set may be left"
    write_wav(wavs / "d.wav", text="d")
    assert main(args) == 0, "a re-run must not be refused"
    assert main(["data", "inspect", str(out)]) == 0
    # converting again into a finished set: refused with the flag that replaces it
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_6_a_killed_conversion_is_named_by_inspect_and_redone(capsys, tmp_path, shar):
    from orchestrator.data.shar import atomic_shar_dir

    out = tmp_path / "out"
    interrupted = atomic_shar_dir(out)
    partial = interrupted.__enter__()  # and never left: as after kill -9
    for f in shar.iterdir():
        if f.name.startswith(("cuts.000000", "recording.000000")):
            (partial / f.name).write_bytes(f.read_bytes())
    assert main(["data", "inspect", str(tmp_path)]) == 1
    assert "incomplete Shar set: a write was interrupted" in capsys.readouterr().out
    assert main(["data", "inspect", str(out)]) == 2
    assert "the write that makes it was interrupted" in capsys.readouterr().err
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    write_wav(wavs / "a.wav", text="a")
    assert main(["data", "shar", "--wav-dir", str(wavs), "--out", str(out)]) == 0
    assert not partial.exists() and main(["data", "inspect", str(tmp_path)]) == 0
    del interrupted


def test_6_duplicate_ids_and_missing_audio_stop_the_conversion_naming_the_cut(capsys, tmp_path):
    from lhotse import CutSet, Recording

    wav = write_wav(tmp_path / "a.wav")
    cut = Recording.from_file(wav, recording_id="a").to_cut()
    for name, cuts, expected in (
        ("dup", [cut, cut], "cut id 'a' occurs twice"),
        ("missing", [Recording.from_file(wav, recording_id="gone").to_cut()], "audio file"),
    ):
        manifest = tmp_path / f"{name}.jsonl.gz"
        CutSet.from_cuts(cuts).to_file(manifest)
        if name == "missing":
            wav.rename(tmp_path / "moved.wav")
        assert main(["data", "shar", "--manifest", str(manifest), "--out", str(tmp_path / name)]) == 2
        assert expected in capsys.readouterr().err
        assert not (tmp_path / name).exists()


def test_6_inspect_decodes_the_audio(tmp_path, shar):
    from orchestrator.data.inspect import inspect_shar

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in shar.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tar_path = broken / "recording.000000.tar"
    members = []
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            members.append((info, tar.extractfile(info).read()))
    victim = next(info.name for info, _ in members if info.name.endswith(".flac"))
    with tarfile.open(tar_path, "w") as tar:
        for info, data in members:
            if info.name == victim:
                data = os.urandom(len(data))  # random bytes where the FLAC was: same size, same name
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = inspect_shar(broken)
    assert not report.ok
    assert f"cut {victim.removesuffix('.flac')!r} does not decode as audio" in " ".join(report.problems)
    assert inspect_shar(shar).ok and inspect_shar(broken, decode=False).ok


# ------------------------------------------------------------ 7. duplex infer must not overwrite outputs


def fake_source(speaks: bool):
    entry = SimpleNamespace(name="duplex_s2s" if speaks else "salm", speaks=speaks, transcribes=not speaks)
    return SimpleNamespace(entry=entry, kind="checkpoint", path="fake", step=None)


class FakeDuplex:
    source_sample_rate, target_sample_rate = 16000, 22050

    def respond(self, chunk):
        return ["hi"] * len(chunk), [np.full(2205, 0.1, dtype=np.float32) for _ in chunk]


class FakeSalm:
    source_sample_rate = 16000

    def transcribe(self, chunk, prompt, system_prompt, max_new_tokens):
        return [f"{len(a)} samples" for a in chunk]


def test_7_duplex_infer_never_overwrites_agent_wavs(tmp_path):
    from orchestrator.inference.infer import infer

    out = tmp_path / "out"
    out.mkdir()
    existing = out / "hello.agent.wav"
    existing.write_bytes(b"yesterday's answer")
    inputs = [write_wav(tmp_path / "hello.wav"), write_wav((tmp_path / "b").mkdir() or tmp_path / "b" / "hello.wav")]
    results = infer(fake_source(True), inputs, out_dir=out, loaded=(FakeDuplex(), contextlib.nullcontext))
    assert existing.read_bytes() == b"yesterday's answer"
    assert [Path(r.output_audio).name for r in results] == ["hello.agent2.wav", "hello.agent3.wav"]
    assert sf.info(str(out / "hello.agent2.wav")).samplerate == 22050


# -------------------------------------------------------------------------------- 8. accepted silently


def test_8_shar_paths_that_do_not_exist_are_files_or_lack_credentials(capsys, tmp_path, monkeypatch, shar):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    a_file = tmp_path / "cuts.jsonl.gz"
    a_file.write_bytes(b"")
    code, out = validate(
        capsys,
        f"data.train_ds.input_cfg.0.shar_path={tmp_path / 'nope'}",
        f"data.validation_ds.datasets.val_set_0.input_cfg.0.shar_path={a_file}",
        "+data.validation_ds.datasets.other.shar_path=s3://bucket/dev",
    )
    assert code == 2
    assert f"data.train_ds.input_cfg[0].shar_path: '{tmp_path / 'nope'}' does not exist" in out
    assert f"'{a_file}' is a file; give the Shar directory" in out
    assert "'s3://bucket/dev' is on S3 but this machine has no AWS credentials" in out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.optimizer.lr=.nan", "model.optimizer.lr: nan is not a finite number"),
        ("data.train_ds.max_duration=-.inf", "data.train_ds.max_duration: -inf is not a finite number"),
        ("trainer.gradient_clip_val=.inf", "trainer.gradient_clip_val:"),
        ("name=../../..", "name: '../../..' must be a single directory name"),
        ("exp_manager.explicit_log_dir=/", "exp_manager.explicit_log_dir: the run directory '/' is the root"),
        ("+model.optimizer.momentum=0.9", "model.optimizer.momentum: AdamW takes no argument 'momentum'"),
    ],
)
def test_8_bad_numbers_names_and_run_dirs(capsys, data_overrides, override, expected):
    code, out = validate(capsys, *data_overrides, override)
    assert code == 2 and expected in out


def test_8_a_sweep_into_the_filesystem_root_is_refused(tmp_path):
    from orchestrator.sweep.spec import sweep_from_dict

    spec = {
        "name": "t",
        "base": str(ROOT / "configs" / "demo" / "salm.yaml"),
        "output_dir": "/",
        "search_space": {"model.optimizer.lr": {"choice": [1e-3, 2e-3]}},
        "metric": "val_loss",
        "scheduler": {"type": "fifo"},
    }
    with pytest.raises(ConfigError) as info:
        sweep_from_dict(spec)
    assert any(p.startswith("output_dir: '/' is the root of the filesystem") for p in info.value.problems)


def test_8_truncated_and_infinite_audio_and_a_zero_shard_size(capsys, tmp_path):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    full = write_wav(wavs / "long.wav", seconds=2.0, text="a transcript of two seconds of speech")
    full.write_bytes(full.read_bytes()[: 44 + 2 * 10720])  # 0.67 s survive the copy; the header still says 2 s
    assert main(["data", "shar", "--wav-dir", str(wavs), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "long.wav holds 0.67 s of samples but its WAV header declares 2.00 s; the file is truncated" in err
    full.unlink()
    audio = np.zeros(8000, dtype=np.float32)
    audio[100] = np.inf
    sf.write(str(wavs / "inf.wav"), audio, 16000, subtype="FLOAT")
    (wavs / "inf.txt").write_text("x")
    assert main(["data", "shar", "--wav-dir", str(wavs), "--out", str(tmp_path / "o2")]) == 2
    assert "has 1 NaN or infinite sample(s)" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "shar", "--wav-dir", str(wavs), "--out", str(tmp_path / "o3"), "--shard-size", "0"])
    assert exit_info.value.code == 2 and "--shard-size: 0 must be at least 1" in capsys.readouterr().err


@pytest.fixture
def fake_salm_cli(monkeypatch):
    """`speechlm infer` wired to a fake SALM, so the CLI's handling is tested without a model."""
    from orchestrator.inference import infer as infer_module
    from orchestrator.inference import sources

    monkeypatch.setattr(sources, "resolve_source", lambda *a, **k: fake_source(False))
    monkeypatch.setattr(infer_module, "load_model", lambda source, device: (FakeSalm(), contextlib.nullcontext))


def test_8_a_nan_wav_in_infer_is_an_error_naming_the_file(capsys, tmp_path, fake_salm_cli):
    audio = np.full(8000, 0.1, dtype=np.float32)
    audio[10] = np.nan
    sf.write(str(tmp_path / "nan.wav"), audio, 16000, subtype="FLOAT")
    assert main(["infer", "fake", str(tmp_path / "nan.wav")]) == 2
    assert f"audio file {tmp_path / 'nan.wav'} has 1 NaN or infinite sample(s)" in capsys.readouterr().err


# ------------------------------------------------------------------- 9. shar_path forms in validate


def test_9_validate_summarises_field_lists_and_weighted_pairs(capsys, shar):
    lists = {name: sorted(str(p) for p in shar.glob(f"{name}.*")) for name in ("cuts", "recording")}
    code, out = validate(
        capsys,
        f"data.train_ds.input_cfg.0.shar_path={json.dumps(lists)}",
        f"data.validation_ds.datasets.val_set_0.input_cfg.0.shar_path=[[{shar}, 0.7], [{shar}, 0.3]]",
    )
    assert code == 0, out
    assert "{cuts: 2 shards, recording: 2 shards}" in out and f"{shar} (weight 0.7)" in out


# ---------------------------------------------------------------------- 10. tracebacks instead of errors


def test_10_unreadable_configs_and_sweep_specs_are_one_line_errors(capsys, tmp_path):
    marker = tmp_path / "ran"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, out = validate(capsys, config=latin1)
    assert code == 2 and "line 1: byte 0xe9 is not UTF-8" in out
    specs = {
        "syntax": ("name: x\nbase: [unclosed\n", "line 3, column 1: invalid YAML"),
        "tabs": ("name: x\nsearch_space:\n\tmodel.lora.r: {grid: [1]}\n", "a tab character"),
        "tag": (f'name: !!python/object/apply:os.system ["touch {marker}"]\n', "the tag '!!python/object/apply"),
    }
    for name, (text, expected) in specs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        assert main(["sweep", str(path), "--validate"]) == 2
        assert expected in capsys.readouterr().err
        assert main(["validate", str(path)]) == 2
        capsys.readouterr()
    assert not marker.exists()


def test_10_infer_on_empty_or_non_audio_files_keeps_the_other_results(capsys, tmp_path, fake_salm_cli):
    good = write_wav(tmp_path / "good.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.wav").write_text("not audio at all")
    assert main(["infer", "fake", str(tmp_path / "empty.wav"), str(good), str(tmp_path / "notes.wav")]) == 2
    captured = capsys.readouterr()
    assert captured.out.strip() == f"{good}\t8000 samples"
    assert f"audio file {tmp_path / 'empty.wav'} is empty (0 bytes)" in captured.err
    assert f"{tmp_path / 'notes.wav'} is not an audio file soundfile can read" in captured.err


def test_10_batch_size_zero_and_a_missing_gpu(capsys, tmp_path, fake_salm_cli):
    wav = write_wav(tmp_path / "a.wav")
    with pytest.raises(SystemExit) as exit_info:
        main(["infer", "fake", str(wav), "--batch-size", "0"])
    assert exit_info.value.code == 2
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["infer", "fake", str(wav), "--device", "cuda"]) == 2
    assert "--device cuda: PyTorch sees no CUDA GPU" in capsys.readouterr().err


@pytest.fixture(scope="module")
def salm_checkpoint(tmp_path_factory, shar) -> Path:
    from orchestrator.config.schema import ExperimentConfig
    from orchestrator.testing import write_checkpoint
    from speech_models.registry import build_model
    from speech_models.testing import build_tiny_llm_dir, tiny_salm_config

    root = tmp_path_factory.mktemp("ckpt")
    llm = build_tiny_llm_dir(root / "llm")
    cfg = experiment_from_dict(
        {
            "model": to_dict(ExperimentConfig(model=tiny_salm_config(llm)))["model"],
            "trainer": {"max_steps": 1, "val_check_interval": 1, "accelerator": "cpu"},
            "exp_manager": {"explicit_log_dir": str(root / "run")},
            "data": {"train_ds": {"input_cfg": [{"shar_path": str(shar)}], "batch_size": 2}},
        }
    ).cfg
    torch.manual_seed(cfg.trainer.seed)
    return write_checkpoint(root / "run" / "step=0000001", build_model(cfg.model, cfg.data), cfg, step=1)


def test_10_truncated_or_empty_checkpoint_weights_are_named(capsys, tmp_path, salm_checkpoint):
    import shutil

    wav = write_wav(tmp_path / "a.wav")
    ckpt = tmp_path / "run" / "step=0000001"
    shutil.copytree(salm_checkpoint, ckpt)
    weights = ckpt / checkpoints.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    assert main(["infer", str(ckpt), str(wav)]) == 2
    assert "weights.safetensors is 1000 bytes but was written as" in capsys.readouterr().err
    assert main(["infer", str(ckpt.parent), str(wav)]) == 2  # its run dir has no complete checkpoint left
    assert "complete step=... checkpoints" in capsys.readouterr().err
    weights.write_bytes(b"")
    with pytest.raises(checkpoints.CheckpointError, match=r"weights.safetensors is empty \(0 bytes\)"):
        checkpoints.check_has_weights(ckpt)


# ------------------------------------------------------------------- 11. thousands of shard URLs


def test_11_a_config_with_6000_shard_urls_per_field_validates(tmp_path, monkeypatch):
    from orchestrator.config.summary import summarize

    config = yaml.safe_load(SALM.read_text())
    n = 6000
    fields = {
        "cuts": [f"s3://bucket/train/cuts.{i:06d}.jsonl.gz" for i in range(n)],
        "recording": [f"s3://bucket/train/recording.{i:06d}.tar" for i in range(n)],
    }
    config["data"]["train_ds"]["input_cfg"][0]["shar_path"] = fields
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_experiment(path, ["trainer.max_steps=5000"]).cfg
    assert cfg.data.train_ds.input_cfg[0].shar_path == fields
    assert "{cuts: 6000 shards, recording: 6000 shards}" in summarize(cfg, str(path))
    # an alias bomb, unlike a long list, is still refused
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)
    )
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(ConfigError, match="YAML"):
        load_experiment(tmp_path / "bomb.yaml")


# ---------------------------------------------------------------- 12. huge sweep grids and configs


def test_12_a_1500_value_grid_validates_every_value(tmp_path):
    from orchestrator.sweep.search_space import describe
    from orchestrator.sweep.spec import load_sweep

    spec = {
        "name": "big",
        "base": str(ROOT / "configs" / "demo" / "salm.yaml"),
        "search_space": {"model.optimizer.lr": {"grid": [round(1e-5 * (i + 1), 8) for i in range(1499)] + [-1.0]}},
        "metric": "val_loss",
        "search_alg": {"type": "grid"},
        "scheduler": {"type": "fifo"},
    }
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    (problem,) = info.value.problems  # the one bad value of 1,500 is found
    assert problem.startswith("search_space.model.optimizer.lr: value -1.0:")
    spec["search_space"]["model.optimizer.lr"]["grid"][-1] = 0.5
    path.write_text(yaml.safe_dump(spec))
    loaded = load_sweep(path)
    assert "... (1500 values)" in describe(loaded)


def test_12_the_fast_candidate_check_agrees_with_a_full_load():
    from orchestrator.config.loader import load_experiment_variants

    base = ROOT / "configs" / "salm.yaml"
    variants = [
        "model.lora.r=0",  # a problem, found without reloading
        "model.lora.r=16",
        "trainer.max_steps=10",  # interpolated into lr_scheduler.max_steps: the whole load
        "trainer.max_steps=0",
        "model.optimizer.lr=.nan",
        "data.train_ds.input_cfg.0.tags.context=hi",
    ]
    fixed = ["trainer.val_check_interval=5"]
    for variant, error in load_experiment_variants(base, fixed, variants):
        try:
            load_experiment(base, [*fixed, variant])
            expected = None
        except ConfigError as exc:
            expected = exc.problems
        assert (error.problems if error else None) == expected, variant


def test_12_a_50_mb_config_is_refused_at_once(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(50 * 2**20)  # sparse: costs nothing to make, 50 MiB to read
    with pytest.raises(ConfigError, match="the file is 50 MiB; a config may be at most 32 MiB"):
        load_experiment(path)


# ------------------------------------------------------------------------------ checkpoint completeness


def test_an_interrupted_checkpoint_is_never_the_latest(tmp_path, salm_checkpoint):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(salm_checkpoint, run / "step=0000001")
    partial = run / "step=0000002"
    shutil.copytree(salm_checkpoint, partial)
    (partial / checkpoints.COMPLETE_FILE).unlink()  # as a kill during the upload leaves it
    state = json.loads((partial / checkpoints.STATE_FILE).read_text())
    (partial / checkpoints.STATE_FILE).write_text(json.dumps({**state, "step": 2}))
    assert checkpoints.latest_checkpoint(str(run)) == str(run / "step=0000001")
    assert list(checkpoints.incomplete_checkpoints(str(run))) == [str(partial)]
    with pytest.raises(checkpoints.CheckpointError, match=r"incomplete: it has no complete\.json"):
        checkpoints.require_complete(str(partial))
    # a checkpoint from before completion markers (format 1) still counts once state.json is there
    legacy = run / "step=0000003"
    shutil.copytree(partial, legacy)
    (legacy / checkpoints.STATE_FILE).write_text(json.dumps({**state, "step": 3, "format_version": 1}))
    assert checkpoints.latest_checkpoint(str(run)) == str(legacy)
