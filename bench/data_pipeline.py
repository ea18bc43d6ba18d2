"""Data pipeline throughput and padding, measured side by side in one run.

(a) ours: `orchestrator.data` (Ray Data read tasks: read shard, bucket, decode, pad) iterated to the
    end of `--epochs` epochs on the driver.
(b) lhotse: `CutSet.from_shar` + `DynamicBucketingSampler` + a torch DataLoader over `IterableDatasetWrapper`
    whose dataset loads and pads the audio, with as many worker processes as CPUs (lhotse's recommended
    setup for Shar: every worker reads its own shards).
(c) padding fraction of bucketed batches vs fixed-size batches (same mean batch size) on the same cuts.

(d) mixed speech + text 3:1 with token-aware batching (`--case mixed`): ours (input_cfg [lhotse_shar weight 3,
    txt weight 1], use_multimodal_sampling, batch_tokens, `num_buckets` token buckets estimated from the
    data, WordTokenCollator) vs lhotse's multimodal sampling as NeMo drives it: `CutSet.mux` of the Shar cuts and
    `TextExample`s (weights 3:1), `DynamicBucketingSampler` with a `TokenConstraint` that measures an example
    as NeMo's MultimodalSamplingConstraint does (audio frames of token_equivalent_duration + text tokens), a
    DataLoader over `IterableDatasetWrapper`. Throughput is real token slots per second (audio frames + text
    tokens), padding is `1 - real slots / (batch size x longest example)` over all batches.

Both pipelines read the same shards, decode the same FLAC, pad to (B, T) float32 and use the same number of
processes. Figures are per wall-second from building the pipeline to its last batch, after one untimed warm-up run
of each (Ray worker processes and imports happen once per training run, not per epoch).

    python bench/data_pipeline.py                 # both cases on the demo ASR train split (0.5 h), else tones
    python bench/data_pipeline.py --synthetic --hours 0.5 --repeats 2
    python bench/data_pipeline.py --case mixed --repeats 5
    python bench/data_pipeline.py --quick         # does it run? (seconds; the figures mean nothing)
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from lhotse.dataset.sampling.base import TokenConstraint  # noqa: E402

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


# ----------------------------------------------------------------------------------------------
# Mixed speech + text (token-aware batching), side by side with lhotse's multimodal sampling
# ----------------------------------------------------------------------------------------------


def text_file(cache: Path, shar_dir: Path, demo_text: Path | None) -> Path:
    """Text-only examples: the demo's text set when there is one, else the speech set's transcripts (one per line,
    no empty lines: both sides would count an empty line differently)."""
    if demo_text is not None and demo_text.is_file():
        lines = [x.strip() for x in demo_text.read_text().splitlines() if x.strip()]
    else:
        from orchestrator.data.shar import discover_dir, read_manifest

        lines = [
            " ".join(s["text"] for s in cut["supervisions"]).strip()
            for shard in discover_dir(str(shar_dir))
            for cut in read_manifest(shard.cuts)
        ]
        lines = [x for x in lines if x]
    out = cache / f"text-{shar_dir.parent.name}-{shar_dir.name}.txt"
    out.write_text("".join(x + "\n" for x in lines))
    return out


def token_count(text: str, duration: float | None, token_equivalent_duration: float) -> int:
    """An example's length in token slots as `WordTokenCollator.token_lengths` counts it with
    measure_total_length (words as tokens; a cut: one audio placeholder + its frames, then its transcript)."""
    words = len(text.split())
    if duration is None:  # text only: the whole line is the answer
        return words
    return max(1, math.ceil(duration / token_equivalent_duration)) + words


def run_ours_mixed(
    shar_dir: Path,
    text: Path,
    batch_tokens: int,
    ted: float,
    num_buckets: int,
    num_workers: int,
    buffer_size: int,
    epochs: int = 1,
) -> dict:
    from orchestrator.config.schema import DataConfig, DatasetConfig, InputConfig
    from orchestrator.data.datasets import build_datasets
    from orchestrator.data.stream import iterate_batches
    from orchestrator.testing import WordTokenCollator

    cfg = DataConfig(
        train_ds=DatasetConfig(
            input_cfg=[
                InputConfig(type="lhotse_shar", shar_path=str(shar_dir), weight=3.0),
                InputConfig(type="txt", paths=str(text), weight=1.0),
            ],
            use_multimodal_sampling=True,
            batch_tokens=batch_tokens,
            token_equivalent_duration=ted,
            measure_total_length=True,
            use_bucketing=True,
            num_buckets=num_buckets,
            bucket_buffer_size=buffer_size,
            num_workers=num_workers,
            min_duration=0.0,
        )
    )
    start = time.perf_counter()
    ds = build_datasets(cfg, WordTokenCollator(), max_epochs=epochs)["train"]
    totals = dict(audio_s=0.0, tokens=0, padded_tokens=0, examples=0, batches=0)
    first = None
    for _, meta in iterate_batches(ds):
        first = first or time.perf_counter() - start
        totals["audio_s"] += meta.audio_seconds
        totals["tokens"] += meta.tokens
        totals["padded_tokens"] += meta.padded_tokens
        totals["examples"] += meta.num_examples
        totals["batches"] += 1
    return _mixed_result(totals, time.perf_counter() - start, first)


def _mixed_result(totals: dict, wall: float, first: float | None) -> dict:
    return {
        **totals,
        "wall_s": wall,
        "first_s": first,
        "padding": 1 - totals["tokens"] / max(1, totals["padded_tokens"]),
    }


@dataclass
class MultimodalTokenConstraint(TokenConstraint):
    """lhotse's TokenConstraint measuring an example as NeMo's MultimodalSamplingConstraint does with
    measure_total_length: a cut is its audio frames (one per token_equivalent_duration) plus its text tokens, a
    TextExample its tokens. lhotse's sampler buckets and batches by `measure_length`; `B x longest <= max_tokens`
    is TokenConstraint's own rule, the same as batch_tokens' in ours."""

    token_equivalent_duration: float = 0.08

    def measure_length(self, example) -> float:
        if hasattr(example, "duration"):  # a cut
            text = " ".join(s.text or "" for s in example.supervisions)
            return token_count(text, example.duration, self.token_equivalent_duration)
        return token_count(example.text, None, self.token_equivalent_duration)


class _MixedDataset:
    """lhotse-side dataset for a mixed batch: load and pad every cut's audio, count every example's token slots
    (what WordTokenCollator and our read tasks do)."""

    def __init__(self, ted: float) -> None:
        self.ted = ted

    def __getitem__(self, batch):
        import numpy as np

        cuts = [x for x in batch if hasattr(x, "duration")]
        audios = [c.load_audio()[0] for c in cuts]
        lens = np.array([len(a) for a in audios], dtype=np.int64)
        out = np.zeros((len(audios), int(lens.max(initial=0))), dtype=np.float32)  # (N_audio, T)
        for i, a in enumerate(audios):
            out[i, : len(a)] = a
        tokens = [
            token_count(" ".join(s.text or "" for s in x.supervisions), x.duration, self.ted)
            if hasattr(x, "duration")
            else token_count(x.text, None, self.ted)
            for x in batch
        ]
        return {"audio": out, "audio_lens": lens, "tokens": tokens, "audio_s": sum(c.duration for c in cuts)}


def _lhotse_mixed_cuts(shar_dir: Path, text: Path, split_for_dataloading: bool = True):
    """Speech cuts and TextExamples muxed 3:1, both repeated (infinite, as NeMo does for training)."""
    from lhotse import CutSet
    from lhotse.lazy import LazyTxtIterator

    speech = CutSet.from_shar(in_dir=shar_dir, shuffle_shards=True, split_for_dataloading=split_for_dataloading, seed=0)
    lines = CutSet(LazyTxtIterator(text, as_text_example=True))
    return CutSet.mux(speech.repeat(), lines.repeat(preserve_id=True), weights=[3.0, 1.0], seed=0)


def lhotse_mixed_bins(shar_dir: Path, text: Path, batch_tokens: int, ted: float, num_buckets: int) -> list[float]:
    """Token bins by lhotse's own estimator from about one pass over the speech set (untimed, once). Left to the
    sampler, it would estimate them from 10,000 examples, i.e. many passes over a small set, in every run; NeMo
    users pass bins from `estimate_token_bins` too."""
    from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets

    from orchestrator.data.shar import discover_dir, read_manifest

    speech_cuts = sum(len(read_manifest(s.cuts)) for s in discover_dir(str(shar_dir)))
    sample = islice(_lhotse_mixed_cuts(shar_dir, text, split_for_dataloading=False), math.ceil(speech_cuts * 4 / 3))
    constraint = MultimodalTokenConstraint(max_tokens=batch_tokens, token_equivalent_duration=ted)
    return list(estimate_duration_buckets(sample, num_buckets=num_buckets, constraint=constraint))


def run_lhotse_mixed(
    shar_dir: Path,
    text: Path,
    batch_tokens: int,
    ted: float,
    num_buckets: int,
    num_workers: int,
    buffer_size: int,
    examples: int,
    bins: list[float],
) -> dict:
    """lhotse as NeMo drives it for multimodal sampling: speech cuts and TextExamples muxed 3:1,
    DynamicBucketingSampler with the token constraint and bins, a DataLoader with `num_workers` workers each
    reading its own speech shards; stopped after as many examples as ours made."""
    import torch
    from lhotse.dataset import DynamicBucketingSampler, IterableDatasetWrapper, make_worker_init_fn

    start = time.perf_counter()
    sampler = DynamicBucketingSampler(
        _lhotse_mixed_cuts(shar_dir, text),
        constraint=MultimodalTokenConstraint(max_tokens=batch_tokens, token_equivalent_duration=ted),
        duration_bins=bins,
        buffer_size=buffer_size,  # lhotse fills it before the first batch; the same bound as ours
        shuffle=True,
        seed=0,
    )
    loader = torch.utils.data.DataLoader(
        IterableDatasetWrapper(dataset=_MixedDataset(ted), sampler=sampler),
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=make_worker_init_fn(seed=0),
    )
    totals = dict(audio_s=0.0, tokens=0, padded_tokens=0, examples=0, batches=0)
    first = None
    for batch in loader:
        first = first or time.perf_counter() - start
        tokens = batch["tokens"]
        totals["audio_s"] += batch["audio_s"]
        totals["tokens"] += sum(tokens)
        totals["padded_tokens"] += len(tokens) * max(tokens)
        totals["examples"] += len(tokens)
        totals["batches"] += 1
        if totals["examples"] >= examples:
            break
    wall = time.perf_counter() - start
    del loader  # stops its workers (the mux is infinite)
    return _mixed_result(totals, wall, first)


def mixed_case(args, shar_dir: Path, text: Path) -> None:
    """Speech 3 : text 1 with token-aware batching, ours vs lhotse's multimodal sampling (see the docstring)."""
    common = (args.batch_tokens, args.token_equivalent_duration, args.num_buckets, args.workers, args.buffer_size)
    print(
        f"\nmixed speech:text 3:1, token-aware: text {text}  batch_tokens {args.batch_tokens}  "
        f"token_equivalent_duration {args.token_equivalent_duration}"
    )
    bins = lhotse_mixed_bins(shar_dir, text, args.batch_tokens, args.token_equivalent_duration, args.num_buckets)
    if not args.quick:  # untimed warm-up of each, as in the speech-only case
        warm = run_ours_mixed(shar_dir, text, *common)
        run_lhotse_mixed(shar_dir, text, *common, examples=warm["examples"], bins=bins)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(run_ours_mixed(shar_dir, text, *common, epochs=args.epochs))
        # Same work on both sides: as many examples as ours made in its epochs (lhotse's mux is infinite).
        theirs.append(run_lhotse_mixed(shar_dir, text, *common, examples=ours[-1]["examples"], bins=bins))

    def rate(r: dict) -> float:  # real token slots (audio frames + text tokens) per second
        return r["tokens"] / r["wall_s"]

    def fmt(name: str, r: dict) -> str:
        return (
            f"{name:<8} {rate(r):8.0f} tokens/s  ({r['tokens']} tokens, {r['examples']} examples, "
            f"{r['audio_s']:.0f} s audio in {r['wall_s']:.1f} s, {r['batches']} batches, padding {r['padding']:.1%}, "
            f"first batch after {r['first_s']:.2f} s)"
        )

    best_ours, best_theirs = max(ours, key=rate), max(theirs, key=rate)
    ratios = sorted(rate(a) / rate(b) for a, b in zip(ours, theirs, strict=True))
    print(fmt("ours", best_ours))
    print(fmt("lhotse", best_theirs))
    print(
        f"throughput ratio ours/lhotse (tokens/s): best {rate(best_ours) / rate(best_theirs):.2f}x, median of pairs "
        f"{statistics.median(ratios):.2f}x, pairs {[round(r, 2) for r in ratios]}  (target >= 1.0x)"
    )
    print(
        f"padding (audio + text token slots): ours {statistics.median(r['padding'] for r in ours):.1%}, lhotse "
        f"{statistics.median(r['padding'] for r in theirs):.1%}  (median of runs; target <= 5%)"
    )


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


