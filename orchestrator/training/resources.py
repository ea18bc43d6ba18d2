"""How many Ray Train workers a run gets, with which resources: `trainer.*` mapped onto the Ray cluster."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import ExperimentConfig
from orchestrator.config.errors import ConfigError


@dataclass
class Resources:
    num_workers: int  # the most workers (elastic) or the fixed count
    use_gpu: bool
    cpus_per_worker: float
    threads_per_worker: int
    min_workers: int | None = None  # elastic (trainer.min_nodes): the run goes on with as few as this

    @property
    def ray_num_workers(self) -> int | tuple[int, int]:
        """ScalingConfig(num_workers=...): a (min, max) pair makes Ray Train's worker group elastic."""
        return (self.min_workers, self.num_workers) if self.min_workers is not None else self.num_workers

    def describe(self) -> str:
        count = f"{self.min_workers}..{self.num_workers}" if self.min_workers is not None else f"{self.num_workers}"
        return f"{count} x ({'1 GPU, ' if self.use_gpu else ''}{self.cpus_per_worker:g} CPU)"


def plan_resources(cfg: ExperimentConfig, cluster: dict[str, float]) -> Resources:
    """workers = devices x num_nodes (elastic down to devices x min_nodes); GPU when asked (or available with
    accelerator auto); on CPU-only machines workers take fractional CPUs so Ray Data keeps CPUs to decode audio."""
    t = cfg.trainer
    gpus = int(cluster.get("GPU", 0))
    use_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise ConfigError(
            [
                "trainer.accelerator: 'gpu' but the Ray cluster has no GPUs; use trainer.accelerator=cpu "
                "or connect to a cluster with GPU nodes (RAY_ADDRESS)"
            ],
            "trainer",
        )
    num_workers = (gpus if use_gpu else 1) if t.devices == -1 else t.devices * t.num_nodes
    cpus = float(cluster.get("CPU", 1))
    if t.cpus_per_worker is not None:
        cpus_per_worker = t.cpus_per_worker
    elif use_gpu:
        cpus_per_worker = 1.0
    else:
        # Half the CPUs for training, half for Ray Data; at least a sliver so workers can be scheduled.
        cpus_per_worker = max(0.25, min(1.0, cpus / (2 * num_workers)))
    threads = max(1, round(cpus_per_worker) if use_gpu else int(max(1, cpus // (2 * num_workers))))
    elastic = t.min_nodes is not None and t.min_nodes < t.num_nodes and t.devices > 0
    min_workers = t.devices * t.min_nodes if elastic else None
    return Resources(num_workers, use_gpu, cpus_per_worker, threads, min_workers)
