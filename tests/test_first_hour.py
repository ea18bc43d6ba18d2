"""The first hour with your own data (issue 20): what a newcomer hits, each fixed or answered. Fast: no Ray.

Sources checked before Ray (one-line errors), shortened runs warned about, a resume with nothing to train refused,
MLflow params after a resume, the Ray output filter, `init-config`, the Python API (lazy imports, paths in
`transcribe`/`respond`), and the LoRA override forms the README documents. The README's own recipe runs in
`tests/test_readme.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from orchestrator.cli.main import main
from orchestrator.config import ConfigError, load_experiment
from orchestrator.console import WorkerLogFilter
from orchestrator.demo.synthetic_shar import write_synthetic_shar

ROOT = Path(__file__).resolve().parents[1]
DEMO_SALM = ROOT / "configs" / "demo" / "salm.yaml"
SALM = ROOT / "configs" / "salm.yaml"


@pytest.fixture(scope="module")
def shar(tmp_path_factory) -> Path:
    return write_synthetic_shar(tmp_path_factory.mktemp("shar") / "set", n_cuts=4, n_shards=1)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> Path:
    from speech_models.testing import build_tiny_llm_dir

    return build_tiny_llm_dir(tmp_path_factory.mktemp("llm") / "llm")


@pytest.fixture
def demo_overrides(shar: Path, llm: Path) -> list[str]:
    """configs/demo/salm.yaml pointed at real (tiny) data and LLM (and at the shipped encoder by an absolute path:
    some tests run from another directory)."""
    return [
        f"model.pretrained_llm={llm}",
        f"model.pretrained_asr={ROOT / 'configs' / 'demo' / 'pretrained' / 'asr_ctc.nemo'}",
        f"data.train_ds.input_cfg.0.shar_path={shar}",
        f"data.validation_ds.input_cfg.0.shar_path={shar}",
    ]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------- 3. sources fail fast, before Ray


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything would start or join Ray."""
    import orchestrator.training.driver as driver

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "connect_ray", refuse)


def test_a_mistyped_llm_path_fails_in_one_line_before_ray(capsys, tmp_path, monkeypatch, demo_overrides, no_ray):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    overrides = [*demo_overrides, "model.pretrained_llm=models/qwen", f"exp_manager.explicit_log_dir={tmp_path}/run"]
    code, _, err = run_cli(capsys, "train", str(DEMO_SALM), *overrides)
    assert code == 2
    (line,) = err.strip().splitlines()  # one line, and no MLflow run or run dir was made
    assert line.startswith(f"error: {DEMO_SALM}: model.pretrained_llm: 'models/qwen' does not exist, but ./models")
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(capsys, "validate", str(DEMO_SALM), *overrides)
    assert code == 2 and "a mistyped local path?" in err


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("./nope/llm", "'./nope/llm' does not exist"),
        ("not a hub id!", "is neither an existing path nor a hub id"),
        ("{tmp}", "is a directory without a config.json"),
    ],
)
def test_model_sources_that_cannot_load_are_problems(capsys, tmp_path, demo_overrides, value, expected):
    value = value.replace("{tmp}", str(tmp_path))
    code, _, err = run_cli(capsys, "validate", str(DEMO_SALM), *demo_overrides, f"model.pretrained_llm={value}")
    assert code == 2 and expected in err, err


def test_hub_ids_offline_are_a_warning_and_online_the_hub_decides(capsys, monkeypatch, demo_overrides):
    from orchestrator.config import sources

    hub_llm = [*demo_overrides, "model.pretrained_llm=someorg/some-llm"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "validate", str(DEMO_SALM), *hub_llm)
    assert code == 0 and "warning: model.pretrained_llm: 'someorg/some-llm' is not a local path" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    asked = []
    monkeypatch.setattr(sources, "hub_says_exists", lambda repo: asked.append(repo) or False)
    code, _, err = run_cli(capsys, "validate", str(DEMO_SALM), *hub_llm)
    assert code == 2 and "the Hugging Face hub has no such model" in err and asked == ["someorg/some-llm"]
    monkeypatch.setattr(sources, "hub_says_exists", lambda repo: None)  # no network: the workers will say
    assert run_cli(capsys, "validate", str(DEMO_SALM), *hub_llm)[0] == 0


