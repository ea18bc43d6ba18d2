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
from orchestrator.config.yaml_files import read_yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def shipped_configs() -> list[str]:
    """The configs a starter config can be written from: configs/<name>.yaml (NeMo's keys and defaults)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@dataclass
class StarterConfig:
    """What `init-config` writes: the config data, the base it came from and what it could not decide."""

    data: dict[str, Any]
    base: Path
    notes: list[str] = field(default_factory=list)


def starter_config(
    base: str,
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
    """configs/<base>.yaml pointed at Shar sets `train` and `val` (made absolute: a config is read from other
    directories, and by Ray workers), with the given pretrained parts; None keeps the shipped one. What depends on
    the model (a text prompt, a codec, the metric to keep checkpoints by) comes from its registry entry.

    gpu: None = whatever this machine has (GPU workers in bf16 if CUDA is visible, else one CPU worker in fp32).
    """
    from orchestrator.config.loader import experiment_from_dict
    from speech_models.registry import entry_for

    path = CONFIG_DIR / f"{base}.yaml"
    if not path.is_file():
        choices = ", ".join(shipped_configs()) or f"none: {CONFIG_DIR} is missing (a source checkout has it)"
        raise ConfigError([f"there is no shipped config {base!r}; choose one of {choices}"], "init-config")
    data = copy.deepcopy(read_yaml(path))
    entry = entry_for(experiment_from_dict(copy.deepcopy(data), source=str(path)).cfg.model)
    notes: list[str] = []
    m = data["model"]
    data["name"] = name
    m["pretrained_llm"] = _absolute_if_local(llm) or m["pretrained_llm"]
    m["pretrained_asr"] = _absolute_if_local(asr) or m.get("pretrained_asr")
    if entry.speaks:
        m["pretrained_audio_codec"] = _absolute_if_local(codec) or m["pretrained_audio_codec"]
        m["scoring_asr"] = _absolute_if_local(scoring_asr)  # ASR-BLEU needs a second model; text BLEU none
    if prompt_format:
        m["prompt_format"] = prompt_format
    _set_adapter_width(m, notes)
    _set_data(data, entry.transcribes, _absolute(train), _absolute(val), prompt)
    _set_run_length(data, max_steps)
    _set_hardware(data["trainer"], _has_cuda() if gpu is None else gpu)
    exp = data["exp_manager"]
    exp.update(explicit_log_dir=None, exp_dir="experiments", name="${name}")
    exp["mlflow_logger_kwargs"]["experiment_name"] = name
    reported = [f"val_{metric.name}" for metric in entry.validation_metrics(scoring_asr=bool(scoring_asr))]
    if exp["checkpoint_callback_params"]["monitor"] not in reported and entry.text_metric is not None:
        # e.g. val_asr_bleu without a scoring ASR: keep checkpoints by the text metric instead
        metric = entry.text_metric
        exp["checkpoint_callback_params"].update(monitor=f"val_{metric.name}", mode=metric.mode)
    return StarterConfig(data, path, notes)


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
    from orchestrator.config.sources import encoder_width

    width = encoder_width(model["pretrained_asr"]) if model.get("pretrained_asr") else None
    if width is None:
        notes.append(
            f"model.perception.modality_adapter.feat_in is {adapter['feat_in']}: the width of "
            f"{model.get('pretrained_asr')!r} could not be read offline; set feat_in (and d_model) to the "
            "encoder's hidden size if it differs"
        )
        return
    adapter["feat_in"] = adapter["d_model"] = width


def _set_data(data: dict[str, Any], prompted: bool, train: str, val: str, prompt: str | None) -> None:
    d = data["data"]
    train_entry: dict[str, Any] = {"type": "lhotse_shar", "shar_path": train}
    val_entry: dict[str, Any] = {"type": "lhotse_shar", "shar_path": val}
    if prompted:  # a model that reads a text prompt before the audio (the `context` tag)
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
