"""A validated sweep spec -> Ray Tune's param space, search algorithm and trial scheduler.

Tune sees one flat key per swept config key (`model.lora.r`); for named presets it samples the preset name
(`frozen_llm`), which the trial maps back to the value. Time for schedulers is the reported optimizer `step`:
trials report to Tune only at validations, so ASHA rungs and PBT intervals are in the units of the config.
"""

from __future__ import annotations

from typing import Any

from orchestrator.redaction import redact
from orchestrator.sweep.spec import LoadedSweep, SweptParam

TIME_ATTR = "step"  # present in every result a trial reports to Tune (validation results only)


def tune_domain(param: SweptParam, as_grid: bool = False) -> Any:
    """One search-space entry as a Tune domain (grid_search for grid, or for every discrete key with as_grid)."""
    from ray import tune

    if param.discrete:
        options = list(param.options)
        return tune.grid_search(options) if (param.kind == "grid" or as_grid) else tune.choice(options)
    low, high, *rest = param.bounds
    if param.kind == "uniform":
        return tune.uniform(low, high)
    if param.kind == "loguniform":
        return tune.loguniform(low, high)
    if param.kind == "randint":
        return tune.randint(int(low), int(high))
    if param.kind == "quniform":
        return tune.quniform(low, high, rest[0])
    raise ValueError(f"unknown distribution {param.kind!r} for {param.key}")  # pragma: no cover - spec validates


def param_space(loaded: LoadedSweep) -> dict[str, Any]:
    """{dotted config key: Tune domain}; search_alg grid turns every choice into a grid."""
    as_grid = loaded.spec.search_alg.type == "grid"
    return {p.key: tune_domain(p, as_grid) for p in loaded.params}


def search_alg(loaded: LoadedSweep, max_concurrent: int):
    """random/grid: Tune's BasicVariantGenerator (grid keys crossed, the rest sampled); optuna: TPE.

    The concurrency limit goes into the search algorithm itself: TuneConfig.max_concurrent_trials ignores a
    BasicVariantGenerator (a SearchGenerator, not a Searcher), and Optuna gets a ConcurrencyLimiter.
    """
    spec = loaded.spec
    if spec.search_alg.type == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # metric/mode come from TuneConfig
        return ConcurrencyLimiter(OptunaSearch(seed=spec.search_alg.seed), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.search_alg.seed, max_concurrent=max_concurrent)


def scheduler(loaded: LoadedSweep):
    """ASHA stops trials at rungs of grace_period x reduction_factor^k steps; PBT copies the best trials'
    checkpoints into the worst and perturbs their values; FIFO runs every trial to trainer.max_steps."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = loaded.spec.scheduler
    trainer = loaded.base.cfg.trainer
    if s.type == "asha":
        return ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=s.max_t if s.max_t is not None else trainer.max_steps,
            grace_period=s.grace_period if s.grace_period is not None else trainer.val_check_interval,
            reduction_factor=s.reduction_factor,
            brackets=s.brackets,
            # A trial that reaches max_t ends by itself: stopping it there would kill the Train run while it
            # writes its last checkpoint and closes its MLflow run.
            stop_last_trials=False,
        )
    if s.type == "pbt":
        return PopulationBasedTraining(
            time_attr=TIME_ATTR,
            perturbation_interval=(
                s.perturbation_interval if s.perturbation_interval is not None else trainer.val_check_interval
            ),
            hyperparam_mutations={p.key: _mutation(p) for p in loaded.params},
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
        )
    return FIFOScheduler()


def _mutation(param: SweptParam) -> Any:
    """PBT resamples from a list or a domain; perturbing a list moves to a neighbouring value."""
    return list(param.options) if param.discrete else tune_domain(param)


def describe(loaded: LoadedSweep) -> str:
    """A few lines for the terminal: what is swept and how trials are searched and stopped."""
    spec = loaded.spec
    lines = [f"sweep {spec.name}: {loaded.source} -> {loaded.sweep_dir}", f"base: {loaded.base_path}"]
    if loaded.fixed_overrides:
        lines.append("fixed: " + " ".join(loaded.fixed_overrides))
    for p in loaded.params:
        if p.discrete:
            shown = ", ".join(map(str, p.options[:12])) + (
                f", ... ({len(p.options)} values)" if len(p.options) > 12 else ""
            )
            lines.append(f"  {p.key}: {p.kind} [{shown}]" + (" (presets)" if p.presets else ""))
        else:
            lines.append(f"  {p.key}: {p.kind} {list(p.bounds)}")
    s = spec.scheduler
    stopping = s.type
    if s.type == "asha":
        grace = s.grace_period if s.grace_period is not None else loaded.base.cfg.trainer.val_check_interval
        stopping += f" (grace {grace} steps, reduction {s.reduction_factor:g})"
    lines.append(
        f"metric: {spec.metric} ({spec.mode}) | search: {spec.search_alg.type} | scheduler: {stopping} | "
        f"samples: {spec.num_samples} | max steps: {loaded.max_steps}"
    )
    return redact("\n".join(lines))
