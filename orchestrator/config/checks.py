"""Checks that span several keys, run after the schema has typed every value.

Each check appends a message that names the key, the value received and how to fix it; nothing raises
here, so one `speechlm validate` run lists every problem.
"""

from __future__ import annotations

import itertools
import re

from orchestrator.config.schema import DatasetConfig, ExperimentConfig
from orchestrator.config.targets import (
    ENCODERS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    PERCEPTION_MODULES,
    PREPROCESSORS,
    SPEC_AUGMENTS,
    SPEECH_DECODERS,
    argument_problems,
    construction_problems,
    target_problem,
)
from orchestrator.storage.paths import too_broad_problem
from orchestrator.storage.run_dirs import run_dir
from speech_models.config import ConformerConfig, unsupported_options
from speech_models.registry import entry_for, model_types
from speech_models.typed_data import did_you_mean

CONV_NORM = re.compile(r"^(batch_norm|layer_norm|group_?norm\d*)$")


def check_experiment(cfg: ExperimentConfig, problems: list[str]) -> None:
    """Append every cross-key problem of `cfg` to `problems`."""
    _check_trainer(cfg, problems)
    _check_run_dir(cfg, problems)
    _check_model(cfg, problems)
    _check_monitor(cfg, problems)
    _check_dataset(cfg.data.train_ds, "data.train_ds", problems)
    _check_dataset_for_model(cfg, cfg.data.train_ds, "data.train_ds", problems)
    if cfg.data.validation_ds is not None:
        if not cfg.data.validation_ds.datasets:
            problems.append(
                "data.validation_ds.datasets: no validation set; add one, e.g. "
                "datasets: {dev: {shar_path: /path/to/dev}}, or remove validation_ds"
            )
        for name, ds in cfg.data.validation_ds.datasets.items():
            _check_dataset(ds, f"data.validation_ds.datasets.{name}", problems)
            _check_dataset_for_model(cfg, ds, f"data.validation_ds.datasets.{name}", problems)


def _check_trainer(cfg: ExperimentConfig, problems: list[str]) -> None:
    t = cfg.trainer
    for key in ("max_steps", "log_every_n_steps", "val_check_interval", "accumulate_grad_batches", "num_nodes"):
        if getattr(t, key) < 1:
            problems.append(f"trainer.{key}: {getattr(t, key)} must be at least 1")
    if t.devices == 0 or t.devices < -1:
        problems.append(f"trainer.devices: {t.devices} must be a positive worker count per node, or -1 for every GPU")
    if t.devices == -1 and t.accelerator == "cpu":
        problems.append("trainer.devices: -1 means 'every GPU of a node'; with accelerator cpu give a worker count")
    if t.cpus_per_worker is not None and t.cpus_per_worker <= 0:
        problems.append(f"trainer.cpus_per_worker: {t.cpus_per_worker} must be positive")
    if t.async_validation and (cfg.data.validation_ds is None or not cfg.exp_manager.create_checkpoint_callback):
        problems.append(
            "trainer.async_validation: validates each checkpoint in a task of its own, so it needs "
            "data.validation_ds and exp_manager.create_checkpoint_callback=true; set both or remove the key"
        )
    if t.min_nodes is not None:
        if not 1 <= t.min_nodes <= t.num_nodes:
            problems.append(
                f"trainer.min_nodes: {t.min_nodes} must be between 1 and trainer.num_nodes ({t.num_nodes}); the run "
                "keeps going with min_nodes x devices workers and grows to num_nodes x devices"
            )
        if t.devices == -1:
            problems.append(
                "trainer.min_nodes: elastic training needs a fixed worker count per node; give trainer.devices "
                "(GPUs per node) instead of -1"
            )


