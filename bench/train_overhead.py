"""Orchestration overhead of `speechlm train`, measured side by side in one run:

(b) median optimizer-step time of the demo SALM inside a Ray Train worker (the real `run_training`: Train
    controller and worker, Ray Data iterator, progress lines, MLflow metrics) vs the same model, optimizer and
    batches in a bare single-process PyTorch loop with the same thread count. Both take the same batches, made
    by the real pipeline and held in Ray's object store before timing, so the ratio is what Ray Train adds and
    not what decoding audio next to training costs; that cost is the second figure: the worker on the live Shar
    stream (audio decoded in Ray Data tasks while it trains) against the bare loop.
(d) seconds from invoking `python -m orchestrator train` to its first optimizer step (first progress line).

    python bench/train_overhead.py                # demo SALM config on data/demo (made if missing, 0.1 h)
    python bench/train_overhead.py --steps 60 --repeats 3
    python bench/train_overhead.py --inprocess-stream 150   # also: a bare loop running Ray Data in-process
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CONFIG = ROOT / "configs" / "demo" / "salm.yaml"


def overrides(demo: Path, run_dir: Path, steps: int, log_every: int) -> list[str]:
    return [
        f"model.pretrained_llm={demo}/llm",
        # The model these figures were first measured on: the demo encoder from random weights, everything training.
        "model.pretrained_asr=null",
        "model.freeze_params=[]",
        f"data.train_ds.input_cfg.0.shar_path={demo}/asr/train",
        f"data.validation_ds.input_cfg.0.shar_path={demo}/asr/val",
        "trainer.devices=1",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"trainer.log_every_n_steps={log_every}",
        "trainer.limit_val_batches=1",
        "data.train_ds.batch_duration=30",
        f"exp_manager.explicit_log_dir={run_dir}",
    ]


def ensure_demo(path: Path) -> Path:
    if not (path / "DONE.json").exists():
        from orchestrator.demo.assets import make_demo_assets

        make_demo_assets(path, hours=0.1, min_heldout_cuts=16, progress=False)
    return path


def time_to_first_step(demo: Path, tmp: Path) -> float:
    """Wall seconds from process start to the first 'step 1/' progress line of a real CLI run."""
    command = [sys.executable, "-m", "orchestrator", "train", str(CONFIG), *overrides(demo, tmp / "first", 2, 1)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    first = None
    for line in proc.stdout:
        if first is None and "step 1/" in line:
            first = time.perf_counter() - started
    proc.wait()
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"the CLI run failed (exit {proc.returncode}) or printed no step line")
    return first


def live_train_dataset(demo: Path, steps: int):
    """The run's training stream as `run_training` builds it: Ray Data read tasks decoding the demo Shar."""
    from orchestrator.config import load_experiment
    from orchestrator.data.datasets import build_datasets
    from orchestrator.data.plan import TRAIN
    from speech_models.registry import build_collator

    cfg = load_experiment(CONFIG, overrides(demo, Path(tempfile.mkdtemp()), steps, 10)).cfg
    return build_datasets(cfg.data, build_collator(cfg.model, cfg.data, cfg.data.train_ds), None)[TRAIN]


def preload_train_rows(demo: Path, steps: int):
    """The first batches of the real training pipeline, materialized in Ray's object store (one row per batch,
    as the pipeline emits them), so both loops below take exactly the same batches with no decoding left."""
    rows = live_train_dataset(demo, steps).limit(steps).materialize()
    if rows.count() < steps:  # the training stream has no marker rows: one row is one batch
        raise RuntimeError(f"the demo data gave {rows.count()} batches, fewer than --steps {steps}")
    return rows


def ray_step_times(demo: Path, tmp: Path, steps: int, train_rows=None) -> tuple[list[float], int]:
    """Per-step wall times (ms) reported by the Ray Train worker, warm-up interval dropped; and its threads.

    train_rows: a materialized dataset that replaces the live Shar stream as the run's "train" dataset (the
    rest of `run_training` is unchanged); None trains on the live stream, decoding audio as it goes.
    """
    from mlflow import MlflowClient

    from orchestrator.config import load_experiment
    from orchestrator.data import datasets
    from orchestrator.data.plan import TRAIN
    from orchestrator.training.driver import run_training
    from orchestrator.training.resources import plan_resources

    build_datasets = datasets.build_datasets
    replaced: list = []  # the real train dataset holds the handle of its resume board: kept, the board lives

    def with_preloaded_train(*args, **kwargs):
        built = build_datasets(*args, **kwargs)
        replaced.append(built[TRAIN])
        return {**built, TRAIN: train_rows}

    run_dir = tmp / ("ray_stream" if train_rows is None else "ray_preloaded")
    cfg = load_experiment(CONFIG, overrides(demo, run_dir, steps, 10)).cfg
    swap = (
        contextlib.nullcontext()
        if train_rows is None
        else mock.patch.object(datasets, "build_datasets", with_preloaded_train)
    )
    with swap:
        result = run_training(cfg)
    if not result.ok:
        raise RuntimeError(result.error)
    import ray

    threads = plan_resources(cfg, ray.cluster_resources()).threads_per_worker
    history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "step_time_ms")
    return [m.value for m in sorted(history, key=lambda m: m.step)][1:], threads


