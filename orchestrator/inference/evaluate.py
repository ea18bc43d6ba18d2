"""`speechlm eval`: score a trained model on a Shar set, data-parallel on Ray, as validation scores it.

    Shar set -> the training pipeline's validation-style dataset (same collator, batching, filters; one row
    per batch, each cut once) -> Ray Data map_batches over an actor pool of model replicas (each runs
    `model.validation_step` under validation's precision) -> driver: manifest + metrics -> MLflow

Because batches, generation settings (validation_step's own) and scorers (`speech_models.metrics`) are
validation's, a checkpoint's eval WER on one of its validation sets equals the val_wer it reported (when
trainer.limit_val_batches did not cut validation short).

Metrics per set: wer (SALM); txt_bleu and, with a scoring ASR (--scoring-asr, else the checkpoint's
model.scoring_asr; transcribed by validation's own `orchestrator.inference.scoring_asr`), asr_bleu (duplex); loss and acc (teacher
forced); rtf = model seconds / audio seconds, summed over replicas (the time of validation_step: generation
plus one teacher-forced forward; scoring-ASR time is reported apart).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import pickle
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.config import DatasetConfig
from orchestrator.config.schema import InputConfig
from orchestrator.inference.sources import ModelSource, SourceError, describe, resolve_source
from orchestrator.redaction import redact
from orchestrator.storage import atomic
from orchestrator.storage.paths import absolute, is_url
from orchestrator.tracking import mlflow_runs
from speech_models.metrics import corpus_bleu
from speech_models.registry import ASR_BLEU, ModelEntry

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8  # when neither the checkpoint's validation set nor --batch-size says
EVAL_EXPERIMENT = "speechlm-eval"  # MLflow experiment for models without a training run (exports)
MANIFEST_FILE = "hypotheses.jsonl"
METRICS_FILE = "metrics.json"
SHOWN_EXAMPLES = 3  # (reference, hypothesis) pairs printed per set; every pair is in the manifest


# ----------------------------------------------------------------------------------------------
# Which data, batched how
# ----------------------------------------------------------------------------------------------


def _local_key(path: Any) -> Any:
    return absolute(path) if isinstance(path, str) else path


def _shar_paths(ds: DatasetConfig) -> list[Any]:
    paths = [entry.shar_path for entry in ds.input_cfg]
    return paths or [ds.shar_path]


def eval_dataset(source: ModelSource, data: str, batch_size: int | None = None) -> tuple[str, DatasetConfig]:
    """(set name, dataset config) for evaluating `source` on the Shar set `data`.

    A set that is one of the checkpoint's validation sets is read with that set's settings (name, prompt tags,
    batch size, filters), so its batches are validation's. Another set borrows the first validation set's
    settings with `data` as input. `batch_size` replaces the batching (no bucketing).
    """
    from orchestrator.data.plan import validation_sets

    if not is_url(data) and not Path(data).exists():
        raise SourceError(f"--data {data}: no such directory; give a Lhotse Shar directory or an fsspec URL")
    sets = validation_sets(source.data_cfg) if source.kind == "checkpoint" else {}
    target = _local_key(data)
    name, dataset = next(
        ((n, ds) for n, ds in sets.items() if [_local_key(p) for p in _shar_paths(ds)] == [target]), (None, None)
    )
    if dataset is None:
        prompt = source.prompt
        tags = {k: v for k, v in (("context", prompt.context), ("system_prompt", prompt.system_prompt)) if v}
        base = next(iter(sets.values())) if sets else DatasetConfig(batch_size=DEFAULT_BATCH_SIZE)
        if sets and base.input_cfg:
            tags = dict(base.input_cfg[0].tags)
        if sets:
            sample_rate = base.sample_rate
        elif source.kind == "checkpoint":
            sample_rate = source.data_cfg.train_ds.sample_rate
        else:
            sample_rate = int(source.data_cfg.source_sample_rate)  # an export's input rate
        dataset = dataclasses.replace(
            base,
            input_cfg=[InputConfig(shar_path=target, tags=tags)],  # absolute: Ray workers have their own cwd
            shar_path=None,
            shuffle=False,
            sample_rate=sample_rate,
            prompt_format=base.prompt_format or prompt.prompt_format,
        )
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data.rstrip("/").rpartition("/")[2]) or "eval"
    if batch_size is not None:
        dataset = dataclasses.replace(dataset, batch_size=batch_size, batch_duration=None, use_bucketing=False)
    elif dataset.batch_size is None and dataset.batch_duration is None:
        dataset = dataclasses.replace(dataset, batch_size=DEFAULT_BATCH_SIZE)
    return name, dataset


# ----------------------------------------------------------------------------------------------
# One model replica (a Ray Data actor): batch rows in, result rows out
# ----------------------------------------------------------------------------------------------


def score_batch(
    model: torch.nn.Module,
    autocast: Callable[[], contextlib.AbstractContextManager],
    batch: dict[str, Any],
    sample_rate: int,
    count_names: list[str],
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """validation_step on one collated batch, timed, with per-cut durations."""
    import torch

    from orchestrator.training.worker_io import to_device

    device = next(model.parameters()).device
    kwargs = {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    with torch.no_grad(), autocast():
        out = model.validation_step(to_device(batch, device), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    lens = batch["audio_lens"] if "audio_lens" in batch else batch["source_audio_lens"]
    return {
        "cut_ids": [str(c) for c in batch["cut_ids"]],
        "references": list(out["references"]),
        "hypotheses": list(out["hypotheses"]),
        "durations": [float(n) / sample_rate for n in np.asarray(lens).tolist()],
        "counts": {key: float(out.get(key, 0.0)) for key in count_names},
        "seconds": seconds,
        "generated_audio": out.get("generated_audio"),
    }


class EvalWorker:
    """Ray Data actor holding one model replica (and the scoring ASR, if any)."""

    def __init__(
        self,
        source: ModelSource,
        sample_rate: int,
        threads: int,
        use_gpu: bool,
        max_new_tokens: int | None,
        scoring_asr: str | None,
        keep_audio: bool,
    ) -> None:
        import torch

        from orchestrator.inference.scoring_asr import ScoringASR
        from orchestrator.inference.sources import load_model

        torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, self.autocast = load_model(source, device)
        self.count_names = source.entry.count_names()
        self.sample_rate = sample_rate
        self.target_sample_rate = int(source.data_cfg.target_sample_rate)
        self.max_new_tokens = max_new_tokens
        # Validation's own scorer (scoring_asr), so eval's asr_bleu is val_asr_bleu.
        self.scorer = ScoringASR(scoring_asr) if scoring_asr else None
        self.keep_audio = keep_audio

    def __call__(self, table: pa.Table) -> pa.Table:
        import pyarrow as pa

        from orchestrator.data.read_task import read_row

        results = []
        for i in range(table.num_rows):
            batch_buf, meta = read_row(table, i)
            result: dict[str, Any] = {"counters": dict(meta.counters)}
            if not meta.marker:
                batch = pickle.loads(batch_buf)
                result.update(
                    score_batch(
                        self.model, self.autocast, batch, self.sample_rate, self.count_names, self.max_new_tokens
                    )
                )
                result["audio_seconds"] = float(meta.audio_seconds)
                result.update(self._speech(result.pop("generated_audio")))
            results.append(pickle.dumps(result))
        return pa.table({"result": pa.array(results, type=pa.binary())})

    def _speech(self, audio: list[np.ndarray] | None) -> dict[str, Any]:
        """ASR transcripts of the generated agent speech, and the speech itself as WAV bytes if asked."""
        if audio is None:
            return {}
        out: dict[str, Any] = {}
        if self.scorer is not None:
            began = time.perf_counter()
            out["asr_hypotheses"] = self.scorer.transcribe(list(audio), self.target_sample_rate)
            out["scoring_seconds"] = time.perf_counter() - began
        if self.keep_audio:
            import soundfile as sf

            wavs = []
            for wave in audio:
                buf = io.BytesIO()
                sf.write(buf, np.clip(wave, -1.0, 1.0), self.target_sample_rate, format="WAV", subtype="PCM_16")
                wavs.append(buf.getvalue())
            out["wavs"] = wavs
        return out


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


@dataclass
class SetResult:
    """One evaluated set: its metrics and where its manifest is."""

    name: str
    data: str
    metrics: dict[str, float]
    manifest: str
    counters: dict[str, int] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)  # what validation reported for this set, if any
    examples: list[tuple[str, str]] = field(default_factory=list)  # a few (reference, hypothesis) pairs, to read


@dataclass
class EvalReport:
    source: ModelSource
    sets: list[SetResult]
    out_dir: str
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


def _combine(
    results: list[dict[str, Any]], entry: ModelEntry, num_workers: int, wall: float
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, int]]:
    """Metrics and manifest rows (sorted by cut id) from the workers' per-batch results."""
    rows, counters = [], Counter()
    sums, counts = Counter(), Counter()
    for r in results:
        counters.update(r["counters"])
        if "cut_ids" not in r:
            continue
        counts.update(r["counts"])
        for key in ("seconds", "audio_seconds", "scoring_seconds"):
            sums[key] += r.get(key, 0.0)
        for i, cut_id in enumerate(r["cut_ids"]):
            row = {
                "cut_id": cut_id,
                "duration": round(r["durations"][i], 4),
                "reference": r["references"][i],
                "hypothesis": r["hypotheses"][i],
            }
            if "asr_hypotheses" in r:
                row["asr_hypothesis"] = r["asr_hypotheses"][i]
            if "wavs" in r:
                row["_wav"] = r["wavs"][i]
            rows.append(row)
    rows.sort(key=lambda row: row["cut_id"])
    duplicates = [c for c, n in Counter(row["cut_id"] for row in rows).items() if n > 1]
    if duplicates:
        logger.warning(
            "%d cut ids occur more than once (e.g. %s); each occurrence is scored", len(duplicates), duplicates[:3]
        )
    hyps, refs = [row["hypothesis"] for row in rows], [row["reference"] for row in rows]
    metrics: dict[str, float] = {"num_cuts": float(len(rows))}
    totals = {name: float(counts.get(name, 0.0)) for name in entry.count_names()}
    for metric in entry.metrics:  # a text score of an empty set is reported too (0), where validation skips it
        metrics[metric.name] = metric.score(hyps, refs) if metric.score else metric.value(totals, hyps, refs)
    if entry.speaks and rows and all("asr_hypothesis" in row for row in rows):
        metrics[ASR_BLEU.name] = corpus_bleu([row["asr_hypothesis"] for row in rows], refs)
        metrics["scoring_seconds"] = sums["scoring_seconds"]
    metrics["audio_seconds"] = sums["audio_seconds"]
    metrics["model_seconds"] = sums["seconds"]
    metrics["rtf"] = sums["seconds"] / sums["audio_seconds"] if sums["audio_seconds"] else math.nan
    metrics["wall_seconds"] = wall
    metrics["num_workers"] = float(num_workers)
    return metrics, rows, dict(counters)