def run_length_warnings(cfg: ExperimentConfig) -> list[str]:
    """What a shortened run (`trainer.max_steps=40` on a config written for thousands of steps) leaves out of
    scale: validation and warmup are counted in steps, and neither shrinks with max_steps by itself."""
    t, notes = cfg.trainer, []
    if t.val_check_interval > t.max_steps and cfg.data.validation_ds is not None:
        notes.append(
            f"trainer.val_check_interval: {t.val_check_interval} is larger than trainer.max_steps ({t.max_steps}): "
            f"this run validates and checkpoints once, at step {t.max_steps}; for more, set "
            f"trainer.val_check_interval={max(1, t.max_steps // 4)}"
        )
    schedule = cfg.model.lr_scheduler or {}
    schedule_steps, warmup = schedule.get("max_steps"), schedule.get("warmup_steps")
    if isinstance(schedule_steps, int) and schedule_steps != t.max_steps:
        notes.append(
            f"model.lr_scheduler.max_steps: the schedule ends at step {schedule_steps} but the run at "
            f"trainer.max_steps={t.max_steps}; write max_steps: ${{trainer.max_steps}} to tie them"
        )
    if isinstance(warmup, int) and warmup >= min(t.max_steps, schedule_steps or t.max_steps):
        notes.append(
            f"model.lr_scheduler.warmup_steps: {warmup} is not below the run's {t.max_steps} steps, so the learning "
            f"rate never reaches its peak; lower it (model.lr_scheduler.warmup_steps={t.max_steps // 10}) or give "
            "~model.lr_scheduler.warmup_steps +model.lr_scheduler.warmup_ratio=0.1 (a fraction of max_steps, "
            "which scales with the run)"
        )
    return notes


