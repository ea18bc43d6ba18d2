"""Sweep spec files (`sweeps/*.yaml`): schema, loading and validation, every problem reported at once.

A spec names a base experiment config and fixed overrides, the search space over dotted config keys, the
metric and how to search (search_alg), stop (scheduler) and place (resources) trials:

    name: salm_lora_rank
    base: configs/salm.yaml            # relative to the launch directory, else to this file
    overrides: [trainer.max_steps=2000]  # fixed for every trial, same grammar as the command line
    search_space:
      model.lora.r: {grid: [4, 8, 16]}
      model.optimizer.lr: {loguniform: [1e-4, 1e-3]}
      model.freeze_params: {choice: {frozen_llm: ["^llm\\\\..+$"], none: []}}  # named presets
    metric: val_wer
    mode: min
    scheduler: {type: asha, grace_period: 500}
    search_alg: {type: random, seed: 0}
    num_samples: 4

Validation follows `orchestrator.config`: typed by the same `build`, then every swept key is checked
against the experiment schema (did-you-mean), and the base config is loaded with each candidate value so a
trial cannot fail on a config problem after the sweep has spent a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config import ConfigError, ExperimentConfig, LoadedConfig, load_experiment
from orchestrator.config.checks import name_problem, produced_metrics
from orchestrator.config.loader import load_experiment_variants
from orchestrator.config.overrides import OverrideError, apply_overrides
from orchestrator.config.yaml_files import read_yaml
from orchestrator.storage.paths import absolute, too_broad_problem
from speech_models.registry import entry_for
from speech_models.typed_data import build, did_you_mean, key_problem

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
DEFAULT_OUTPUT_ROOT = "experiments/sweeps"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------- schema


@dataclass
class ParamSpec:
    """One swept key: exactly one distribution. choice/grid take a list, or a mapping of named presets."""

    choice: list[Any] | dict[str, Any] | None = None  # sampled (random/optuna); a mapping = named presets
    grid: list[Any] | dict[str, Any] | None = None  # every value, crossed with the other grid keys
    uniform: list[float] | None = None  # [low, high]
    loguniform: list[float] | None = None  # [low, high], low > 0: learning rates, weight decay
    randint: list[int] | None = None  # [low, high): high is exclusive, as in Ray Tune and numpy
    quniform: list[float] | None = None  # [low, high, q]: uniform rounded to a multiple of q


@dataclass
class SchedulerSpec:
    """How trials are stopped early. Times are optimizer steps (Tune's time_attr is the reported `step`)."""

    type: Literal["asha", "pbt", "fifo"] = "asha"
    grace_period: int | None = None  # asha: steps every trial runs before it may be stopped (default: 1 validation)
    reduction_factor: float = 2.0  # asha: 1/reduction_factor of the trials survive each rung
    max_t: int | None = None  # asha: the last rung (default: trainer.max_steps)
    brackets: int = 1  # asha: >1 hedges against a too-short grace_period, at the cost of fewer stops
    perturbation_interval: int | None = None  # pbt: steps between exploit/explore (default: val_check_interval)
    quantile_fraction: float = 0.25  # pbt: the bottom fraction copies the top fraction
    resample_probability: float = 0.25  # pbt: chance to resample a value instead of perturbing it


@dataclass
class SearchAlgSpec:
    type: Literal["random", "grid", "optuna"] = "random"  # grid: every combination of choice/grid values
    seed: int | None = 0  # the same seed samples the same trials again


@dataclass
class ResourcesSpec:
    """Per trial; unset keys keep the base config's trainer.devices / cpus_per_worker / accelerator."""

    workers: int | None = None  # Ray Train workers of each trial (trainer.devices, num_nodes=1)
    cpus_per_worker: float | None = None  # trainer.cpus_per_worker
    gpus_per_worker: int | None = None  # 0 (CPU training) or 1 (one GPU per worker)


@dataclass
class MlflowSpec:
    experiment_name: str | None = None  # default: the sweep name
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<sweep dir>/mlflow.db


@dataclass
class SmokeSpec:
    """What `speechlm sweep SPEC --smoke` runs instead: a few trials, a few steps, in `<output_dir>-smoke`."""

    num_samples: int = 2
    overrides: list[str] = field(
        default_factory=lambda: [
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=2",
            "trainer.limit_val_batches=1",
        ]
    )


@dataclass
class SweepSpec:
    """A whole sweep: what `speechlm sweep` receives."""

    name: str = ""  # required: names the sweep dir, the MLflow parent run and (by default) experiment
    base: str = ""  # required: the experiment config every trial starts from
    overrides: list[str] = field(default_factory=list)  # fixed overrides applied to every trial
    search_space: dict[str, ParamSpec] = field(default_factory=dict)
    metric: str = (
        "val_loss"  # a validation metric: val_loss, val_acc, val_wer (SALM), val_txt_bleu, val_text_loss ... (duplex)
    )
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search_alg: SearchAlgSpec = field(default_factory=SearchAlgSpec)
    num_samples: int = 1  # samples drawn; with grid values, the whole grid is repeated num_samples times
    max_concurrent_trials: int | None = None  # default: as many as the cluster's CPUs/GPUs fit
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    time_budget_s: float | None = None  # stop every trial after this many seconds of sweep time
    max_failures: int = 0  # retries of a failed trial (it resumes from its own last checkpoint)
    output_dir: str | None = None  # default: experiments/sweeps/<name>; a local dir or fsspec URL
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)
    smoke: SmokeSpec = field(default_factory=SmokeSpec)


