"""Sweeps: a spec file (`sweeps/*.yaml`) -> Ray Tune trials, each one `speechlm train` run, tracked in MLflow.

- `spec`: the spec schema, loading and validation (all problems at once, like configs);
- `search_space`: spec -> Tune param space, search algorithm and scheduler;
- `run`: the sweep driver and the trial function (imports Ray);
- `report`: ranked results, the best trial's config as YAML, the comparison plot, MLflow parent artifacts.
"""

from orchestrator.sweep.spec import LoadedSweep, SweepSpec, load_sweep, sweep_from_dict

__all__ = ["LoadedSweep", "SweepSpec", "load_sweep", "sweep_from_dict"]