def _check_run_dir(cfg: ExperimentConfig, problems: list[str]) -> None:
    """Names become directory names: they must not climb out of exp_dir or land the run on `/` or `~`."""
    exp = cfg.exp_manager
    for key, value in (("name", cfg.name), ("exp_manager.name", exp.name), ("exp_manager.version", exp.version)):
        if value is not None and (problem := name_problem(value)):
            problems.append(f"{key}: {value!r} {problem}")
    if not exp.explicit_log_dir and any(name_problem(v) for v in (exp.name, exp.version) if v is not None):
        return  # the run dir is made of those names, reported above
    if problem := too_broad_problem(run_dir(exp)):
        key = "exp_manager.explicit_log_dir" if exp.explicit_log_dir else "exp_manager.exp_dir"
        problems.append(f"{key}: the run directory {problem}; give the run a directory of its own")


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one directory name (a run's, a sweep's, a version's), or None."""
    if not name.strip():
        return "is empty; give a name (letters, digits, '_', '.', '-')"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "must be a single directory name, without '/', '\\' or '..' (it becomes part of the run directory)"
    return None


def produced_metrics(cfg: ExperimentConfig) -> list[str]:
    """The validation metrics a run of `cfg` reports (each also per set as `<metric>_<set name>`)."""
    entry = entry_for(cfg.model)
    return [f"val_{m.name}" for m in entry.validation_metrics(scoring_asr=bool(cfg.model.scoring_asr))]


def _check_monitor(cfg: ExperimentConfig, problems: list[str]) -> None:
    if cfg.data.validation_ds is None or not cfg.exp_manager.create_checkpoint_callback:
        return  # without validation, checkpoints are kept by recency and monitor is unused
    if cfg.model.resolved_model_type() not in model_types():
        return  # reported by _check_model
    monitor = cfg.exp_manager.checkpoint_callback_params.monitor
    produced = produced_metrics(cfg)
    if not any(monitor == m or monitor.startswith(m + "_") for m in produced):
        why = " (val_asr_bleu needs model.scoring_asr)" if monitor.startswith("val_asr_bleu") else ""
        problems.append(
            f"exp_manager.checkpoint_callback_params.monitor: {monitor!r} is not a metric this run reports{why}; "
            f"choose one of {', '.join(produced)} (or <metric>_<validation set name>)" + did_you_mean(monitor, produced)
        )


def _check_model(cfg: ExperimentConfig, problems: list[str]) -> None:
    m = cfg.model
    if m.model_type != "auto" and m.model_type not in model_types():
        problems.append(
            f"model.model_type: {m.model_type!r} is not a registered model; choose auto or one of "
            f"{', '.join(model_types())}.{did_you_mean(m.model_type, model_types())}"
        )
    else:
        entry = entry_for(m)
        if entry.speaks and m.pretrained_audio_codec is None:
            problems.append(
                f"model.pretrained_audio_codec: the {entry.name} model needs an audio codec "
                "(a hub id or local dir of a Mimi/EnCodec/DAC model)"
            )
    for key in ("freeze_params", "prevent_freeze_params"):
        for i, pattern in enumerate(getattr(m, key)):
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"model.{key}[{i}]: regex {pattern!r} does not compile ({exc})")
    if m.lora is not None:
        if m.lora.r < 1:
            problems.append(f"model.lora.r: {m.lora.r} must be at least 1 (the LoRA rank)")
        if not 0 <= m.lora.lora_dropout < 1:
            problems.append(f"model.lora.lora_dropout: {m.lora.lora_dropout} must be in [0, 1)")
    target_problems = []
    for key, spec, allowed, what in (
        ("optimizer", m.optimizer, OPTIMIZERS, "optimizer"),
        ("lr_scheduler", m.lr_scheduler, LR_SCHEDULERS, "LR scheduler"),
    ):
        if spec is not None:
            target_problems.extend(f"model.{key}.{p}" for p in argument_problems(spec, allowed, what))
    problems.extend(target_problems or construction_problems(m.optimizer, m.lr_scheduler))
    if problem := target_problem(m.perception.target, PERCEPTION_MODULES, "perception module"):
        problems.append(f"model.perception.target: {problem}")
    for key, part, allowed, what in (
        ("preprocessor", m.perception.preprocessor, PREPROCESSORS, "preprocessor"),
        ("spec_augment", m.perception.spec_augment, SPEC_AUGMENTS, "SpecAugment module"),
    ):
        if part is not None and part._target_ is not None and (problem := target_problem(part._target_, allowed, what)):
            problems.append(f"model.perception.{key}._target_: {problem}")
    problems += unsupported_options(m)
    _check_conformer(m.perception.encoder, "model.perception.encoder", problems)
    if m.perception.modality_adapter is not None:
        _check_conformer(m.perception.modality_adapter, "model.perception.modality_adapter", problems)
    if m.speech_decoder is not None and (
        problem := target_problem(m.speech_decoder.target, SPEECH_DECODERS, "speech decoder")
    ):
        problems.append(f"model.speech_decoder.target: {problem}")
    if m.audio_loss_weight < 0 or m.text_loss_weight < 0:
        problems.append("model.audio_loss_weight / text_loss_weight: loss weights must not be negative")
    chunk = m.encoder_chunk_size_seconds
    if chunk is not None and chunk <= 0:
        problems.append(f"model.encoder_chunk_size_seconds: {chunk} must be positive (seconds), or null")
    if chunk is not None and m.model_type in ("auto", *model_types()) and not entry_for(m).encodes_in_chunks:
        problems.append(
            f"model.encoder_chunk_size_seconds: the {entry_for(m).name} model does not encode audio in chunks (as "
            "in NeMo, only SALM does; duplex models need one perception frame per 80 ms of the whole "
            "conversation); remove the key"
        )


