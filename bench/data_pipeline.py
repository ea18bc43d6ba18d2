"""Data pipeline throughput and padding, measured side by side in one run.

(a) ours: `orchestrator.data` (Ray Data read tasks: read shard, bucket, decode, pad) iterated to the
    end of `--epochs` epochs on the driver.
(b) lhotse: `CutSet.from_shar` + `DynamicBucketingSampler` + a torch DataLoader over `IterableDatasetWrapper`
    whose dataset loads and pads the audio, with as many worker processes as CPUs (lhotse's recommended
    setup for Shar: every worker reads its own shards).
(c) padding fraction of bucketed batches vs fixed-size batches (same mean batch size) on the same cuts.

Both pipelines read the same shards, decode the same FLAC, pad to (B, T) float32 and use the same number of
processes. Figures are audio-seconds per wall-second from building the pipeline to its last batch, after one
untimed warm-up run of each (Ray worker processes and imports happen once per training run, not per epoch).

    python bench/data_pipeline.py                 # demo ASR train split (0.5 h), else synthetic tones
    python bench/data_pipeline.py --synthetic --hours 0.5 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from orchestrator.data.bucketing import BatchingSpec, DurationBucketer, padding_fraction  # noqa: E402


def demo_shards(cache: Path, hours: float) -> Path | None:
    """The demo generator's ASR train split, if that module is available and works here."""
    try:
        from orchestrator.demo.assets import make_demo_assets
    except ImportError:
        return None
    out = cache / f"demo-{hours:g}h"
    try:
        make_demo_assets(out, hours=hours, s2s_hours=0.01, progress=False)
    except Exception as exc:  # fall back to synthetic tones, say why
        print(f"demo data unavailable ({type(exc).__name__}: {exc}); using synthetic shards")
        return None
    return out / "asr" / "train"