# ------------------------------------------------------------------------------------------ swept params


@dataclass(frozen=True)
class SweptParam:
    """A validated search-space entry. For presets, Tune samples the preset *name*; `value_of` maps it back."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    options: tuple[Any, ...] = ()  # choice/grid: the values, or the preset names
    presets: tuple[tuple[str, Any], ...] = ()  # (name, value) for named presets
    bounds: tuple[float, ...] = ()  # uniform/loguniform/randint/quniform arguments

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "grid")

    def value_of(self, sampled: Any) -> Any:
        """The config value for what Tune sampled (a preset name becomes its value)."""
        return dict(self.presets)[sampled] if self.presets else sampled

    def override(self, sampled: Any) -> str:
        """`key=value` in the override grammar (JSON is valid YAML, so lists and regexes survive)."""
        return f"{self.key}={json.dumps(self.value_of(sampled))}"

    def candidates(self) -> list[Any]:
        """Values to validate before the sweep starts: every option, or the bounds of a range."""
        if self.discrete:
            return list(self.options)
        if self.kind == "randint":
            return [int(self.bounds[0]), int(self.bounds[1]) - 1]
        return [self.bounds[0], self.bounds[1]]


@dataclass
class LoadedSweep:
    """A validated spec plus everything resolved from it, ready for `orchestrator.sweep.run`."""

    spec: SweepSpec
    source: str
    base_path: str  # absolute path of the base config
    fixed_overrides: list[str]  # spec overrides + resources + command-line config overrides (+ smoke)
    base: LoadedConfig  # base + fixed overrides, validated
    params: list[SweptParam]
    sweep_dir: str
    smoke: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def max_steps(self) -> int:
        return self.base.cfg.trainer.max_steps

    def trial_overrides(self, config: dict[str, Any]) -> list[str]:
        """Every override a trial applies to the base config, in order (fixed first, swept last)."""
        return self.fixed_overrides + [p.override(config[p.key]) for p in self.params]

    def trial_config(self, config: dict[str, Any], extra: list[str] | None = None) -> LoadedConfig:
        return load_experiment(self.base_path, self.trial_overrides(config) + list(extra or []))


# ----------------------------------------------------------------------------------------------- loading


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides -> (spec overrides, config overrides).

    An override whose first key is a sweep-spec key (num_samples=8, scheduler.grace_period=100, name=x)
    changes the spec; any other (trainer.max_steps=100, model.lora.r=4) is a fixed config override.
    """
    spec_keys = {f.name for f in dataclasses.fields(SweepSpec)}
    spec, config = [], []
    for override in overrides:
        key = override.lstrip("~+").split("=", 1)[0]
        (spec if key.split(".", 1)[0] in spec_keys else config).append(override)
    return spec, config