def speech_case(args, shar_dir: Path) -> None:
    """Speech only, batched by duration: ours vs lhotse's DynamicBucketingSampler (see the docstring)."""
    common = (args.batch_duration, args.num_buckets, args.workers)
    if not args.quick:
        # One untimed run of each first: Ray starts its worker processes and both sides import lhotse/soundfile
        # once; a training run pays that once, not per epoch.
        run_ours(shar_dir, *common)
        run_lhotse(shar_dir, *common)
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate so drift in machine load hits both
        ours.append(run_ours(shar_dir, *common, args.epochs))
        theirs.append(run_lhotse(shar_dir, *common, args.epochs))

    def rate(r: dict) -> float:
        return r["audio_s"] / r["wall_s"]

    best_ours, best_theirs = max(ours, key=rate), max(theirs, key=rate)
    ratios = sorted(rate(a) / rate(b) for a, b in zip(ours, theirs, strict=True))

    def fmt(name: str, r: dict) -> str:
        return (
            f"{name:<8} {rate(r):8.0f} audio-s/s  ({r['audio_s']:.0f} s audio in {r['wall_s']:.1f} s, "
            f"{r['batches']} batches, padding {r['padding']:.1%}, first batch after {r['first_s']:.2f} s)"
        )

    print(f"\nspeech only, batch_duration {args.batch_duration}s")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("speech", "mixed", "all"), default="all")
    parser.add_argument("--hours", type=float, default=0.5)
    parser.add_argument("--cache", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument("--synthetic", action="store_true", help="skip the demo generator")
    parser.add_argument("--batch-duration", type=float, default=60.0)
    parser.add_argument("--batch-tokens", type=int, default=1000, help="mixed case: token slots per batch")
    parser.add_argument(
        "--token-equivalent-duration", type=float, default=0.08, help="mixed case: seconds of audio per token"
    )
    parser.add_argument("--num-buckets", type=int, default=30, help="DatasetConfig's default")
    parser.add_argument(
        "--buffer-size", type=int, default=10000, help="mixed case: examples held in buckets (bucket_buffer_size)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes for both pipelines")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument(
        "--epochs",
        type=int,
        default=15,
        help="epochs per timed run: runs of a few seconds measure start-up more than throughput",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check that it runs: synthetic 0.05 h, 1 epoch, 1 pair, no warm-up (figures mean nothing)",
    )
    args = parser.parse_args()
    if args.quick:
        args.synthetic, args.hours, args.epochs, args.repeats = True, 0.05, 1, 1

    args.cache.mkdir(parents=True, exist_ok=True)
    shar_dir = None if args.synthetic else demo_shards(args.cache, args.hours)
    demo_text = shar_dir.parent.parent / "text" / "train" / "sentences.txt" if shar_dir is not None else None
    shar_dir = shar_dir or synthetic_shards(args.cache, args.hours)
    print(f"shards: {shar_dir}  workers: {args.workers}")

    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if args.case in ("speech", "all"):
        speech_case(args, shar_dir)
    if args.case in ("mixed", "all"):
        mixed_case(args, shar_dir, text_file(args.cache, shar_dir, demo_text))
    ray.shutdown()


if __name__ == "__main__":
    main()
