"""Sweeps: a spec file (`sweeps/*.yaml`) -> Ray Tune trials, each one `speechlm train` run, tracked in MLflow.

- `spec`: the spec schema, loading and validation (all problems at once, like configs);
- `search_space`: spec -> Tune param space, search algorithm and scheduler;
- `run`: the sweep driver and the trial (imports Ray);
- `report`: ranked results, the best trial's config as YAML, the comparison plot, MLflow parent artifacts;
- `worker_setup`: what every Ray worker of a sweep runs first.

Nothing is imported here, so that `worker_setup` stays cheap to import in every worker.
"""
