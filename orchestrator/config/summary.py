"""A short human summary of a resolved config: what `speechlm validate` prints before spending a cluster."""

from __future__ import annotations

from typing import Any

from orchestrator.config.schema import DatasetConfig, ExperimentConfig
from orchestrator.redaction import redact
from orchestrator.storage.run_dirs import run_dir
from orchestrator.tracking.mlflow_runs import experiment_name_for, tracking_uri_for
from speech_models.registry import entry_for


def _shar_paths(value: Any) -> list[str]:
    """Every documented `shar_path` form as short text: a dir, a list of dirs or of NeMo's [dir, weight] pairs,
    or {field: [shard URLs]}."""
    if value is None or value == "":
        return []
    if isinstance(value, dict):
        fields = ", ".join(f"{k}: {len(v) if isinstance(v, list) else 1} shards" for k, v in value.items())
        first = next(iter(value.get("cuts") or [None]), None)
        return [f"{{{fields}}}" + (f" from {first}" if first else "")]
    if isinstance(value, list):
        out: list[str] = []
        for entry in value:
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], (int, float)):
                out.append(f"{entry[0]} (weight {entry[1]:g})")
            else:
                out.extend(_shar_paths(entry))
        return out
    return [str(value)]


def _data_sources(ds: DatasetConfig) -> str:
    paths = _shar_paths(ds.shar_path)
    for entry in ds.input_cfg:
        paths.extend(_shar_paths(entry.shar_path or entry.cuts_path))
    if len(paths) > 4:
        paths = [*paths[:3], f"... ({len(paths)} in all)"]
    return ", ".join(paths) or "(none)"


def _batching(ds: DatasetConfig) -> str:
    size = f"batch_duration={ds.batch_duration}s" if ds.batch_duration else f"batch_size={ds.batch_size}"
    if ds.use_bucketing:
        size += f", bucketing ({ds.num_buckets} buckets)"
    return size


def summarize(cfg: ExperimentConfig, source: str) -> str:
    m, t, d = cfg.model, cfg.trainer, cfg.data
    enc = m.perception.encoder
    adapter = m.perception.modality_adapter
    workers = "every GPU" if t.devices == -1 else str(t.devices * t.num_nodes)
    lines = [
        f"config       {source}  (name: {cfg.name})",
        f"model        {m.resolved_model_type()}  llm={m.pretrained_llm}  pretrained_weights={m.pretrained_weights}",
        f"perception   encoder {enc.n_layers}x{enc.d_model} ({enc.self_attention_model}, "
        f"x{enc.subsampling_factor} {enc.subsampling})"
        + (f" from {m.pretrained_asr}" if m.pretrained_asr else "")
        + f"; adapter {'identity' if adapter is None else f'{adapter.n_layers}x{adapter.d_model}'}",
        f"tuning       lora={f'r={m.lora.r}' if m.lora else 'off'}  freeze_params={len(m.freeze_params)} "
        f"prevent_freeze_params={len(m.prevent_freeze_params)}  optimizer={m.optimizer.get('_target_')}",
    ]
    if entry_for(m).speaks:
        lines.append(
            f"speech       codec={m.pretrained_audio_codec}  loss = {m.text_loss_weight}*text + "
            f"{m.audio_loss_weight}*audio"
            + (f"  speech_decoder {m.speech_decoder.n_layers}x{m.speech_decoder.d_model}" if m.speech_decoder else "")
        )
    lines += [
        f"trainer      workers={workers} accelerator={t.accelerator} precision={t.precision} strategy={t.strategy} "
        f"max_steps={t.max_steps} val_check_interval={t.val_check_interval}",
        f"train data   {_data_sources(d.train_ds)}  [{_batching(d.train_ds)}]",
    ]
    if d.validation_ds is not None:
        for name, ds in d.validation_ds.datasets.items():
            lines.append(f"val data     {name}: {_data_sources(ds)}  [{_batching(ds)}]")
    directory = run_dir(cfg.exp_manager)
    lines += [
        f"run dir      {directory}",
        f"mlflow       {tracking_uri_for(cfg.exp_manager, directory)}  experiment={experiment_name_for(cfg.exp_manager)}",
    ]
    return redact("\n".join(lines))