def load_sweep(path: str | Path, overrides: list[str] | None = None, smoke: bool = False) -> LoadedSweep:
    """Load, override and validate a sweep spec; raise one ConfigError with every problem."""
    source = str(path)
    if not Path(source).is_file():
        parent = Path(source).parent
        hint = ""
        if parent.is_dir():
            hint = f"; specs in {parent}: {', '.join(sorted(p.name for p in parent.glob('*.yaml'))) or 'none'}"
        raise ConfigError([f"sweep spec {source!r} does not exist{hint}"], source)
    data = read_yaml(source, "sweep spec")
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping (name, base, search_space, metric, ...)"], source)
    try:
        raw = OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise ConfigError([f"cannot read the spec: {exc}"], source) from None
    return sweep_from_omegaconf(raw, overrides or [], source, smoke)


def sweep_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "sweep spec", smoke: bool = False
) -> LoadedSweep:
    """Validate an already-loaded spec dict (tests, programmatic sweeps)."""
    return sweep_from_omegaconf(OmegaConf.create(data), overrides or [], source, smoke)


def sweep_from_omegaconf(raw: DictConfig, overrides: list[str], source: str, smoke: bool) -> LoadedSweep:
    spec_overrides, config_overrides = split_overrides(overrides)
    try:
        apply_overrides(raw, spec_overrides)
        data = OmegaConf.to_container(raw, resolve=True)
    except (OverrideError, OmegaConfBaseException) as exc:
        raise ConfigError([str(exc)], source) from None
    problems: list[str] = []
    warnings: list[str] = []
    if not data.get("search_space"):
        problems.append("search_space: empty; sweep at least one config key, e.g. model.lora.r: {grid: [4, 8]}")
    _check_search_space_shapes(data.get("search_space"), problems)
    spec = build(SweepSpec, data, "", problems)
    if spec is None:
        raise ConfigError(problems, source)
    _check_top_level(spec, problems)
    if smoke:
        spec = smoke_version(spec)
    params = _swept_params(spec, problems)
    base_path = _resolve_base(spec.base, source, problems)
    fixed = list(spec.overrides) + _resource_overrides(spec.resources) + config_overrides
    if smoke:
        fixed += list(spec.smoke.overrides)
    _check_override_conflicts(spec, fixed, problems)
    base = None
    if base_path is not None:
        base = _load_base(base_path, fixed, problems)
    if base is not None:
        _check_candidates(base_path, fixed, params, problems)
        _check_metric(spec, base.cfg, problems)
        _check_scheduler(spec, base.cfg, params, problems)
        warnings += base.warnings
    _check_search_alg(spec, params, problems)
    if problems:
        raise ConfigError(problems, source)
    assert base is not None and base_path is not None
    output = spec.output_dir or f"{DEFAULT_OUTPUT_ROOT}/{spec.name}"
    if smoke:
        output = output.rstrip("/") + "-smoke"
    return LoadedSweep(
        spec=spec,
        source=source,
        base_path=base_path,
        fixed_overrides=fixed,
        base=base,
        params=params,
        sweep_dir=absolute(output),
        smoke=smoke,
        warnings=warnings,
    )


def smoke_version(spec: SweepSpec) -> SweepSpec:
    """The spec `--smoke` runs: smoke.num_samples sampled trials (grids become choices), scheduler times
    back to their defaults (one validation of the smoke config), so every part of the sweep runs in minutes."""
    space = {
        key: dataclasses.replace(entry, choice=entry.grid, grid=None) if entry.grid is not None else entry
        for key, entry in spec.search_space.items()
    }
    scheduler = dataclasses.replace(spec.scheduler, grace_period=None, max_t=None, perturbation_interval=None)
    search_alg = spec.search_alg
    if search_alg.type == "grid":
        search_alg = dataclasses.replace(search_alg, type="random")
    return dataclasses.replace(
        spec, search_space=space, scheduler=scheduler, search_alg=search_alg, num_samples=spec.smoke.num_samples
    )


# ---------------------------------------------------------------------------------------------- checks


def _check_search_space_shapes(space: Any, problems: list[str]) -> None:
    """Friendlier messages than the generic validator for the two common shape mistakes."""
    if not isinstance(space, dict):
        return
    for key, entry in list(space.items()):
        if isinstance(entry, list):
            problems.append(
                f"search_space.{key}: a bare list {_short(entry)}; write {{choice: [...]}} to sample from it "
                "or {grid: [...]} to try every value"
            )
            space.pop(key)
        elif not isinstance(entry, dict):
            problems.append(
                f"search_space.{key}: {_short(entry)} is not a distribution; write one of "
                + ", ".join(f"{{{d}: ...}}" for d in DISTRIBUTIONS)
                + f", or put a fixed value in overrides ({key}={_short(entry)})"
            )
            space.pop(key)