def synthetic_shards(cache: Path, hours: float) -> Path:
    from orchestrator.demo.synthetic_shar import write_synthetic_shar

    out = cache / f"synthetic-{hours:g}h"
    done = cache / f"synthetic-{hours:g}h.done"  # outside the Shar dir: lhotse's in_dir globs every file
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        n_cuts = int(hours * 3600 / 3.5)  # mean of uniform(1, 6)
        write_synthetic_shar(out, n_cuts=n_cuts, n_shards=max(2, n_cuts // 200), durations=(1.0, 6.0), seed=0)
        done.write_text("ok")
    return out


def run_ours(shar_dir: Path, batch_duration: float, num_buckets: int, num_workers: int, epochs: int = 1) -> dict:
    from orchestrator.config.schema import DataConfig, DatasetConfig
    from orchestrator.data.datasets import build_datasets
    from orchestrator.data.stream import iterate_batches
    from orchestrator.testing import pad_audio_collator

    cfg = DataConfig(
        train_ds=DatasetConfig(
            shar_path=str(shar_dir),
            batch_duration=batch_duration,
            use_bucketing=True,
            num_buckets=num_buckets,
            num_workers=num_workers,
            min_duration=0.0,
        )
    )
    start = time.perf_counter()
    ds = build_datasets(cfg, pad_audio_collator, max_epochs=epochs)["train"]
    audio = padded = 0.0
    batches = []
    first = None
    for _, meta in iterate_batches(ds):
        first = first or time.perf_counter() - start
        audio += meta.audio_seconds
        padded += meta.padded_seconds
        batches.append(meta.num_examples)
    wall = time.perf_counter() - start
    return {"audio_s": audio, "wall_s": wall, "first_s": first, "batches": len(batches), "padding": 1 - audio / padded}


class _PadDataset:
    """lhotse-side dataset: load and pad the audio of a CutSet batch, like pad_audio_collator."""

    def __getitem__(self, cuts):
        import numpy as np

        audios = [c.load_audio()[0] for c in cuts]
        lens = np.array([len(a) for a in audios])
        out = np.zeros((len(audios), lens.max()), dtype=np.float32)  # (B, T)
        for i, a in enumerate(audios):
            out[i, : len(a)] = a
        return {"audio": out, "audio_lens": lens, "durations": [c.duration for c in cuts]}


def run_lhotse(shar_dir: Path, batch_duration: float, num_buckets: int, num_workers: int, epochs: int = 1) -> dict:
    import torch
    from lhotse import CutSet
    from lhotse.dataset import DynamicBucketingSampler, IterableDatasetWrapper, make_worker_init_fn

    start = time.perf_counter()
    cuts = CutSet.from_shar(in_dir=shar_dir, shuffle_shards=True, split_for_dataloading=True, seed=0)
    sampler = DynamicBucketingSampler(cuts, max_duration=batch_duration, num_buckets=num_buckets, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(
        IterableDatasetWrapper(dataset=_PadDataset(), sampler=sampler),
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=make_worker_init_fn(seed=0),
        persistent_workers=True,  # like our single stream over all epochs: no worker restart per epoch
    )
    audio = padded = 0.0
    n = 0
    first = None
    for _ in range(epochs):
        for batch in loader:
            first = first or time.perf_counter() - start
            d = batch["durations"]
            audio += sum(d)
            padded += len(d) * max(d)
            n += 1
    wall = time.perf_counter() - start
    return {"audio_s": audio, "wall_s": wall, "first_s": first, "batches": n, "padding": 1 - audio / padded}


def padding_comparison(shar_dir: Path, batch_duration: float, num_buckets: int) -> tuple[float, float, float]:
    """(bucketed, fixed-size, mean batch size): padding fraction of the same shuffled cuts both ways."""
    from orchestrator.config.schema import DataConfig, DatasetConfig
    from orchestrator.data.plan import _estimate_bins, _inputs_of
    from orchestrator.data.shar import read_manifest

    inputs = _inputs_of(DatasetConfig(shar_path=str(shar_dir)), DataConfig())
    durations = [float(c["duration"]) for s in inputs[0].shards for c in read_manifest(s.cuts)]
    random.Random(0).shuffle(durations)
    bins = tuple(_estimate_bins(inputs, num_buckets, 0.0, 1e9))

    def batches(spec: BatchingSpec) -> list[list[float]]:
        b = DurationBucketer(spec, float)
        out = [x for d in durations for x in b.add(d)]
        return out + b.flush()

    bucketed = batches(BatchingSpec(batch_duration=batch_duration, duration_bins=bins))
    mean_size = max(1, round(statistics.mean(len(b) for b in bucketed)))
    fixed = batches(BatchingSpec(batch_size=mean_size))
    return padding_fraction(bucketed), padding_fraction(fixed), mean_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=0.5)
    parser.add_argument("--cache", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument("--synthetic", action="store_true", help="skip the demo generator")
    parser.add_argument("--batch-duration", type=float, default=60.0)
    parser.add_argument("--num-buckets", type=int, default=30, help="DatasetConfig's default")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes for both pipelines")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument(
        "--epochs",
        type=int,
        default=15,
        help="epochs per timed run: runs of a few seconds measure start-up more than throughput",
    )
    args = parser.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    shar_dir = None if args.synthetic else demo_shards(args.cache, args.hours)
    shar_dir = shar_dir or synthetic_shards(args.cache, args.hours)
    print(f"shards: {shar_dir}  workers: {args.workers}  batch_duration: {args.batch_duration}s")

    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    # One untimed run of each first: Ray starts its worker processes and both sides import lhotse/soundfile
    # once; a training run pays that once, not per epoch.
    run_ours(shar_dir, args.batch_duration, args.num_buckets, args.workers)
    run_lhotse(shar_dir, args.batch_duration, args.num_buckets, args.workers)
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate so drift in machine load hits both
        ours.append(run_ours(shar_dir, args.batch_duration, args.num_buckets, args.workers, args.epochs))
        theirs.append(run_lhotse(shar_dir, args.batch_duration, args.num_buckets, args.workers, args.epochs))
    ray.shutdown()

    def rate(r: dict) -> float:
        return r["audio_s"] / r["wall_s"]

    best_ours, best_theirs = max(ours, key=rate), max(theirs, key=rate)
    ratios = sorted(rate(a) / rate(b) for a, b in zip(ours, theirs, strict=True))

    def fmt(name: str, r: dict) -> str:
        rate = r["audio_s"] / r["wall_s"]
        return (
            f"{name:<8} {rate:8.0f} audio-s/s  ({r['audio_s']:.0f} s audio in {r['wall_s']:.1f} s, "
            f"{r['batches']} batches, padding {r['padding']:.1%}, first batch after {r['first_s']:.2f} s)"
        )

    print(fmt("ours", best_ours))
    print(fmt("lhotse", best_theirs))
    print(
        f"throughput ratio ours/lhotse: best {rate(best_ours) / rate(best_theirs):.2f}x, "
        f"median of pairs {statistics.median(ratios):.2f}x, pairs {[round(r, 2) for r in ratios]}  (target >= 1.0x)"
    )
    bucketed, fixed, size = padding_comparison(shar_dir, args.batch_duration, args.num_buckets)
    print(
        f"padding fraction: pipeline (bucketing) {best_ours['padding']:.1%}; same cuts in one stream: bucketing "
        f"{bucketed:.1%} vs fixed batch_size={size} {fixed:.1%}  (target <= 10%)"
    )


if __name__ == "__main__":
    main()