def _default_workers(use_gpu: bool) -> int:
    import ray

    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) // 4)  # leave cores for decoding and the driver


def _root_cause(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError -> its cause; chained exceptions)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def run_set(
    source: ModelSource,
    name: str,
    dataset: DatasetConfig,
    *,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    max_new_tokens: int | None,
    scoring_asr: str | None,
    keep_audio: bool,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, int]]:
    """Evaluate one set on the Ray cluster: (metrics, manifest rows, data counters)."""
    import ray.data

    from orchestrator.data.datasets import build_dataset
    from orchestrator.data.plan import plan_dataset

    collator = source.entry.build_collator(source.model_cfg, source.data_cfg, dataset)
    plan = plan_dataset(f"eval_{name}", dataset, source.data_cfg, collator, epochs=1, equal_split=False)
    # Read tasks reserve no CPU (as validation's): the replicas may hold every core, and decoding is light.
    rows = build_dataset(plan, cpus_per_task=0).map_batches(
        EvalWorker,
        fn_constructor_kwargs={
            "source": source,
            "sample_rate": plan.inputs[0].sample_rate,
            "threads": max(1, int(cpus_per_worker)),
            "use_gpu": use_gpu,
            "max_new_tokens": max_new_tokens,
            "scoring_asr": scoring_asr,
            "keep_audio": keep_audio,
        },
        batch_size=1,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=cpus_per_worker,
        num_gpus=1 if use_gpu else 0,
    )
    began = time.perf_counter()
    try:
        results = [pickle.loads(row["result"]) for row in rows.iter_rows()]
    except Exception as exc:
        cause = _root_cause(exc)
        if isinstance(cause, (SourceError, FileNotFoundError, OSError)):
            raise SourceError(str(cause)) from exc
        raise
    return _combine(results, source.entry, num_workers, time.perf_counter() - began)