def _check_conformer(enc: ConformerConfig, path: str, problems: list[str]) -> None:
    if enc._target_ is not None and (problem := target_problem(enc._target_, ENCODERS, "encoder")):
        problems.append(f"{path}._target_: {problem}")
    if enc.d_model % enc.n_heads:
        problems.append(f"{path}.d_model: {enc.d_model} is not divisible by n_heads ({enc.n_heads})")
    contexts = enc.att_context_size if enc.att_context_size and isinstance(enc.att_context_size[0], list) else None
    if any(len(pair) != 2 for pair in contexts or [enc.att_context_size]):
        problems.append(
            f"{path}.att_context_size: {enc.att_context_size} must be [left, right] (or NeMo's list of such pairs)"
        )
    context = enc.conv_context_size
    if isinstance(context, list) and (len(context) != 2 or sum(context) + 1 != enc.conv_kernel_size):
        problems.append(
            f"{path}.conv_context_size: {context} must be [left, right] with "
            f"left + right + 1 == conv_kernel_size ({enc.conv_kernel_size})"
        )
    if not CONV_NORM.match(enc.conv_norm_type):
        problems.append(
            f"{path}.conv_norm_type: {enc.conv_norm_type!r} is not allowed; choose batch_norm, layer_norm or "
            "group_norm<N> (N groups, e.g. group_norm4)"
        )
    if enc.subsampling_factor < 1 or enc.subsampling_factor & (enc.subsampling_factor - 1):
        problems.append(f"{path}.subsampling_factor: {enc.subsampling_factor} must be a power of 2")


def _check_dataset(ds: DatasetConfig, path: str, problems: list[str]) -> None:
    multimodal = ds.use_multimodal_sampling
    if (
        ds.batch_size is None
        and ds.bucket_batch_size is None
        and (ds.batch_tokens is None if multimodal else ds.batch_duration is None)
    ):
        if multimodal:
            problems.append(
                f"{path}: use_multimodal_sampling counts tokens, and neither batch_tokens nor batch_size is set; set "
                "batch_tokens (token slots per batch: text tokens + audio frames), batch_size, or bucket_batch_size"
                + (
                    " (batch_duration counts seconds and is not used with multimodal sampling)"
                    if ds.batch_duration
                    else ""
                )
            )
        else:
            problems.append(
                f"{path}: neither batch_size nor batch_duration is set; set batch_size (cuts per batch) "
                "or batch_duration (seconds of audio per batch)"
            )
    for key in ("batch_size", "batch_duration", "batch_tokens", "quadratic_factor", "token_equivalent_duration"):
        value = getattr(ds, key)
        if value is not None and value <= 0:
            problems.append(f"{path}.{key}: {value} must be positive")
    if multimodal and ds.token_equivalent_duration is None:
        problems.append(
            f"{path}.token_equivalent_duration: not set, but use_multimodal_sampling counts each audio frame as a "
            "token; set it to the encoder's frame in seconds (window_stride x subsampling_factor, e.g. 0.08)"
        )
    _check_bins(ds, path, problems)
    if ds.min_tokens is not None and ds.max_tokens is not None and ds.min_tokens > ds.max_tokens:
        problems.append(f"{path}.min_tokens: {ds.min_tokens} must not exceed max_tokens ({ds.max_tokens})")
    if ds.min_duration >= ds.max_duration:
        problems.append(f"{path}.min_duration: {ds.min_duration} must be below max_duration ({ds.max_duration})")
    if ds.shar_path is None and not ds.input_cfg:
        problems.append(
            f"{path}: no data; set shar_path (a Lhotse Shar dir, a list of dirs, or an fsspec URL) or input_cfg"
        )
    _check_inputs(ds.input_cfg, f"{path}.input_cfg", problems)
    if _has_text_only(ds.input_cfg) and not multimodal and ds.batch_size is None and ds.bucket_batch_size is None:
        problems.append(
            f"{path}: text-only inputs have no audio duration, so batch_duration cannot bound their batches; set "
            "use_multimodal_sampling: true with batch_tokens (and token_equivalent_duration), or a batch_size"
        )


