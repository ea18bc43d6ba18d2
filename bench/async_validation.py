"""Training step time while a validation runs: validation on the training ranks (before) against validation as a
Ray task of its own on the checkpoint (`trainer.async_validation`, after), side by side in one run.

Both runs train the demo SALM with the real driver (Ray Train worker, Ray Data, MLflow) for `--steps` steps and
validate once in the middle (step `--steps // 2`, `--val-batches` batches of the demo validation set) and once
at the end. Every step logs its loss to MLflow, whose timestamps give each step's wall time:

- before: the step after the validation includes it (the ranks stop training), so training stalls for the
  whole validation (and the checkpoint's save);
- after: the validation task starts once the checkpoint is reported and logs its metrics when done; the steps
  logged in between ran during the validation, on whatever CPUs (or GPU) the task left them. The step that saved
  the checkpoint is left out of both medians.

The figures: the median step outside validation, the step time during validation, and their ratio; and each
run's wall time from its first to its last training step. On a small CPU machine the validation task competes
with the worker and Ray Data for the same cores, so the steps during it slow down; on a GPU cluster it takes a
spare GPU and the steps do not.

    python bench/async_validation.py                   # demo SALM on data/demo (made if missing, 0.1 h)
    python bench/async_validation.py --steps 16 --val-batches 2 --small   # a quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
CONFIG = ROOT / "configs" / "demo" / "salm.yaml"


def ensure_demo(path: Path) -> Path:
    if not (path / "DONE.json").exists():
        from orchestrator.demo.assets import make_demo_assets

        make_demo_assets(path, hours=0.1, min_heldout_cuts=16, progress=False)
    return path


def run(demo: Path, run_dir: Path, args: argparse.Namespace, asynchronous: bool) -> dict:
    from mlflow import MlflowClient

    from orchestrator.config import load_experiment
    from orchestrator.testing import tiny_training_overrides
    from orchestrator.training.driver import run_training

    middle = args.steps // 2
    overrides = [
        f"model.pretrained_llm={demo}/llm",
        # The model these figures were first measured on: the demo encoder from random weights, everything training.
        "model.pretrained_asr=null",
        "model.freeze_params=[]",
        f"data.train_ds.input_cfg.0.shar_path={demo}/asr/train",
        f"data.validation_ds.input_cfg.0.shar_path={demo}/asr/val",
        "trainer.devices=1",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={middle}",
        "trainer.log_every_n_steps=1",
        f"trainer.limit_val_batches={args.val_batches}",
        "data.validation_ds.batch_size=8",
        f"trainer.async_validation={str(asynchronous).lower()}",
        f"exp_manager.explicit_log_dir={run_dir}",
    ]
    if args.small:  # the test-sized model: a check of the script, not a figure
        overrides = [*tiny_training_overrides(demo, run_dir, args.steps), *overrides]
    result = run_training(load_experiment(CONFIG, overrides).cfg)
    if not result.ok:
        raise SystemExit(f"training failed: {result.error}")
    client = MlflowClient(result.tracking_uri)
    steps = sorted((m.step, m.timestamp) for m in client.get_metric_history(result.mlflow_run_id, "loss"))
    validated = {m.step: m.timestamp for m in client.get_metric_history(result.mlflow_run_id, "val_loss")}
    times = dict(steps)
    intervals = {step: times[step] - times[step - 1] for step in times if step - 1 in times}  # ms, step k's own
    saving = middle + 1  # its interval holds the checkpoint's save (and, before, the whole validation)
    if asynchronous:  # steps logged between the checkpoint at `middle` and the validation's metrics
        during = {step for step in intervals if times[middle] < times[step] <= validated[middle] and step != saving}
    else:  # the ranks validate: the step after `middle` waits for it
        during = {saving}
    outside = [ms for step, ms in intervals.items() if step not in during and step != saving]
    return {
        "normal_ms": statistics.median(outside),
        "during_ms": statistics.median(intervals[step] for step in during) if during else float("nan"),
        "steps_during": len(during) if asynchronous else 0,
        "validation_ms": validated[middle] - times[middle],
        "wall_s": (times[args.steps] - times[1]) / 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="the tests' tiny model instead of the demo SALM")
    args = parser.parse_args()
    demo = ensure_demo(args.demo)
    with tempfile.TemporaryDirectory() as tmp:
        before = run(demo, Path(tmp) / "inline", args, asynchronous=False)
        after = run(demo, Path(tmp) / "async", args, asynchronous=True)
    print(
        f"\ndemo SALM{' (tiny)' if args.small else ''}, 1 CPU worker, {args.steps} steps, a validation of "
        f"{args.val_batches} batches at step {args.steps // 2}; load {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs\n"
    )
    print("| validation | step outside validation (ms) | step during validation (ms) | ratio | "
          "validation took (s) | steps trained during it | first to last step (s) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in (("on the training rank (before)", before), ("Ray task on the checkpoint (after)", after)):
        print(
            f"| {name} | {row['normal_ms']:.0f} | {row['during_ms']:.0f} | {row['during_ms'] / row['normal_ms']:.2f}x "
            f"| {row['validation_ms'] / 1000:.1f} | {row['steps_during']} | {row['wall_s']:.1f} |"
        )
    print(f"\nwall time after/before: {after['wall_s'] / before['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
