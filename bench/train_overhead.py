"""Orchestration overhead of `speechlm train`, measured side by side in one run:

(b) median optimizer-step time inside a Ray Train worker (1 worker, data streamed by Ray Data, metrics to
    MLflow) vs the same model, optimizer and batches in a bare single-process PyTorch loop with the same
    thread count, fed by the same Ray Data stream (the target) and from preloaded batches (for reference);
(d) seconds from invoking `python -m orchestrator train` to its first optimizer step (first progress line).

    python bench/train_overhead.py            # demo SALM config on data/demo (made if missing, 0.1 h)
    python bench/train_overhead.py --steps 80
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CONFIG = ROOT / "configs" / "demo" / "salm.yaml"


def overrides(demo: Path, run_dir: Path, steps: int, log_every: int) -> list[str]:
    return [
        f"model.pretrained_llm={demo}/llm",
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
        from orchestrator.data.demo import make_demo_assets

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


def ray_step_times(demo: Path, tmp: Path, steps: int) -> tuple[list[float], int]:
    """Per-step wall times (ms) reported by the Ray Train worker, warm-up interval dropped; and its threads."""
    from mlflow import MlflowClient

    from orchestrator.config import load_experiment
    from orchestrator.train import plan_resources, run_training

    run_dir = tmp / "ray"
    cfg = load_experiment(CONFIG, overrides(demo, run_dir, steps, 10)).cfg
    result = run_training(cfg)
    if not result.ok:
        raise RuntimeError(result.error)
    import ray

    threads = plan_resources(cfg, ray.cluster_resources()).threads_per_worker
    history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "step_time_ms")
    return [m.value for m in sorted(history, key=lambda m: m.step)][1:], threads


def bare_step_times(demo: Path, steps: int, threads: int, streaming: bool) -> list[float]:
    """The same model and batches in a plain PyTorch loop, 10-step interval means with the first dropped.

    streaming=False: batches from the same pipeline, preloaded before timing (the pure compute loop).
    streaming=True: batches pulled from the same Ray Data pipeline inside the timed loop, as the worker does:
    the difference to the preloaded loop is what decoding audio next to training costs on this machine,
    the difference to the Ray Train worker is what Ray Train itself adds.
    """
    import torch

    from orchestrator.config import load_experiment
    from orchestrator.config.targets import instantiate
    from orchestrator.data.pipeline import build_datasets, iterate_batches
    from orchestrator.worker_io import keep_freed_memory_in_heap, to_device
    from speech_models.registry import build_collator, build_model

    cfg = load_experiment(CONFIG, overrides(demo, Path(tempfile.mkdtemp()), steps, 10)).cfg
    collator = build_collator(cfg.model, cfg.data, cfg.data.train_ds)
    stream = (batch for batch, _ in iterate_batches(build_datasets(cfg.data, collator, None)["train"]))
    batches = stream if streaming else [next(stream) for _ in range(steps)]
    if not streaming:
        stream.close()  # stop the Ray Data executor: it would keep decoding the rest of the epoch during timing
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.trainer.seed)
    keep_freed_memory_in_heap()  # the Ray worker does the same on CPU
    model = build_model(cfg.model, cfg.data)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.model.optimizer, params)
    scheduler = instantiate(cfg.model.lr_scheduler, optimizer)
    times = []
    batch_iter = iter(batches)
    for _ in range(steps):
        started = time.perf_counter()
        batch = next(batch_iter)
        model(to_device(batch, torch.device("cpu")))["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(1000 * (time.perf_counter() - started))
    # Like the Ray side (its step_time_ms): means over 10-step intervals, the first (warm-up) interval dropped.
    return [statistics.fmean(times[i : i + 10]) for i in range(10, len(times) - 9, 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1, help="measure the three loops this many times in turn")
    parser.add_argument("--demo", type=Path, default=ROOT / "data" / "demo")
    args = parser.parse_args()
    demo = ensure_demo(args.demo if (args.demo / "DONE.json").exists() else ROOT / "data" / "bench" / "demo")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first_step = time_to_first_step(demo, Path(tmp))
        for repeat in range(args.repeats):
            ray_times, threads = ray_step_times(demo, Path(tmp) / str(repeat), args.steps)
            streamed = bare_step_times(demo, args.steps, threads, streaming=True)
            preloaded = bare_step_times(demo, args.steps, threads, streaming=False)
            rows.append(tuple(statistics.median(t) for t in (ray_times, streamed, preloaded)))
    print(f"demo SALM, 1 worker, {threads} thread(s), batch_duration 30 s, {args.steps} steps, {os.cpu_count()} CPUs")
    print("step time in ms (median of 10-step interval means, warm-up interval dropped; data wait included):")
    print(
        "  repeat | Ray Train worker | bare loop, same stream | bare loop, preloaded | (b) worker/stream | worker/preloaded"
    )
    for i, (ray_ms, streamed_ms, bare_ms) in enumerate(rows):
        print(
            f"  {i + 1:6d} | {ray_ms:16.0f} | {streamed_ms:22.0f} | {bare_ms:20.0f} | {ray_ms / streamed_ms:17.3f} | "
            f"{ray_ms / bare_ms:.3f}"
        )
    ratios = [r / s for r, s, _ in rows]
    print(
        f"(b) Ray Train worker / bare loop on the same stream: median {statistics.median(ratios):.3f} (target <= 1.05)"
    )
    print(
        f"    decoding next to training (stream / preloaded): median {statistics.median(s / b for _, s, b in rows):.3f}"
    )
    print(f"(d) `python -m orchestrator train` to first optimizer step: {first_step:.1f} s")


if __name__ == "__main__":
    main()