def test_an_adapter_narrower_than_the_encoder_is_named_before_ray(capsys, tmp_path, shar, llm):
    from speech_models.testing import build_tiny_parakeet_dir

    asr = build_tiny_parakeet_dir(tmp_path / "parakeet")  # 32 wide; configs/salm.yaml's adapter expects 1024
    base = [
        f"model.pretrained_llm={llm}",
        f"model.pretrained_asr={asr}",
        f"data.train_ds.input_cfg.0.shar_path={shar}",
        f"data.validation_ds.datasets.val_set_0.input_cfg.0.shar_path={shar}",
    ]
    code, _, err = run_cli(capsys, "validate", str(SALM), *base)
    assert code == 2 and "modality_adapter.feat_in: 1024, but the encoder of" in err and "outputs 32" in err
    fixed = [*base, "model.perception.modality_adapter.feat_in=32", "model.perception.modality_adapter.d_model=32"]
    assert run_cli(capsys, "validate", str(SALM), *fixed)[0] == 0


# ------------------------------------------------------------------------------- 2. shortened runs


def test_a_shortened_run_is_accepted_with_warnings_that_name_the_fix(demo_overrides):
    loaded = load_experiment(DEMO_SALM, [*demo_overrides, "trainer.max_steps=25"])
    (validation,) = [w for w in loaded.warnings if w.startswith("trainer.val_check_interval")]
    assert "validates and checkpoints once, at step 25" in validation
    (warmup,) = [w for w in loaded.warnings if w.startswith("model.lr_scheduler.warmup_steps")]
    assert "30 is not below the run's 25 steps" in warmup and "warmup_ratio" in warmup
    fixed = load_experiment(
        DEMO_SALM,
        [
            *demo_overrides,
            "trainer.max_steps=25",
            "trainer.val_check_interval=10",
            "~model.lr_scheduler.warmup_steps",
            "+model.lr_scheduler.warmup_ratio=0.1",
        ],
    )
    assert fixed.warnings == []
    assert load_experiment(DEMO_SALM, demo_overrides).warnings == []  # the demo as shipped: nothing to say


# --------------------------------------------------------------------------------------------- 4. resume


def test_a_resume_with_nothing_to_train_is_refused_before_ray(tmp_path, monkeypatch, shar, llm, no_ray):
    from orchestrator.storage import checkpoints
    from orchestrator.training.driver import run_training

    step_dir = tmp_path / "experiments" / "demo_salm" / "step=0001500"  # what `make demo` leaves
    step_dir.mkdir(parents=True)
    state = {"step": 1500, "format_version": checkpoints.FORMAT_VERSION, "metrics": {}}
    (step_dir / checkpoints.STATE_FILE).write_text(json.dumps(state))
    monkeypatch.setattr(checkpoints, "latest_checkpoint", lambda directory: str(step_dir))
    monkeypatch.setattr(checkpoints, "incomplete_checkpoints", lambda directory: {})
    overrides = [
        f"model.pretrained_llm={llm}",
        f"data.train_ds.input_cfg.0.shar_path={shar}",
        f"data.validation_ds.input_cfg.0.shar_path={shar}",
        f"exp_manager.exp_dir={tmp_path / 'experiments'}",
    ]
    with pytest.raises(ConfigError) as info:
        run_training(load_experiment(DEMO_SALM, overrides).cfg)
    message = str(info.value)
    assert "nothing to train" in message and "at step 1500" in message and "trainer.max_steps is 1500" in message
    assert "name=my_run; this one is name: 'demo_salm'" in message and "\n" not in message
    assert not (tmp_path / "experiments" / "demo_salm" / "mlflow.db").exists()