def _check_bins(ds: DatasetConfig, path: str, problems: list[str]) -> None:
    bins = ds.bucket_duration_bins
    two_d = bool(bins) and isinstance(bins[0], list)
    if bins is not None and (ds.use_bucketing or ds.bucket_batch_size is not None):
        if two_d:
            if any(not isinstance(b, list) or len(b) != 2 for b in bins):
                problems.append(f"{path}.bucket_duration_bins: 2-D bins must all be [first, second] pairs, got {bins}")
            elif any(tuple(nxt) < tuple(prev) for prev, nxt in itertools.pairwise(bins)):
                problems.append(f"{path}.bucket_duration_bins: 2-D bins {bins} must be sorted")
            elif ds.bucket_batch_size is None and not (ds.use_multimodal_sampling and ds.batch_tokens is not None):
                problems.append(
                    f"{path}.bucket_duration_bins: 2-D bins need bucket_batch_size (one batch size per bucket, from "
                    "`speechlm data plan-batches`) or use_multimodal_sampling with batch_tokens"
                )
        elif any(isinstance(b, list) for b in bins):
            problems.append(f"{path}.bucket_duration_bins: {bins} mixes numbers and [first, second] pairs")
        else:
            if any(nxt <= prev for prev, nxt in itertools.pairwise(bins)):
                problems.append(f"{path}.bucket_duration_bins: {bins} must be strictly increasing")
            # NeMo's configs give one upper edge per bucket; its estimate scripts print num_buckets - 1 edges.
            if ds.bucket_batch_size is None and len(bins) not in (ds.num_buckets, ds.num_buckets - 1):
                problems.append(
                    f"{path}.bucket_duration_bins: {len(bins)} bins do not match num_buckets ({ds.num_buckets}); "
                    "give one upper duration edge per bucket, or drop the bins to estimate them from the data"
                )
    if ds.bucket_batch_size is not None:
        if bins is None:
            problems.append(
                f"{path}.bucket_batch_size: set, but bucket_duration_bins is not; give the bins the batch sizes "
                "were planned for (`speechlm data plan-batches` prints both)"
            )
        elif len(ds.bucket_batch_size) != len(bins):
            problems.append(
                f"{path}.bucket_batch_size: {len(ds.bucket_batch_size)} sizes for {len(bins)} buckets; give one "
                "batch size per bucket_duration_bins entry"
            )
        if any(b < 1 for b in ds.bucket_batch_size):
            problems.append(f"{path}.bucket_batch_size: {ds.bucket_batch_size} must all be at least 1")
    elif two_d and not ds.use_bucketing:
        problems.append(f"{path}.bucket_duration_bins: 2-D bins need use_bucketing: true")


# The keys each input type reads (besides type, weight, tags, audio_locator_tag); others are reported as unused.
_INPUT_KEYS = {
    "lhotse_shar": ("shar_path",),
    "lhotse": ("cuts_path", "shar_path"),
    "lhotse_as_conversation": ("cuts_path", "shar_path"),
    "nemo": ("manifest_filepath", "text_field", "lang_field"),
    "nemo_tarred": (
        "manifest_filepath", "tarred_audio_filepaths", "text_field", "lang_field", "skip_missing_manifest_entries"
    ),
    "multimodal_conversation": ("manifest_filepath", "tarred_audio_filepaths"),
    "share_gpt": ("manifest_filepath", "tarred_audio_filepaths", "audio_placeholders", "audio_root"),
    "txt": ("paths", "language"),
    "txt_jsonl": ("paths", "language", "text_field"),
    "nemo_sft_jsonl": ("paths", "language"),
    "group": ("input_cfg",),
}  # fmt: skip
_REQUIRED_INPUT_KEYS = {
    "lhotse_shar": (("shar_path",), "a Lhotse Shar directory, a list of them, or an fsspec URL (s3://...)"),
    "lhotse": (("cuts_path", "shar_path"), "a Lhotse cuts manifest (cuts.jsonl.gz) or a Shar directory"),
    "lhotse_as_conversation": (("cuts_path", "shar_path"), "a Lhotse cuts manifest or a Shar directory"),
    "nemo": (("manifest_filepath",), "a NeMo JSON-lines manifest (audio_filepath, duration, text)"),
    "nemo_tarred": (("manifest_filepath",), "NeMo manifest shards, e.g. manifest__OP_0..127_CL_.json"),
    "multimodal_conversation": (("manifest_filepath",), "a JSONL file of NeMo multimodal conversations"),
    "share_gpt": (("manifest_filepath",), "a ShareGPT-style JSONL file"),
    "txt": (("paths",), "text files, one example per line"),
    "txt_jsonl": (("paths",), "JSONL files with a text field"),
    "nemo_sft_jsonl": (("paths",), "NeMo SFT chat JSONL files"),
    "group": (("input_cfg",), "a list of input entries"),
}


