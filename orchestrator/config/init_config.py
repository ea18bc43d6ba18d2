"""`speechlm init-config`: a ready-to-train config for your own data, written from a shipped config.

Why a command and not only NeMo's `--config-path/--config-name` + overrides (which also work): pointing a config
at your data touches eight keys in three sections (both `shar_path`s, the validation set's name, `name`, the LLM,
the encoder, the encoder's width in the modality adapter, the run length and its validation interval), and two of
them depend on each other or on this machine (the adapter's `feat_in` must equal the encoder's width; GPU or
CPU). The command sets them together, checks the result like `speechlm validate` (paths included) and writes a
file you can read, edit and keep under version control, with its own launch commands in its header.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config.errors import ConfigError
from orchestrator.config.sources import encoder_width
from orchestrator.config.yaml_files import read_yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# model type -> the shipped config a starter config is written from (NeMo's keys and defaults)
BASE_CONFIGS = {
    "salm": "salm.yaml",
    "s2s_duplex": "s2s_duplex.yaml",
    "s2s_duplex_speech_decoder": "s2s_duplex_speech_decoder.yaml",
}


@dataclass
class StarterConfig:
    """What `init-config` writes: the config data, the base it came from and what it could not decide."""

    data: dict[str, Any]
    base: Path
    notes: list[str] = field(default_factory=list)


def starter_config(
    model: str,
    train: str,
    val: str,
    *,
    name: str,
    llm: str | None = None,
    asr: str | None = None,
    codec: str | None = None,
    scoring_asr: str | None = None,
    prompt: str | None = None,
    prompt_format: str | None = None,
    max_steps: int = 1000,
    gpu: bool | None = None,
) -> StarterConfig:
    """The shipped config of `model` pointed at Shar sets `train` and `val` (made absolute: a config is read from
    other directories, and by Ray workers), with the given pretrained parts; None keeps the shipped one.

    gpu: None = whatever this machine has (GPU workers in bf16 if CUDA is visible, else one CPU worker in fp32).
    """
    if model not in BASE_CONFIGS:
        raise ConfigError([f"model {model!r} is not one of {', '.join(BASE_CONFIGS)}"], "init-config")
    base = CONFIG_DIR / BASE_CONFIGS[model]
    if not base.is_file():
        raise ConfigError(
            [f"{base} is missing (init-config writes from the configs/ of a source checkout)"], "init-config"
        )
    data = copy.deepcopy(read_yaml(base))
    notes: list[str] = []
    m = data["model"]
    data["name"] = name
    m["pretrained_llm"] = _absolute_if_local(llm) or m["pretrained_llm"]
    m["pretrained_asr"] = _absolute_if_local(asr) or m["pretrained_asr"]
    if "pretrained_audio_codec" in m:
        m["pretrained_audio_codec"] = _absolute_if_local(codec) or m["pretrained_audio_codec"]
    if prompt_format:
        m["prompt_format"] = prompt_format
    if "scoring_asr" in m:  # ASR-BLEU needs a second model; validation's text BLEU needs none
        m["scoring_asr"] = _absolute_if_local(scoring_asr)
    _set_adapter_width(m, notes)
    _set_data(data, model, _absolute(train), _absolute(val), prompt)
    _set_run_length(data, max_steps)
    _set_hardware(data["trainer"], _has_cuda() if gpu is None else gpu)
    exp = data["exp_manager"]
    exp.update(explicit_log_dir=None, exp_dir="experiments", name="${name}")
    exp["mlflow_logger_kwargs"]["experiment_name"] = name
    if model != "salm" and not scoring_asr:
        exp["checkpoint_callback_params"].update(monitor="val_txt_bleu", mode="max")
    return StarterConfig(data, base, notes)


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _absolute_if_local(value: str | None) -> str | None:
    """A path that exists here, made absolute; anything else (a hub id) as given."""
    return _absolute(value) if value and Path(value).expanduser().exists() else value


def _set_adapter_width(model: dict[str, Any], notes: list[str]) -> None:
    """The modality adapter reads the encoder's output: its feat_in (and, as in NeMo's configs, d_model) must be
    the encoder's width, which only the pretrained encoder knows."""
    adapter = model.get("perception", {}).get("modality_adapter")
    if not adapter:
        return
    width = encoder_width(model["pretrained_asr"]) if model.get("pretrained_asr") else None
    if width is None:
        notes.append(
            f"model.perception.modality_adapter.feat_in is {adapter['feat_in']}: the width of "
            f"{model.get('pretrained_asr')!r} could not be read offline; set feat_in (and d_model) to the "
            "encoder's hidden size if it differs"
        )
        return
    adapter["feat_in"] = adapter["d_model"] = width


def _set_data(data: dict[str, Any], model: str, train: str, val: str, prompt: str | None) -> None:
    d = data["data"]
    train_entry: dict[str, Any] = {"type": "lhotse_shar", "shar_path": train}
    val_entry: dict[str, Any] = {"type": "lhotse_shar", "shar_path": val}
    if model == "salm":
        context = prompt or d["train_ds"]["input_cfg"][0]["tags"]["context"]
        train_entry["tags"] = {"context": context}
        val_entry["tags"] = {"context": context}
    d["train_ds"]["input_cfg"] = [train_entry]
    # Bins written for NeMo's data would put short clips in one bucket: estimated from this data instead.
    d["train_ds"].pop("bucket_duration_bins", None)
    d["train_ds"]["num_workers"] = min(int(d["train_ds"].get("num_workers") or 1), 2)
    # The validation set's name is the suffix of its metrics (val_wer_<name>): the val directory's name.
    d["validation_ds"]["datasets"] = {Path(val).name: {"input_cfg": [val_entry]}}


def _set_run_length(data: dict[str, Any], max_steps: int) -> None:
    """Validation, logging and warmup are counted in steps: they are set relative to the run's length."""
    t = data["trainer"]
    t["max_steps"] = max_steps
    t.pop("limit_train_batches", None)  # NeMo's duplex config derives val_check_interval from it
    t["val_check_interval"] = max(1, max_steps // 10)
    t["log_every_n_steps"] = max(1, min(10, max_steps // 20))
    schedule = data["model"].get("lr_scheduler") or {}
    if schedule:
        schedule.pop("warmup_steps", None)
        schedule["warmup_ratio"] = 0.05


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _set_hardware(trainer: dict[str, Any], gpu: bool) -> None:
    trainer["strategy"] = "ddp"  # NeMo's Lightning DDPStrategy block: its options have no Ray Train equivalent
    if gpu:
        trainer.update(accelerator="gpu", devices=-1, precision="bf16-true")
    else:
        trainer.update(accelerator="cpu", devices=1, precision="32")


def render(starter: StarterConfig, out: Path, command: str) -> str:
    """The YAML text: a header that says where it came from and how to launch it, then the config."""
    header = [
        f"# Written by `{command}`",
        f"# from {starter.base} (its comments explain every key). Edit freely, then:",
        f"#   speechlm validate {out}",
        f"#   speechlm train {out}",
        f"#   speechlm train {out} trainer.max_steps=20 name={starter.data['name']}_smoke   # a first short run",
        "# Runs go to experiments/<name>; running the same command again resumes from the last checkpoint.",
    ]
    header += [f"# NOTE: {note}" for note in starter.notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(starter.data, sort_keys=False, allow_unicode=True, width=120)
