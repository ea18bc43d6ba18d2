"""`speechlm data plan-batches`: the largest batch of every bucket that fits the device, measured by running real
training steps on it (NeMo's OOMptimizer idea). Run it on the GPU type of a long job before the job starts; it
prints `bucket_duration_bins` and `bucket_batch_size` to paste into the config.

For each bucket, from the longest down, a training step (forward, backward, optimizer step) runs on a synthetic
batch of the bucket's longest example (`model.profiling_batch`): the audio and answer a bin stands for, below.
The batch size grows until a step runs out of memory or exceeds the budget, then narrows down until the largest
size that fits is known within `threshold` (NeMo's search, guided by the peaks already measured). Peak memory is the device's own counter on CUDA (and an
out-of-memory error counts as "too big"); on CPU, where nothing runs out, it is the peak of the tensors alive
during the step (a dispatch-mode tracker) on top of the weights, gradients and optimizer state, against
`--memory-gb`. That is what the tests run; a GPU user gets the real figure.

What a bin stands for (`ratio`: answer tokens per input token, NeMo's `--ratio`):
- seconds d: d s of audio and ratio x d / token_equivalent_duration answer tokens;
- tokens T (use_multimodal_sampling): T / (1 + ratio) audio frames and the rest answer tokens;
- [seconds, tokens] or [input tokens, output tokens] (2-D): the audio and the answer of the pair.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if TYPE_CHECKING:
    from orchestrator.config.schema import ExperimentConfig


@dataclass
class BucketPlan:
    """The largest batch that fits one bucket."""

    bin: Any  # the bucket's edge, as the config writes it
    audio_seconds: float
    text_tokens: int
    batch_size: int
    peak_bytes: int  # of the largest batch that fit


@dataclass
class BatchPlan:
    device: str
    budget_bytes: int
    buckets: list[BucketPlan] = field(default_factory=list)
    seconds: float = 0.0

    def final(self) -> tuple[list[Any], list[int]]:
        """(bins, batch sizes); 1-D neighbours with the same batch size merge into one bucket (NeMo's last step)."""
        bins, sizes = [], []
        for plan in self.buckets:
            if sizes and sizes[-1] == plan.batch_size and not isinstance(plan.bin, list):
                bins[-1] = plan.bin
                continue
            bins.append(plan.bin)
            sizes.append(plan.batch_size)
        return bins, sizes

    def format(self) -> str:
        lines = [f"batch sizes on {self.device} within {self.budget_bytes / 2**30:.2f} GiB ({self.seconds:.0f} s):"]
        for plan in self.buckets:
            lines.append(
                f"  bin {plan.bin}: {plan.audio_seconds:.2f} s audio + {plan.text_tokens} answer tokens -> "
                f"batch {plan.batch_size} (peak {plan.peak_bytes / 2**20:.0f} MiB)"
            )
        bins, sizes = self.final()
        lines.append("Use the following options in your config (use_bucketing: true):")
        lines.append(f"  bucket_duration_bins: {bins}")
        lines.append(f"  bucket_batch_size: {sizes}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- memory


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside it that are still alive, and their peak (CPU steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, Any] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and not value.is_meta:
                self._track(value.untyped_storage())
        return out

    def _track(self, storage: Any) -> None:
        size, pointer = storage.nbytes(), storage.data_ptr()
        if not size or pointer in self._storages:
            return

        def freed(_: Any, pointer: int = pointer, size: int = size) -> None:
            if self._storages.pop(pointer, None) is not None:
                self.live -= size

        self._storages[pointer] = weakref.ref(storage, freed)
        self.live += size
        self.peak = max(self.peak, self.live)


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights, buffers, gradients and optimizer state: what a CPU step's own tensors come on top of."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def make_step_runner(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, autocast: Callable
) -> Callable[[dict[str, Any]], int | None]:
    """`run(batch) -> peak bytes of one training step`, or None when it ran out of memory."""
    from orchestrator.training.worker_io import to_device

    def run(batch: dict[str, Any]) -> int | None:
        optimizer.zero_grad(set_to_none=True)
        batch = to_device(batch, device)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                with autocast():
                    loss = model(batch)["loss"]
                loss.backward()
                optimizer.step()
                torch.cuda.synchronize(device)
                return int(torch.cuda.max_memory_allocated(device))
            base = _state_bytes(model, optimizer)
            with _LiveTensorBytes() as tracker:
                with autocast():
                    loss = model(batch)["loss"]
                loss.backward()
                optimizer.step()
            return base + tracker.peak
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not _is_out_of_memory(exc):
                raise
            return None
        finally:
            optimizer.zero_grad(set_to_none=True)

    return run


# ----------------------------------------------------------------------------------------------- search


def largest_batch(
    measure: Callable[[int], int | None],
    budget: int,
    start: int = 1,
    max_batch_size: int = 1024,
    threshold: float = 0.05,
) -> tuple[int, int]:
    """(largest batch size whose step peaks within `budget` bytes, that peak); 0 when not even one fits.

    `measure(size)` is a step's peak, or None when it ran out of memory. NeMo's search (double until a size fails,
    then narrow down until the gap between the largest success and the smallest failure is within `threshold` of
    the failure, or one), except that once two peaks are known the next size is the one they predict (memory grows
    about linearly with the batch), which saves most of the steps; the prediction is kept inside the known bounds.
    """
    best, worst, peaks = 0, None, {}
    size = max(1, min(start, max_batch_size))
    while True:
        peak = measure(size)
        if peak is not None:
            peaks[size] = peak
        if peak is not None and peak <= budget:
            best = max(best, size)
        else:
            worst = size if worst is None else min(worst, size)
        if worst is None and size >= max_batch_size:
            return best, peaks[best]
        if worst is not None:
            if best == 0 and worst <= 1:
                return 0, 0
            if best and (worst - best <= 1 or (worst - best) / worst <= threshold):
                return best, peaks[best]
        size = _next_size(best, worst, peaks, budget, max_batch_size)


def _next_size(best: int, worst: int | None, peaks: dict[int, int], budget: int, max_batch_size: int) -> int:
    high = (worst - 1) if worst is not None else max_batch_size
    low = best + 1
    guess = best * 2 if worst is None else (best + worst) // 2 if best else max(1, worst // 2)
    known = sorted(peaks.items())
    if len(known) >= 2:
        (a, peak_a), (b, peak_b) = known[-2], known[-1]
        slope = (peak_b - peak_a) / (b - a)
        if slope > 0:
            guess = b + math.floor((budget - peak_b) / slope)
    return max(1, min(max(guess, low), high))


def _bin_load(bin_: Any, measure_tokens: bool, ratio: float, ted: float) -> tuple[float, int]:
    """(audio seconds, answer tokens) a bin stands for (see the module docstring)."""
    if isinstance(bin_, (list, tuple)):
        first, second = float(bin_[0]), int(bin_[1])
        return (first * ted if measure_tokens else first), second
    if measure_tokens:
        frames = float(bin_) / (1.0 + ratio)
        return frames * ted, max(1, round(float(bin_) - frames))
    return float(bin_), max(1, math.ceil(ratio * float(bin_) / ted))


def _default_budget(device: torch.device, fraction: float) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * fraction)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * fraction)