def bare_step_times(demo: Path, steps: int, threads: int, train_rows=None) -> list[float]:
    """The same model and batches in a plain PyTorch loop, 10-step interval means with the first dropped.

    train_rows: the materialized rows the worker got, fetched into this process before timing; each step still
    unpickles its batch from its row as the worker does. None: a Ray Data stream executed inside this process
    (`--inprocess-stream`); see bench/README.md for why that is no baseline for long runs.
    """
    import torch

    from orchestrator.config import load_experiment
    from orchestrator.config.targets import instantiate
    from orchestrator.data.stream import iterate_batches
    from orchestrator.training.worker_io import keep_freed_memory_in_heap, to_device
    from speech_models.registry import build_model

    cfg = load_experiment(CONFIG, overrides(demo, Path(tempfile.mkdtemp()), steps, 10)).cfg
    if train_rows is None:
        source = live_train_dataset(demo, steps)
    else:
        source = list(train_rows.iter_batches(batch_size=None, batch_format="pyarrow"))
    batches = (batch for batch, _ in iterate_batches(source))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.trainer.seed)
    keep_freed_memory_in_heap()  # the Ray worker does the same on CPU
    model = build_model(cfg.model, cfg.data)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.model.optimizer, params)
    scheduler = instantiate(cfg.model.lr_scheduler, optimizer)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        batch = next(batches)
        model(to_device(batch, torch.device("cpu")))["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(1000 * (time.perf_counter() - started))
    batches.close()  # an in-process stream stops its executor here
    # Like the Ray side (its step_time_ms): means over 10-step intervals, the first (warm-up) interval dropped.
    return [statistics.fmean(times[i : i + 10]) for i in range(10, len(times) - 9, 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1, help="measure the loops this many times in turn")
    parser.add_argument("--demo", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument(
        "--inprocess-stream",
        type=int,
        default=0,
        metavar="STEPS",
        help="also time STEPS steps of a bare loop that runs the Ray Data stream in its own process",
    )
    args = parser.parse_args()
    demo = ensure_demo(args.demo if (args.demo / "DONE.json").exists() else ROOT / "data" / "bench" / "demo")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # as `speechlm train` does
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first_step = time_to_first_step(demo, Path(tmp))
        for repeat in range(args.repeats):
            train_rows = preload_train_rows(demo, args.steps)
            worker, threads = ray_step_times(demo, Path(tmp) / str(repeat), args.steps, train_rows)
            bare = bare_step_times(demo, args.steps, threads, train_rows)
            live, _ = ray_step_times(demo, Path(tmp) / str(repeat), args.steps)
            rows.append(tuple(statistics.median(t) for t in (worker, bare, live)))
            del train_rows
        inprocess = bare_step_times(demo, args.inprocess_stream, threads) if args.inprocess_stream else None
    print(f"demo SALM, 1 worker, {threads} thread(s), batch_duration 30 s, {args.steps} steps, {os.cpu_count()} CPUs")
    print("step time in ms (median of 10-step interval means, warm-up interval dropped; data wait included):")
    print("  repeat | Ray Train worker | bare loop | (b) worker/bare | worker, live Shar decoding | live/bare")
    for i, (worker_ms, bare_ms, live_ms) in enumerate(rows):
        print(
            f"  {i + 1:6d} | {worker_ms:16.0f} | {bare_ms:9.0f} | {worker_ms / bare_ms:15.3f} | "
            f"{live_ms:26.0f} | {live_ms / bare_ms:.3f}"
        )
    ratios = [w / b for w, b, _ in rows]
    print(f"(b) Ray Train worker / bare loop, same batches: median {statistics.median(ratios):.3f} (target <= 1.05)")
    print(
        f"    decoding audio next to training (live / bare): median {statistics.median(v / b for _, b, v in rows):.3f}"
    )
    if inprocess is not None:
        print(
            "    bare loop running Ray Data in-process, 10-step means after the first:", [round(t) for t in inprocess]
        )
    print(f"(d) `python -m orchestrator train` to first optimizer step: {first_step:.1f} s")


if __name__ == "__main__":
    main()