def _check_inputs(entries, path: str, problems: list[str]) -> None:
    from orchestrator.config.schema import InputConfig

    defaults = InputConfig()
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        keys, what = _REQUIRED_INPUT_KEYS[entry.type]
        if all(not getattr(entry, key) for key in keys):
            problems.append(f"{where}.{keys[0]}: missing; point it at {what} (type {entry.type})")
        if entry.type == "nemo_tarred" and not entry.tarred_audio_filepaths:
            problems.append(
                f"{where}.tarred_audio_filepaths: missing; type nemo_tarred reads its audio from tars "
                "(audio__OP_0..127_CL_.tar), or use type nemo for audio files"
            )
        for key in ("shar_path", "cuts_path", "manifest_filepath", "tarred_audio_filepaths", "paths"):
            if key not in _INPUT_KEYS[entry.type] and getattr(entry, key) != getattr(defaults, key):
                users = [t for t, ks in _INPUT_KEYS.items() if key in ks]
                problems.append(
                    f"{where}.{key}: type {entry.type} does not read {key} (it is for {', '.join(users)}); "
                    "remove it or change the type"
                )
        if entry.weight < 0:
            problems.append(f"{where}.weight: {entry.weight} must not be negative")
        if entry.type == "group":
            _check_inputs(entry.input_cfg, f"{where}.input_cfg", problems)


def _leaf_types(entries) -> list[str]:
    out = []
    for entry in entries:
        out += _leaf_types(entry.input_cfg) if entry.type == "group" else [entry.type]
    return out


def _has_text_only(entries) -> bool:
    from orchestrator.data.inputs import TEXT_TYPES

    return any(t in TEXT_TYPES for t in _leaf_types(entries))


def _check_dataset_for_model(cfg: ExperimentConfig, ds: DatasetConfig, path: str, problems: list[str]) -> None:
    """What the dataset asks of the model's collator: reading conversations, counting tokens."""
    from orchestrator.data.inputs import CONVERSATION_TYPES

    if cfg.model.resolved_model_type() not in model_types():
        return  # reported by _check_model
    entry = entry_for(cfg.model)
    if not entry.conversations:
        for kind in sorted(set(_leaf_types(ds.input_cfg)) & set(CONVERSATION_TYPES)):
            problems.append(
                f"{path}.input_cfg: type {kind} holds conversations or text, which the {entry.name} model does not "
                "read (it trains on cuts with audio); use it with a SALM model, or give this model cut-based inputs"
            )
    two_d = bool(ds.bucket_duration_bins) and isinstance(ds.bucket_duration_bins[0], list)
    counts_tokens = ds.use_multimodal_sampling or two_d or ds.min_tokens is not None or ds.max_tokens is not None
    if counts_tokens and not callable(getattr(entry.collator_class(), "token_lengths", None)):
        problems.append(
            f"{path}: use_multimodal_sampling, 2-D bins and min/max_tokens count an example's tokens, which the "
            f"{entry.name} model's collator cannot; batch by batch_duration / batch_size instead"
        )