def plan_batches(
    cfg: ExperimentConfig,
    device: str = "auto",
    memory_gb: float | None = None,
    memory_fraction: float = 0.9,
    ratio: float = 0.25,
    bins: list[Any] | None = None,
    start_batch_size: int = 1,
    max_batch_size: int = 1024,
    threshold: float = 0.05,
    progress: Callable[[str], None] | None = None,
) -> BatchPlan:
    """The largest batch of every bucket of `cfg.data.train_ds` (or of `bins`) on `device`."""
    from orchestrator.training.loop import setup_optimizer
    from speech_models.precision import setup_precision
    from speech_models.registry import build_model

    started = time.perf_counter()
    ds = cfg.data.train_ds
    bins = list(bins if bins is not None else ds.bucket_duration_bins or [])
    if not bins:
        raise ValueError(
            "no bucket_duration_bins in the config; run `speechlm data estimate-bins` first and pass its bins "
            "(or --bins)"
        )
    ted = ds.token_equivalent_duration or 0.08
    torch_device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    budget = int(memory_gb * 2**30) if memory_gb is not None else _default_budget(torch_device, memory_fraction)
    model = build_model(cfg.model, cfg.data).to(torch_device)
    if not hasattr(model, "profiling_batch"):
        raise ValueError(f"{type(model).__name__} has no profiling_batch(): it cannot be planned for yet")
    model.train()
    autocast = setup_precision(model, cfg.trainer.precision, torch_device)
    optimizer, _ = setup_optimizer(model, cfg)
    run = make_step_runner(model, optimizer, torch_device, autocast)
    smallest = _bin_load(bins[0], ds.use_multimodal_sampling, ratio, ted)
    run(model.profiling_batch(1, *smallest))  # creates gradients and optimizer state once, as training would
    plan = BatchPlan(str(torch_device), budget)
    start = start_batch_size
    for bin_ in reversed(bins):  # longest first: the batch sizes only grow from there (NeMo's order)
        audio_seconds, tokens = _bin_load(bin_, ds.use_multimodal_sampling, ratio, ted)

        def measure(size: int, audio_seconds: float = audio_seconds, tokens: int = tokens, bin_: Any = bin_):
            peak = run(model.profiling_batch(size, audio_seconds, tokens))
            if progress:
                shown = "out of memory" if peak is None else f"{peak / 2**20:.0f} MiB"
                progress(f"  bin {bin_}: batch {size} -> {shown}")
            return peak

        size, peak = largest_batch(measure, budget, start, max_batch_size, threshold)
        if size == 0:
            raise ValueError(
                f"not even one example of bin {bin_} ({audio_seconds:.1f} s audio, {tokens} tokens) fits "
                f"{budget / 2**30:.2f} GiB on {torch_device}; lower the bin or give more memory"
            )
        plan.buckets.insert(0, BucketPlan(bin_, audio_seconds, tokens, size, peak))
        start = size
    plan.seconds = time.perf_counter() - started
    return plan