def _check_top_level(spec: SweepSpec, problems: list[str]) -> None:
    if not spec.name:
        problems.append("name: required; it names the sweep directory and the MLflow parent run")
    elif not _NAME.match(spec.name) or name_problem(spec.name):
        problems.append(f"name: {spec.name!r} must be letters, digits, '_', '.', '-' (it is a directory name)")
    if spec.output_dir is not None and (problem := too_broad_problem(spec.output_dir)):
        problems.append(f"output_dir: {problem}; give the sweep a directory of its own (e.g. experiments/sweeps/NAME)")
    if not spec.base:
        problems.append("base: required; the experiment config every trial starts from (e.g. configs/salm.yaml)")
    if spec.num_samples < 1:
        problems.append(f"num_samples: {spec.num_samples} must be at least 1")
    if spec.max_concurrent_trials is not None and spec.max_concurrent_trials < 1:
        problems.append(f"max_concurrent_trials: {spec.max_concurrent_trials} must be at least 1 (or null: auto)")
    if spec.time_budget_s is not None and spec.time_budget_s <= 0:
        problems.append(f"time_budget_s: {spec.time_budget_s} must be positive (or null: no limit)")
    if spec.max_failures < 0:
        problems.append(f"max_failures: {spec.max_failures} must be 0 or more")
    r = spec.resources
    if r.workers is not None and r.workers < 1:
        problems.append(f"resources.workers: {r.workers} must be at least 1")
    if r.cpus_per_worker is not None and r.cpus_per_worker <= 0:
        problems.append(f"resources.cpus_per_worker: {r.cpus_per_worker} must be positive")
    if r.gpus_per_worker not in (None, 0, 1):
        problems.append(
            f"resources.gpus_per_worker: {r.gpus_per_worker} is not supported; Ray Train gives each worker 0 or 1 "
            "GPU; use more resources.workers for more GPUs"
        )
    if spec.smoke.num_samples < 1:
        problems.append(f"smoke.num_samples: {spec.smoke.num_samples} must be at least 1")


def _swept_params(spec: SweepSpec, problems: list[str]) -> list[SweptParam]:
    params = []
    for key, entry in spec.search_space.items():
        path = f"search_space.{key}"
        if problem := schema_key_problem(key):
            problems.append(f"{path}: {problem}")
            continue
        given = [d for d in DISTRIBUTIONS if getattr(entry, d) is not None]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            problems.append(f"{path}: give exactly one of {', '.join(DISTRIBUTIONS)} (got {what})")
            continue
        kind = given[0]
        value = getattr(entry, kind)
        if kind in ("choice", "grid"):
            param = _discrete_param(key, kind, value, f"{path}.{kind}", problems)
        else:
            param = _range_param(key, kind, value, f"{path}.{kind}", problems)
        if param is not None:
            params.append(param)
    return params


def _discrete_param(key: str, kind: str, value: Any, path: str, problems: list[str]) -> SweptParam | None:
    if not value:
        problems.append(f"{path}: no values; give at least one")
        return None
    if isinstance(value, dict):
        return SweptParam(key, kind, options=tuple(value), presets=tuple(value.items()))
    structured = [v for v in value if isinstance(v, (list, dict))]
    if structured:
        problems.append(
            f"{path}: list- or mapping-valued options need names, e.g. "
            f"{kind}: {{first: {_short(structured[0])}, ...}}; the names label trials in tables, plots and MLflow"
        )
        return None
    if len(set(map(json.dumps, value))) != len(value):
        problems.append(f"{path}: {_short(value)} repeats a value")
    return SweptParam(key, kind, options=tuple(value))