def test_mlflow_params_of_a_resumed_run_say_what_changed(tmp_path):
    import mlflow

    from orchestrator.tracking import mlflow_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {"trainer.max_steps": 400, "model.lora.r": 8}
    first = mlflow_runs.start_or_resume_run(uri, "e", str(tmp_path / "run"), "r", params, {})
    resumed = {**params, "trainer.max_steps": 800, "data.new_option": 1}
    again = mlflow_runs.start_or_resume_run(uri, "e", str(tmp_path / "run"), "r", resumed, {}, resumed_at=400)
    assert again == first
    logged = mlflow.MlflowClient(uri).get_run(first).data.params
    assert logged["resumed_at_step_400/trainer.max_steps"] == "800" and logged["data.new_option"] == "1"
    assert logged["trainer.max_steps"] == "400"  # MLflow params are write-once
    # the same resume once more (e.g. after a crash) logs nothing new and does not fail
    mlflow_runs.start_or_resume_run(uri, "e", str(tmp_path / "run"), "r", resumed, {}, resumed_at=400)


def test_the_summary_of_a_single_validation_has_no_arrow(capsys, monkeypatch):
    from orchestrator.tracking import mlflow_runs
    from orchestrator.training.driver import TrainingResult, print_summary
    from speech_models.registry import MODELS

    result = TrainingResult(True, "/r", None, "/r/step=40", {}, "id", "sqlite:////tmp/x.db")
    monkeypatch.setattr(mlflow_runs, "metric_history", lambda uri, run, key: [(40, 0.899)])
    print_summary(result, MODELS["salm"])
    out = capsys.readouterr().out
    assert "0.899 at step 40\n" in out and "->" not in out


# --------------------------------------------------------------------------------------------- 7. noise


RAY_OUTPUT = """\
Requesting resources: {'CPU': 0.5} * 2
Attempting to start training worker group of size 2 with the following resources: [{'CPU': 0.5}] * 2
Exception in thread PlacementGroupCleanerMonitor:
Traceback (most recent call last):
  File "/x/threading.py", line 1045, in _bootstrap_inner
    self.run()
ConnectionError: Found multiple active Ray instances: {'192.0.2.2:33913', '192.0.2.2:37317'}.
[2026-11-30 03:51:29,659 E 11605 11646] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: 'x'
Setting up process group for: env:// [rank=0, world_size=2]
Started training worker group of size 2:
- (ip=192.0.2.2, pid=11786) world_rank=0, local_rank=0, node_rank=0
Loading weights:   0%|          | 0/21 [00:00<?, ?it/s]Loading weights: 100%|##########| 21/21 [00:00<00:00]
SALM: 235,200 trainable of 235,200 parameters (100.00%)
/venv/ray/data/execution_options.py:436: RayDeprecationWarning: `exclude_resources` is deprecated
  self.exclude_resources = exclude_resources
Starting execution of Dataset train_0356_0. Full logs are in /tmp/ray/session/logs/ray-data
Execution plan of Dataset train_0356_0: InputDataBuffer[Input] -> TaskPoolMapOperator[ReadSharBatches[train]]
Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.
step 1/6 (17%) | loss 6.899 | lr 2.0e-03 | 2.3 audio-s/s | 7 tok/s | data-wait 49% | ETA 0m45s
A run snapshot was found in storage folder at: '/r'
If you meant to start a brand new training job without any information about previous checkpoints found in ...
✔️  Dataset val_demo_val_0 execution finished in 6.10 seconds
validation at step 3: val_loss=6.67, val_acc=0.1304, val_wer=1
Traceback (most recent call last):
ValueError: a real error
"""


def test_ray_noise_is_filtered_and_everything_else_kept():
    printed: list[tuple[object, str]] = []
    log_filter = WorkerLogFilter(lambda data: printed.extend((data["pid"], line) for line in data["lines"]))
    log_filter({"pid": 1, "lines": RAY_OUTPUT.splitlines()})
    log_filter({"pid": 2, "lines": ["SALM: 235,200 trainable of 235,200 parameters (100.00%)"]})  # rank 1
    project = f"{ROOT}/orchestrator/training/loop.py:83: FutureWarning: ours"
    log_filter({"pid": 2, "lines": [project, "  the source line"]})
    assert [line for _, line in printed] == [
        "SALM: 235,200 trainable of 235,200 parameters (100.00%)",
        RAY_OUTPUT.splitlines()[18],  # the progress line
        "validation at step 3: val_loss=6.67, val_acc=0.1304, val_wer=1",
        "Traceback (most recent call last):",
        "ValueError: a real error",
        project,  # a warning of this project is a bug to see, not noise
        "  the source line",
    ]


