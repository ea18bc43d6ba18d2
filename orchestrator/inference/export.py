"""`speechlm export`: a checkpoint -> a self-contained model directory, in this project's format
(`speech_models.pretrained`) or in NeMo's (`--format nemo`, `speech_models.nemo_format`: what NeMo 3.0's
`SALM.from_pretrained` loads).

    checkpoint (or run dir) -> model in fp32 -> [--merge-lora: merge adapters, check logits on a probe batch]
    -> write DIR -> reload DIR with from_pretrained, check its logits again -> [--register: MLflow]

DIR is written aside (`storage.atomic`) and appears only once complete and checked: a crash or a failed check
leaves no export that looks usable.

Both checks run the same probe (fixed random audio) through the model's own `probe_logits` (SALM: the LM logits
over its prompt and a fixed answer; duplex models: text and audio logits of every frame), and fail the export
when the largest difference exceeds atol + rtol * max|logit|.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from orchestrator.inference.sources import ModelSource, SourceError, input_sample_rate, load_model, resolve_source
from orchestrator.storage.atomic import atomic_dir
from orchestrator.tracking import mlflow_runs

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
ExportFormat = Literal["speechlm", "nemo"]


class ExportCheckError(RuntimeError):
    """Merged and unmerged (or saved and reloaded) logits disagree beyond the tolerance."""


@dataclass
class ExportResult:
    out_dir: str
    model_class: str  # e.g. SALM: load the export with <model_class>.from_pretrained(out_dir)
    format: str  # "speechlm" or "nemo"
    merged_lora: bool
    merge_max_diff: float | None  # max |logit| difference, merged vs unmerged LoRA
    reload_max_diff: float | None  # max |logit| difference, reloaded export vs the model that was saved
    registered: str | None = None  # "name/version" in the MLflow model registry
    tracking_uri: str | None = None


# ----------------------------------------------------------------------------------------------
# Probe batch and logits
# ----------------------------------------------------------------------------------------------


def probe_audios(model: torch.nn.Module, seed: int = 0) -> list[np.ndarray]:
    """Two utterances of fixed random audio (1.0 s and 0.7 s, so padding is exercised) at the input rate."""
    rate = input_sample_rate(model)
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (rate, rate * 7 // 10)]


def compare_logits(reference: torch.Tensor, other: torch.Tensor, atol: float, rtol: float, what: str) -> float:
    """Max |difference|; raises ExportCheckError when it exceeds atol + rtol * max|reference|."""
    if reference.shape != other.shape:
        raise ExportCheckError(f"{what}: logits have shapes {tuple(reference.shape)} and {tuple(other.shape)}")
    diff = float((reference - other).abs().max()) if reference.numel() else 0.0
    bound = atol + rtol * float(reference.abs().max()) if reference.numel() else atol
    if not diff <= bound:
        raise ExportCheckError(f"{what}: logits differ by up to {diff:.3g}, more than the tolerance {bound:.3g}")
    return diff


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def export_model(
    model: str | ModelSource,
    out_dir: str | Path,
    *,
    export_format: ExportFormat = "speechlm",
    merge_lora: bool = False,
    which: str = "best",
    overrides: Sequence[str] = (),
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    register: str | None = None,
    tracking_uri: str | None = None,
) -> ExportResult:
    """Write the model of a checkpoint (or a run dir's best / latest one, an export, a NeMo dir) as a
    self-contained directory in `export_format`."""
    from speech_models import nemo_format, pretrained

    source = model if isinstance(model, ModelSource) else resolve_source(model, which, overrides)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise SourceError(f"--out {out} exists and is not empty; pick a new directory or remove it")
    # fp32 whatever the training precision: the export is the reference copy; cast when deploying.
    net, _ = load_model(source, "cpu", apply_precision=False)
    probe = probe_audios(net)
    merged, merge_diff = False, None
    if merge_lora:
        if not pretrained.has_lora(net):
            raise SourceError(f"--merge-lora: {source.path} has no LoRA adapters (model.lora is null)")
        before = net.probe_logits(probe)
        merged = pretrained.merge_lora(net)
        merge_diff = compare_logits(before, net.probe_logits(probe), atol, rtol, "merged vs unmerged LoRA")
    reload_diff = None
    with atomic_dir(out) as building:  # appears as `out` only once written and checked
        try:
            if export_format == "nemo":
                nemo_format.write_nemo_dir(net, building)
            else:
                pretrained.save_pretrained(net, building, prompt=source.prompt, data=source.frames)
        except ValueError as exc:  # a model NeMo's format cannot hold (duplex): say why, nothing written
            raise SourceError(f"--format {export_format}: {exc}") from None
        if verify:
            reloaded = pretrained.from_pretrained(building)
            reload_diff = compare_logits(
                net.probe_logits(probe),
                reloaded.probe_logits(probe),
                atol,
                rtol,
                f"export {out} reloaded vs saved model",
            )
    result = ExportResult(str(out), type(net).__name__, export_format, merged, merge_diff, reload_diff)
    if register:
        result.tracking_uri, result.registered = register_model(source, out, register, tracking_uri)
    return result


def register_model(source: ModelSource, out: Path, name: str, tracking_uri: str | None) -> tuple[str, str]:
    """Log the export as artifacts of the training run (or a new run) and register it as a model version."""
    from orchestrator.inference.evaluate import find_or_create_run

    uri, run_id, created = find_or_create_run(source, tracking_uri, f"export {source.label}")
    artifact_path = f"export/{source.label.replace('/', '_')}"
    mlflow_runs.log_dir(uri, run_id, out, artifact_path)
    if created:
        mlflow_runs.terminate(uri, run_id, "FINISHED")
    tags = {"speechlm.model_type": source.entry.name, "speechlm.source": source.path}
    if source.step is not None:
        tags["speechlm.step"] = str(source.step)
    version = mlflow_runs.register_model_version(uri, name, run_id, artifact_path, tags)
    return uri, f"{name}/{version}"
