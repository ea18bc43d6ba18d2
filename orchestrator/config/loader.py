"""YAML + overrides -> one validated `ExperimentConfig`, or a `ConfigError` listing every problem.

The steps, in order: load YAML, apply command-line overrides, resolve `${...}` interpolation key by key
(so one broken reference does not hide the rest), translate NeMo spellings, type every value against the
schema, then run the cross-key checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from orchestrator.config.checks import check_experiment
from orchestrator.config.errors import ConfigError
from orchestrator.config.nemo_compat import apply_nemo_compat
from orchestrator.config.overrides import OverrideError, apply_overrides
from orchestrator.config.schema import ExperimentConfig
from speech_models.typed_data import build


@dataclass
class LoadedConfig:
    """A validated experiment config plus the non-fatal notes gathered while loading it."""

    cfg: ExperimentConfig
    source: str
    warnings: list[str] = field(default_factory=list)


def find_config_file(config: str | None, config_path: str | None = None, config_name: str | None = None) -> Path:
    """Resolve `CONFIG` or NeMo's `--config-path DIR --config-name NAME` to a YAML file."""
    if config and (config_path or config_name):
        raise ConfigError(["give either CONFIG or --config-path/--config-name, not both"], "command line")
    if not config:
        if not config_name:
            raise ConfigError(["no config given; pass CONFIG.yaml or --config-path DIR --config-name NAME"], "args")
        name = config_name if config_name.endswith((".yaml", ".yml")) else f"{config_name}.yaml"
        config = str(Path(config_path or ".") / name)
    path = Path(config)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            options = sorted(p.name for p in path.parent.glob("*.yaml"))
            hint = f"; YAML files in {path.parent}: {', '.join(options) or 'none'}"
        raise ConfigError([f"config file {str(path)!r} does not exist{hint}"], str(path))
    return path


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> LoadedConfig:
    """Load, override, resolve and validate one experiment config."""
    source = str(path)
    try:
        raw = OmegaConf.load(source)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError([f"cannot read YAML: {exc}"], source) from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(["the top level must be a mapping with model/trainer/exp_manager/data"], source)
    return experiment_from_omegaconf(raw, overrides or [], source)


def experiment_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "config"
) -> LoadedConfig:
    """Validate an already-loaded config dict (e.g. the resolved config saved in a checkpoint)."""
    return experiment_from_omegaconf(OmegaConf.create(data), overrides or [], source)


def experiment_from_omegaconf(raw: DictConfig, overrides: list[str], source: str) -> LoadedConfig:
    try:
        apply_overrides(raw, overrides)
    except (OverrideError, OmegaConfBaseException) as exc:
        raise ConfigError([str(exc)], source) from None
    problems: list[str] = []
    warnings: list[str] = []
    plain = _resolve(raw, _with_schema_defaults(raw), "", problems)
    plain = apply_nemo_compat(plain, problems, warnings)
    cfg = build(ExperimentConfig, plain, "", problems)
    if cfg is not None:
        check_experiment(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    return LoadedConfig(cfg=cfg, source=source, warnings=warnings)


def _with_schema_defaults(raw: DictConfig) -> DictConfig:
    """The user's config laid over the schema defaults, so `${name}` or `${data.target_sample_rate}` resolve
    even when the user's YAML leaves those keys to their defaults (NeMo's documented snippets do)."""
    return OmegaConf.merge(OmegaConf.create(to_dict(ExperimentConfig())), raw)


def _resolve(user: Any, merged: Any, path: str, problems: list[str]) -> Any:
    """Plain data with the user's keys only, each value read (and interpolated) from `merged`, one key at a
    time so that one broken reference does not hide the others."""
    if isinstance(user, DictConfig) and isinstance(merged, DictConfig):
        out = {}
        for key in user:
            key_path = f"{path}.{key}" if path else str(key)
            value = _get(merged, key, key_path, problems)
            out[str(key)] = _resolve(user._get_node(key), value, key_path, problems)
        return out
    if isinstance(merged, ListConfig):
        return [
            _resolve(None, _get(merged, i, f"{path}[{i}]", problems), f"{path}[{i}]", problems)
            for i in range(len(merged))
        ]
    if isinstance(merged, DictConfig):  # a list item or a dict the user gave whole: keep every key
        return _resolve(merged, merged, path, problems)
    return merged


def _get(node: DictConfig | ListConfig, key: Any, key_path: str, problems: list[str]) -> Any:
    try:
        return node[key]
    except MissingMandatoryValue:
        problems.append(f"{key_path}: is required ('???' in the config); set it in the YAML or as {key_path}=VALUE")
    except OmegaConfBaseException as exc:
        reason = str(exc).splitlines()[0]
        problems.append(f"{key_path}: cannot resolve interpolation ({reason})")
    return None


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The plain-data form of a validated config (for YAML, MLflow params and checkpoints)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML that `speechlm train` accepts back unchanged."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists stay values (MLflow params, sweep keys)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, key_path))
        else:
            out[key_path] = value
    return out