def test_the_placement_group_monitor_traceback_is_dropped_whole_even_with_unindented_caret_lines():
    """As a `speechlm train` printed it while another Ray instance ran on the machine (the test session's)."""
    printed: list[str] = []
    log_filter = WorkerLogFilter(lambda data: printed.extend(data["lines"]))
    traceback = [
        "Exception in thread PlacementGroupCleanerMonitor:",
        "Traceback (most recent call last):",
        '  File "/venv/ray/train/v2/_internal/execution/controller/placement_group_cleaner.py", line 80, in _monitor',
        "    alive = is_actor_alive(",
        "            ^^^^^^^^^^^^^^^",
        '  File "/venv/ray/dashboard/utils.py", line 745, in get_address_for_submission_client',
        "    address = ray_address_to_api_server_url(address)",
        "              ^^^^^^^^^^^^^^^^^^^^^^",
        "^^^^^^^^^^^^^^^^^^^^",  # a continuation of the marker line above, at column 0
        '  File "/venv/ray/_private/services.py", line 759, in canonicalize_bootstrap_address_or_die',
        "    raise ConnectionError(",
        "ConnectionError: Found multiple active Ray instances: {'192.0.2.2:44127', '192.0.2.2:39253'}.",
    ]
    log_filter({"pid": 7, "lines": traceback[:9]})  # the printer's batches can split a traceback anywhere
    log_filter({"pid": 7, "lines": [*traceback[9:], "step 10/10 (100%) | loss 34.943"]})
    assert printed == ["step 10/10 (100%) | loss 34.943"]


def test_verbose_brings_everything_back(capsys, monkeypatch, demo_overrides):
    from orchestrator import console

    monkeypatch.setenv(console.VERBOSE_ENV, "0")  # restored after the test
    assert not console.verbose()
    # where a user types it: after the command and its config
    assert run_cli(capsys, "validate", str(DEMO_SALM), "--verbose", *demo_overrides)[0] == 0
    assert console.verbose() and console.filter_ray_worker_logs() is False  # Ray's output left as it is