def _write_outputs(out: Path, name: str, data: str, source: ModelSource, metrics: dict, rows: list) -> Path:
    set_dir = out / name
    set_dir.mkdir(parents=True, exist_ok=True)
    manifest = set_dir / MANIFEST_FILE
    lines = []
    for row in rows:
        wav = row.pop("_wav", None)
        if wav is not None:
            path = set_dir / "audio" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', row['cut_id'])}.wav"
            atomic.write_bytes(path, wav)
            row["audio"] = str(path.relative_to(set_dir))
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic.write_text(manifest, "".join(lines))  # never a half-written manifest beside a finished one
    info = {
        "model": source.path,
        "kind": source.kind,
        "step": source.step,
        "data": data,
        "set": name,
        "metrics": metrics,
    }
    atomic.write_text(set_dir / METRICS_FILE, json.dumps(info, indent=2) + "\n")
    return manifest


def default_out_dir(source: ModelSource) -> Path:
    """<run dir>/eval/<checkpoint> for local checkpoints (beside the step=... dirs, never inside them),
    else ./eval/<model dir name>."""
    if source.kind == "checkpoint" and not is_url(source.path):
        return Path(source.run_dir) / "eval" / Path(source.path).name
    return Path("eval") / source.label.replace("/", "_")


def evaluate(
    model: str | ModelSource,
    data: Sequence[str],
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1.0,
    use_gpu: bool | None = None,
    out_dir: str | Path | None = None,
    which: str = "best",
    overrides: Sequence[str] = (),
    max_new_tokens: int | None = None,
    scoring_asr: str | None = None,
    save_audio: bool = False,
    mlflow: bool = True,
    tracking_uri: str | None = None,
) -> EvalReport:
    """Evaluate a checkpoint / run dir / exported model on each Shar set in `data` (see the module docstring)."""
    import ray
    import ray.data

    from orchestrator.training.driver import connect_ray

    source = model if isinstance(model, ModelSource) else resolve_source(model, which, overrides)
    entry = source.entry
    if not entry.speaks and (scoring_asr or save_audio):
        raise SourceError(
            f"--scoring-asr and --save-audio are for models that speak (duplex); a {entry.name} model is scored "
            "on its text"
        )
    if not entry.transcribes and max_new_tokens is not None:
        raise SourceError(
            f"--max-new-tokens is for models that generate text from a prompt (SALM); a {entry.name} model "
            "generates one step per 80 ms input frame"
        )
    if entry.speaks and scoring_asr is None:
        scoring_asr = source.model_cfg.scoring_asr  # what validation scored ASR-BLEU with, if anything
    datasets = [eval_dataset(source, d, batch_size) for d in data]
    names = [n for n, _ in datasets]
    for i, (n, ds) in enumerate(datasets):  # the same name twice (two dirs called "val"): number them
        if names.count(n) > 1:
            datasets[i] = (f"{n}_{i}", ds)

    connect_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    workers = num_workers or _default_workers(use_gpu)
    out = Path(out_dir) if out_dir else default_out_dir(source)
    print(
        f"evaluating {describe(source)}\n  on {workers} replica(s) ({'1 GPU' if use_gpu else f'{cpus_per_worker:g} CPU'} "
        f"each); outputs in {out}",
        flush=True,
    )
    sets = []
    for (name, dataset), path in zip(datasets, data, strict=True):
        metrics, rows, counters = run_set(
            source,
            name,
            dataset,
            num_workers=workers,
            cpus_per_worker=cpus_per_worker,
            use_gpu=use_gpu,
            max_new_tokens=max_new_tokens,
            scoring_asr=scoring_asr,
            keep_audio=save_audio,
        )
        examples = [(row["reference"], row["hypothesis"]) for row in rows[:SHOWN_EXAMPLES]]
        manifest = _write_outputs(out, name, path, source, metrics, rows)
        validation = {k: v for k, v in source.metrics.items() if k.endswith(f"_{name}") and k.startswith("val_")}
        sets.append(SetResult(name, path, metrics, str(manifest), counters, validation, examples))
    report = EvalReport(source, sets, str(out))
    if mlflow:
        report.tracking_uri, report.mlflow_run_id = log_to_mlflow(report, tracking_uri)
    print(format_report(report), flush=True)
    return report


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def _metric_line(metrics: dict[str, float]) -> str:
    keys = [k for k in ("wer", "txt_bleu", "asr_bleu", "loss", "acc") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def format_report(report: EvalReport) -> str:
    lines = ["", "=" * 80]
    limit = report.source.experiment.trainer.limit_val_batches if report.source.experiment else None
    for s in report.sets:
        m = s.metrics
        lines.append(f"{s.name}: {int(m['num_cuts'])} cuts from {s.data}")
        lines.append(f"  {_metric_line(m)}")
        for key in ("wer", "txt_bleu"):
            reported = s.validation.get(f"val_{key}_{s.name}")
            if key in m and reported is not None:
                note = f" (validation ran at most {limit} batches per worker)" if limit else ""
                lines.append(f"  validation at step {report.source.step}: val_{key}_{s.name} {reported:.4f}{note}")
        lines.append(
            f"  rtf {m['rtf']:.4f} ({m['model_seconds']:.1f} s of model time for {m['audio_seconds']:.1f} s of audio, "
            f"{int(m['num_workers'])} replica(s)); wall {m['wall_seconds']:.1f} s"
        )
        dropped = {
            k: v
            for k, v in s.counters.items()
            if k in ("too_short", "too_long", "empty_text", "unreadable_cuts", "corrupt_shards") and v
        }
        if dropped:
            lines.append(f"  not scored: {dropped} (the set's duration/text filters, as in validation)")
        for reference, hypothesis in s.examples:
            lines.append(f"  reference:  {reference}")
            lines.append(f"  hypothesis: {hypothesis}")
        lines.append(f"  manifest: {s.manifest}")
    if report.mlflow_run_id:
        lines.append(f"MLflow run {report.mlflow_run_id} at {redact(report.tracking_uri or '')}")
    lines.append("=" * 80)
    return "\n".join(lines)


def _mlflow_target(source: ModelSource, tracking_uri: str | None) -> tuple[str, str]:
    if source.experiment is not None:
        exp = source.experiment.exp_manager
        return tracking_uri or mlflow_runs.tracking_uri_for(exp, source.run_dir), mlflow_runs.experiment_name_for(exp)
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow_runs.default_tracking_uri(), EVAL_EXPERIMENT


def find_or_create_run(source: ModelSource, tracking_uri: str | None, run_name: str) -> tuple[str, str, bool]:
    """(tracking uri, run id, created): the training run of `source` (tag speechlm.run_dir, in any experiment of
    the store), else a new run in the run's experiment (exports: "speechlm-eval").

    A found run keeps its status (eval never marks a training run RUNNING or FINISHED); a created one is
    tagged speechlm.eval_of and left for the caller to terminate.
    """
    uri, experiment_name = _mlflow_target(source, tracking_uri)
    if source.run_dir:
        found = mlflow_runs.find_runs(uri, {mlflow_runs.RUN_DIR_TAG: source.run_dir}, max_results=1)
        if found:
            return uri, found[0].run_id, False
    tags = {"speechlm.eval_of": source.path, "speechlm.model_type": source.entry.name}
    return uri, mlflow_runs.create_run(uri, experiment_name, run_name, tags), True


def log_to_mlflow(report: EvalReport, tracking_uri: str | None = None) -> tuple[str, str]:
    """Metrics `eval_<metric>_<set>` at the checkpoint's step, manifests and metrics.json as artifacts."""
    source = report.source
    uri, run_id, created = find_or_create_run(source, tracking_uri, f"eval {source.label}")
    metrics = {f"eval_{key}_{s.name}": value for s in report.sets for key, value in s.metrics.items()}
    mlflow_runs.log_metrics(uri, run_id, metrics, step=source.step or 0)
    for s in report.sets:
        label = source.label.replace("/", "_")
        mlflow_runs.log_dir(uri, run_id, Path(s.manifest).parent, f"eval/{label}/{s.name}")
    if created:
        mlflow_runs.terminate(uri, run_id, "FINISHED")
    return uri, run_id
