"""`speechlm export`: a checkpoint -> a self-contained Hugging Face-style directory (`speech_models.pretrained`).

    checkpoint (or run dir) -> model in fp32 -> [--merge-lora: merge adapters, check logits on a probe batch]
    -> save_pretrained(DIR) -> reload DIR with from_pretrained, check its logits again -> [--register: MLflow]

Both checks run the same probe batch (fixed random audio, plus a short prompt for SALM) through the model up
to the logits (text logits and, for duplex models, audio logits with their codes input), and fail the export
when the largest difference exceeds atol + rtol * max|logit|.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.infer import ModelSource, SourceError, frames_of, input_sample_rate, load_model, resolve_source

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


class ExportCheckError(RuntimeError):
    """Merged and unmerged (or saved and reloaded) logits disagree beyond the tolerance."""


@dataclass
class ExportResult:
    out_dir: str
    model_type: str
    merged_lora: bool
    merge_max_diff: float | None  # max |logit| difference, merged vs unmerged LoRA
    reload_max_diff: float | None  # max |logit| difference, reloaded export vs the model that was saved
    registered: str | None = None  # "name/version" in the MLflow model registry
    tracking_uri: str | None = None


# ----------------------------------------------------------------------------------------------
# Probe batch and logits
# ----------------------------------------------------------------------------------------------


def make_probe(model: torch.nn.Module, source: ModelSource, seed: int = 0) -> dict[str, Any]:
    """Two utterances of fixed random audio (1.0 s and 0.7 s, so padding is exercised) at the input rate."""
    rate = input_sample_rate(model)
    rng = np.random.default_rng(seed)
    audios = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (rate, rate * 7 // 10)]
    if source.model_type == "salm":
        from orchestrator.infer import salm_collator

        collator = salm_collator(source)
        collator._tokenizer = model.tokenizer
        texts = ["the quick brown fox", "hello"]
        return collator(
            [{"id": f"probe{i}", "audio": a, "text": t} for i, (a, t) in enumerate(zip(audios, texts, strict=True))]
        )
    lens = np.array([len(a) for a in audios], dtype=np.int64)
    signal = np.zeros((len(audios), int(lens.max())), dtype=np.float32)  # (B, T)
    for row, a in enumerate(audios):
        signal[row, : len(a)] = a
    return {"source_audio": signal, "source_audio_lens": lens}


@torch.no_grad()
def probe_logits(model: torch.nn.Module, probe: dict[str, Any]) -> torch.Tensor:
    """Logits of the probe batch, flattened: SALM's LM logits over the spliced prompt + answer; for duplex
    models the text logits and the audio logits of every frame (fed PAD text and delay codes)."""
    from speech_models.pretrained import causal_lm

    model.eval()
    if "input_ids" in probe:  # SALM
        inputs = model.prepare_inputs(probe)
        out = causal_lm(model)(
            inputs_embeds=inputs["input_embeds"],
            attention_mask=inputs["attention_mask"].long(),
            position_ids=inputs["position_ids"],
            use_cache=False,
        )
        keep = inputs["attention_mask"]  # (B, L): left padding has no defined logits to compare
        return out.logits[keep].float().flatten()
    from speech_models.duplex_data import num_frames

    device = model.device
    signal = torch.as_tensor(probe["source_audio"], device=device)
    lens = torch.as_tensor(probe["source_audio_lens"], device=device)
    n = num_frames(signal.shape[1], model.source_sample_rate, model.frame_length)
    source, _ = model._encode_source(signal, lens, n)  # (B, n, H)
    B = signal.shape[0]
    prev_text = torch.full((B, n), model.text_pad_id, dtype=torch.long, device=device)
    prev_codes = torch.full((B, n, model.num_codebooks), model.speech_delay_id, dtype=torch.long, device=device)
    hidden, _ = model._llm_hidden(model._frame_inputs(source, prev_text, prev_codes))  # (B, n, H)
    mask = torch.ones(B, n, dtype=torch.bool, device=device)
    text = model._lm_head(hidden)  # (B, n, V)
    audio = model._audio_logits(hidden, prev_codes, mask)  # (B * n, K, V_audio)
    return torch.cat([text.float().flatten(), audio.float().flatten()])


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
    merge_lora: bool = False,
    which: str = "best",
    overrides: Sequence[str] = (),
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    register: str | None = None,
    tracking_uri: str | None = None,
) -> ExportResult:
    """Write the model of a checkpoint (or a run dir's best / latest one) as a self-contained directory."""
    from speech_models import pretrained

    source = model if isinstance(model, ModelSource) else resolve_source(model, which, overrides)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise SourceError(f"--out {out} exists and is not empty; pick a new directory or remove it")
    # fp32 whatever the training precision: the export is the reference copy; cast when deploying.
    net, _ = load_model(source, "cpu", apply_precision=False)
    probe = make_probe(net, source) if (verify or merge_lora) else None
    merged, merge_diff = False, None
    if merge_lora:
        if not pretrained.has_lora(net):
            raise SourceError(f"--merge-lora: {source.path} has no LoRA adapters (model.lora is null)")
        before = probe_logits(net, probe)
        merged = pretrained.merge_lora(net)
        merge_diff = compare_logits(before, probe_logits(net, probe), atol, rtol, "merged vs unmerged LoRA")
    pretrained.save_pretrained(net, out, prompt=source.prompt, data=frames_of(source))
    reload_diff = None
    if verify:
        reloaded = pretrained.from_pretrained(out)
        reload_diff = compare_logits(
            probe_logits(net, probe), probe_logits(reloaded, probe), atol, rtol, f"export {out} reloaded vs saved model"
        )
    result = ExportResult(str(out), source.model_type, merged, merge_diff, reload_diff)
    if register:
        result.tracking_uri, result.registered = register_model(source, out, register, tracking_uri)
    return result


def register_model(source: ModelSource, out: Path, name: str, tracking_uri: str | None) -> tuple[str, str]:
    """Log the export as artifacts of the training run (or a new run) and register it as a model version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from orchestrator.evaluate import find_or_create_run

    uri, run_id, created = find_or_create_run(source, tracking_uri, f"export {source.label}")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    artifact_path = f"export/{source.label.replace('/', '_')}"
    client.log_artifacts(run_id, str(out), artifact_path)
    if created:
        client.set_terminated(run_id, "FINISHED")
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    tags = {"speechlm.model_type": source.model_type, "speechlm.source": source.path}
    if source.step is not None:
        tags["speechlm.step"] = str(source.step)
    version = client.create_model_version(
        name, source=f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}", run_id=run_id, tags=tags
    )
    return uri, f"{name}/{version.version}"