def test_ddp_setup_raises_no_warning_of_this_project(monkeypatch):
    """torch 2.13 deprecates `broadcast_buffers`; the DDP wrapping keeps it (no buffer sync at init) without the
    warning."""
    import warnings
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from orchestrator.training import parallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # a one-rank process group, wrapped as if it had two ranks
        monkeypatch.setattr(parallel, "dist", SimpleNamespace(is_initialized=lambda: True, get_world_size=lambda: 2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrapped = parallel.wrap_for_distribution(torch.nn.Linear(2, 2), "ddp", torch.device("cpu"))
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        assert [str(w.message) for w in caught] == []
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- init-config


def test_init_config_writes_a_config_that_validates(capsys, tmp_path, shar, llm):
    from speech_models.testing import build_tiny_parakeet_dir

    asr = build_tiny_parakeet_dir(tmp_path / "parakeet")
    out = tmp_path / "mine.yaml"
    argv = ["init-config", "salm", "--train", str(shar), "--val", str(shar), "--out", str(out)]
    argv += ["--llm", str(llm), "--asr", str(asr), "--max-steps", "200", "--accelerator", "cpu"]
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and f"next: speechlm train {out}" in stdout
    text = out.read_text()
    assert text.startswith("# Written by `speechlm init-config salm --train") and f"speechlm train {out}" in text
    loaded = load_experiment(out)
    cfg = loaded.cfg
    assert loaded.warnings == []
    assert cfg.name == "mine" and cfg.trainer.max_steps == 200 and cfg.trainer.val_check_interval == 20
    assert cfg.model.perception.modality_adapter.feat_in == 32  # the tiny Parakeet's width, not NeMo's 1024
    assert cfg.model.lr_scheduler["warmup_ratio"] == 0.05 and "warmup_steps" not in cfg.model.lr_scheduler
    (name,) = cfg.data.validation_ds.datasets
    assert name == shar.name and cfg.data.train_ds.input_cfg[0].shar_path == str(shar)
    assert run_cli(capsys, *argv)[0] == 2  # the file exists: --force to replace it
    assert run_cli(capsys, *argv, "--force")[0] == 0
    code, _, err = run_cli(capsys, "init-config", "salm", "--train", "nope", "--val", str(shar), "--out", "x.yaml")
    assert code == 2 and "does not exist" in err and not Path("x.yaml").exists()


def test_init_config_duplex_checkpoints_on_text_bleu_without_a_scoring_asr(capsys, tmp_path, shar, llm):
    from speech_models.testing import build_tiny_codec_dir, build_tiny_parakeet_dir

    asr, codec = build_tiny_parakeet_dir(tmp_path / "asr"), build_tiny_codec_dir(tmp_path / "codec")
    out = tmp_path / "s2s.yaml"
    argv = ["init-config", "s2s_duplex", "--train", str(shar), "--val", str(shar), "--out", str(out), "--llm"]
    code, _, err = run_cli(capsys, *argv, str(llm), "--asr", str(asr), "--codec", str(codec), "--accelerator", "cpu")
    assert code == 0, err
    cfg = load_experiment(out).cfg
    assert cfg.model.scoring_asr is None and cfg.exp_manager.checkpoint_callback_params.monitor == "val_txt_bleu"
    assert cfg.trainer.strategy == "ddp" and cfg.model.pretrained_audio_codec == str(codec)


# ------------------------------------------------------------------------------------------- 5. LoRA


def test_lora_override_forms_the_readme_documents(demo_overrides):
    added = load_experiment(DEMO_SALM, [*demo_overrides, "model.lora.r=8"]).cfg.model.lora
    assert added is not None and added.r == 8 and added.lora_alpha == 32 and added.target_modules is None
    assert load_experiment(DEMO_SALM, [*demo_overrides, "+model.lora.r=8"]).cfg.model.lora == added
    with pytest.raises(ConfigError, match="already exists; drop the '\\+' to change it"):
        load_experiment(SALM, ["+model.lora.r=16"])
    assert load_experiment(SALM, ["model.lora.r=16"]).cfg.model.lora.r == 16
    assert load_experiment(SALM, ["~model.lora"]).cfg.model.lora is None


# ------------------------------------------------------------------------------------- 6. Python API


def test_speech_models_exports_the_models_lazily():
    code = (
        "import sys, speech_models; assert 'torch' not in sys.modules, 'eager'; "
        "from speech_models import SALM, DuplexS2SModel, DuplexS2SSpeechDecoderModel; "
        "assert SALM.__module__ == 'speech_models.salm'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_transcribe_takes_paths_at_any_rate_and_arrays(tmp_path, llm):
    import torch

    from speech_models import SALM
    from speech_models.audio import load_audio, resample_array
    from speech_models.testing import tiny_salm_config

    torch.manual_seed(0)
    model = SALM(tiny_salm_config(llm)).eval()
    t = np.arange(8000 * 2) / 8000
    wave_8k = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    sf.write(tmp_path / "clip.wav", np.stack([wave_8k, wave_8k], axis=1), 8000)  # stereo, 8 kHz
    stored, rate = sf.read(tmp_path / "clip.wav", dtype="float32")  # 16-bit PCM: what the file holds
    at_16k = resample_array(stored.mean(axis=1), rate, 16000)
    np.testing.assert_allclose(load_audio(tmp_path / "clip.wav", 16000), at_16k, atol=1e-7)
    one = model.transcribe(str(tmp_path / "clip.wav"), max_new_tokens=4)
    assert isinstance(one, str)
    assert model.transcribe([tmp_path / "clip.wav", at_16k], max_new_tokens=4) == [one, one]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.transcribe(str(tmp_path / "missing.wav"))


def test_respond_takes_a_path(tmp_path, llm):
    import torch

    from speech_models import DuplexS2SModel
    from speech_models.testing import build_tiny_codec_dir, tiny_duplex_model_config

    torch.manual_seed(0)
    codec = build_tiny_codec_dir(tmp_path / "codec")
    model = DuplexS2SModel(tiny_duplex_model_config(llm, codec)).eval()
    wave = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    sf.write(tmp_path / "q.wav", wave, 16000)
    text, speech = model.respond(str(tmp_path / "q.wav"))
    texts, speeches = model.respond([wave])
    assert isinstance(text, str) and text == texts[0]
    np.testing.assert_array_equal(speech, speeches[0])
