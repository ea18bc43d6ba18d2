"""One terminal line per log step: where the run is, how fast it goes, when it will end."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_progress(step: int, max_steps: int, metrics: dict[str, float], started: float, start_step: int) -> str:
    """`step 120/600 (20%) | loss 2.314 | lr 1.9e-03 | 45.2 audio-s/s | 812 tok/s | data-wait 3% | ETA 4m12s`."""
    elapsed = time.perf_counter() - started
    done = step - start_step
    eta = elapsed / done * (max_steps - step) if done > 0 else float("nan")
    parts = [
        f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)",
        f"loss {metrics['loss']:.3f}",
        *(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("_loss")),
        f"lr {metrics['lr']:.1e}",
        f"{metrics['audio_seconds_per_sec']:.1f} audio-s/s",
        f"{metrics['tokens_per_sec']:.0f} tok/s",
        f"data-wait {100 * metrics['data_wait_fraction']:.0f}%",
        f"ETA {format_duration(eta) if eta == eta else '?'}",
    ]
    return " | ".join(parts)