def _range_param(key: str, kind: str, value: list[float], path: str, problems: list[str]) -> SweptParam | None:
    arity = 3 if kind == "quniform" else 2
    if len(value) != arity:
        shape = "[low, high, q]" if arity == 3 else "[low, high]"
        problems.append(f"{path}: {_short(value)} must be {shape}")
        return None
    low, high = value[0], value[1]
    bad = False
    if not low < high:
        problems.append(f"{path}: low ({low}) must be below high ({high})")
        bad = True
    if kind == "loguniform" and low <= 0:
        problems.append(f"{path}: low ({low}) must be positive for a log scale")
        bad = True
    if kind == "quniform" and value[2] <= 0:
        problems.append(f"{path}: q ({value[2]}) must be positive")
        bad = True
    if kind == "randint" and high - low < 2:
        problems.append(f"{path}: [{low}, {high}) holds one integer; high is exclusive (as in Ray Tune)")
        bad = True
    return None if bad else SweptParam(key, kind, bounds=tuple(value))


def schema_key_problem(key: str) -> str | None:
    """None when the dotted `key` names a config key of the experiment schema, else what is wrong."""
    return key_problem(ExperimentConfig, key, root="the experiment config")


def _resolve_base(base: str, source: str, problems: list[str]) -> str | None:
    """Like CONFIG on the command line: relative to the launch directory, else to the spec file."""
    if not base:
        return None
    tried = [Path(base), Path(source).parent / base]
    for path in tried:
        if path.is_file():
            return str(path.resolve())
    problems.append(
        f"base: config {base!r} not found (looked in the launch directory and next to the spec: "
        f"{', '.join(str(p) for p in tried)})"
    )
    return None


def _resource_overrides(r: ResourcesSpec) -> list[str]:
    out = []
    if r.workers is not None:
        out += [f"trainer.devices={r.workers}", "trainer.num_nodes=1"]
    if r.cpus_per_worker is not None:
        out.append(f"trainer.cpus_per_worker={r.cpus_per_worker}")
    if r.gpus_per_worker is not None:
        out.append(f"trainer.accelerator={'gpu' if r.gpus_per_worker else 'cpu'}")
    return out


def _check_override_conflicts(spec: SweepSpec, fixed: list[str], problems: list[str]) -> None:
    fixed_keys = {o.lstrip("~+").split("=", 1)[0] for o in fixed}
    for key in spec.search_space:
        if key in fixed_keys:
            problems.append(
                f"search_space.{key}: also set in the fixed overrides (or resources); a swept key cannot be fixed, "
                "remove one of the two"
            )


def _load_base(base_path: str, fixed: list[str], problems: list[str]) -> LoadedConfig | None:
    try:
        return load_experiment(base_path, fixed)
    except ConfigError as exc:
        where = f"base config {base_path}" + (" with the fixed overrides" if fixed else "")
        problems.extend(f"{where}: {p}" for p in exc.problems)
        return None


def _check_candidates(base_path: str, fixed: list[str], params: list[SweptParam], problems: list[str]) -> None:
    """Load the base config with each candidate value of each swept key (the others at the base's values)."""
    labels = {}
    for param in params:
        for candidate in param.candidates():
            label = f"preset {candidate!r}" if param.presets else f"value {_short(candidate)}"
            labels[param.override(candidate)] = (param.key, label)
    for variant, error in load_experiment_variants(base_path, fixed, list(labels)):
        if error is not None:
            key, label = labels[variant]
            problems.extend(f"search_space.{key}: {label}: {p}" for p in error.problems)


def reported_metrics(cfg: ExperimentConfig) -> list[str]:
    """The validation metrics a run of `cfg` reports, overall and per validation set."""
    names = produced_metrics(cfg)
    sets = list(cfg.data.validation_ds.datasets) if cfg.data.validation_ds is not None else []
    return names + [f"{n}_{s}" for s in sets for n in names]


def _check_metric(spec: SweepSpec, cfg: ExperimentConfig, problems: list[str]) -> None:
    if cfg.trainer.async_validation:
        problems.append(
            f"trainer.async_validation: true validates in a task beside training, whose metrics reach the "
            f"checkpoints but not the sweep's scheduler ({spec.metric!r} must arrive with each report); set it "
            "false in the base config or in the sweep's overrides"
        )
    if cfg.data.validation_ds is None:
        problems.append(
            f"metric: {spec.metric!r} comes from validation, but the base config has no data.validation_ds; "
            "add a validation set so trials can be compared and stopped"
        )
        return
    known = reported_metrics(cfg)
    entry = entry_for(cfg.model)
    if spec.metric not in known:
        problems.append(
            f"metric: {spec.metric!r} is not reported by a {entry.name} run; "
            f"choose one of: {', '.join(known)}.{did_you_mean(spec.metric, known)}"
        )
        return
    better = entry.metric_mode(spec.metric)
    if spec.mode != better:
        problems.append(
            f"mode: {spec.mode!r} would rank the worst trial first; {spec.metric} is "
            f"{'lower' if better == 'min' else 'higher'}-is-better, use mode: {better}"
        )


def _check_scheduler(spec: SweepSpec, cfg: ExperimentConfig, params: list[SweptParam], problems: list[str]) -> None:
    s, t = spec.scheduler, cfg.trainer
    if s.type == "asha":
        max_t = s.max_t if s.max_t is not None else t.max_steps
        grace = s.grace_period if s.grace_period is not None else t.val_check_interval
        if grace < 1:
            problems.append(f"scheduler.grace_period: {grace} must be at least 1 step")
        elif grace >= max_t:
            problems.append(
                f"scheduler.grace_period: {grace} steps is not below max_t ({max_t}); ASHA could never stop a "
                "trial early. Lower it (a few validations) or use scheduler.type: fifo"
            )
        if s.max_t is not None and s.max_t > t.max_steps:
            problems.append(f"scheduler.max_t: {s.max_t} exceeds trainer.max_steps ({t.max_steps})")
        if s.reduction_factor <= 1:
            problems.append(f"scheduler.reduction_factor: {s.reduction_factor} must be above 1 (2-4 is usual)")
        if s.brackets < 1:
            problems.append(f"scheduler.brackets: {s.brackets} must be at least 1")
    if s.type == "pbt":
        interval = s.perturbation_interval if s.perturbation_interval is not None else t.val_check_interval
        if interval < t.val_check_interval:
            problems.append(
                f"scheduler.perturbation_interval: {interval} steps is shorter than trainer.val_check_interval "
                f"({t.val_check_interval}); PBT can only act on validations"
            )
        if not 0 < s.quantile_fraction <= 0.5:
            problems.append(f"scheduler.quantile_fraction: {s.quantile_fraction} must be in (0, 0.5]")
        if not 0 <= s.resample_probability <= 1:
            problems.append(f"scheduler.resample_probability: {s.resample_probability} must be in [0, 1]")
        if spec.num_samples < 2 and not any(p.kind == "grid" for p in params):
            problems.append("num_samples: PBT needs a population of at least 2 trials")
        for p in params:
            if p.key.startswith(PBT_FIXED_BY_CHECKPOINT):
                problems.append(
                    f"search_space.{p.key}: PBT copies checkpoints between trials, and this key changes which "
                    "weights exist or are saved (a checkpoint keeps trainable weights only); sweep it with asha "
                    "or fifo, and let PBT mutate keys such as loss weights, dropout or data settings"
                )


# Keys a PBT exploit cannot change: the donor's checkpoint fixes the architecture and which weights it holds.
PBT_FIXED_BY_CHECKPOINT = (
    "model.lora",
    "model.freeze_params",
    "model.prevent_freeze_params",
    "model.perception",
    "model.speech_decoder",
    "model.pretrained_",
    "model.init_from_checkpoint",  # the source of the weights a checkpoint does not hold (frozen ones)
    "model.tokenizer_path",
    "model.model_type",
)


def _check_search_alg(spec: SweepSpec, params: list[SweptParam], problems: list[str]) -> None:
    kind = spec.search_alg.type
    if kind == "grid":
        for p in params:
            if not p.discrete:
                problems.append(
                    f"search_space.{p.key}: {p.kind} is a continuous range; search_alg grid needs choice/grid "
                    "values (or use search_alg random/optuna)"
                )
    if kind == "optuna":
        for p in params:
            if p.kind == "grid":
                problems.append(
                    f"search_space.{p.key}: optuna samples its own points and cannot take grid values; write "
                    "choice instead (or use search_alg grid/random)"
                )
        if spec.scheduler.type == "pbt":
            problems.append("search_alg: optuna cannot drive PBT (PBT mutates configs itself); use random")
        try:
            import optuna  # noqa: F401
        except ImportError:
            problems.append("search_alg: optuna is not installed; pip install optuna, or use random")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 50 else text[:47] + "..."
