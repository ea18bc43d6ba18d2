"""YAML + overrides -> one validated `ExperimentConfig`, or a `ConfigError` listing every problem.

The steps, in order: load YAML (`yaml_files`), apply command-line overrides, resolve `${...}` interpolation key
by key (so one broken reference does not hide the rest), translate NeMo spellings, type every value against the
schema, then run the cross-key checks. There is no size limit below what real datasets need: long lists of
shard URLs skip OmegaConf, and `yaml_files` lifts OmegaConf's 10,000-node cap.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from orchestrator.config.checks import check_experiment, run_length_warnings
from orchestrator.config.errors import ConfigError
from orchestrator.config.nemo_compat import apply_nemo_compat
from orchestrator.config.overrides import OverrideError, apply_overrides, parse_value
from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.yaml_files import read_yaml
from orchestrator.redaction import redact_data
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
    return experiment_from_dict(read_yaml(path, "config"), overrides, str(path))


def experiment_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "config"
) -> LoadedConfig:
    """Validate an already-loaded config dict (e.g. the resolved config saved in a checkpoint)."""
    plain, problems, _ = _resolve_config(data, overrides or [], source)
    return _validated(plain, problems, source)


def load_experiment_variants(
    path: str | Path, overrides: list[str], variants: Sequence[str]
) -> Iterator[tuple[str, ConfigError | None]]:
    """(variant, its ConfigError or None) for each `key=value` in `variants`, each applied alone after `overrides`:
    what loading the config with `[*overrides, variant]` would report, computed without re-reading the file.

    A sweep validates every candidate value this way (a 1,500-value grid in seconds). A variant whose key takes
    part in an interpolation (`max_steps: ${trainer.max_steps}`) goes through the whole load.
    """
    source = str(path)
    data = read_yaml(path, "config")
    base, base_problems, references = _resolve_config(copy.deepcopy(data), overrides, source)
    for variant in variants:
        key, _, text = variant.partition("=")
        plain = None
        if not base_problems and not _touches(key, references) and "${" not in text and "???" not in text:
            plain = _with_value(copy.deepcopy(base), key, parse_value(text))
        try:
            if plain is None:
                experiment_from_dict(copy.deepcopy(data), [*overrides, variant], source)
            else:
                _validated(plain, [], source)
        except ConfigError as exc:
            yield variant, exc
        else:
            yield variant, None


def _resolve_config(data: Any, overrides: list[str], source: str) -> tuple[Any, list[str], set[str] | None]:
    """(plain data with overrides applied and interpolations resolved, problems so far, the keys interpolations
    refer to (None: some reference cannot be told statically)). Long lists of plain values (shard URLs) bypass
    OmegaConf, which would spend a minute on 600,000 of them and has nothing to resolve in them."""
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping with model/trainer/exp_manager/data"], source)
    data, stash = _stash_long_lists(data, overrides)
    try:
        raw = OmegaConf.create(data)
        apply_overrides(raw, overrides)
    except (OverrideError, OmegaConfBaseException) as exc:
        raise ConfigError([str(exc)], source) from None
    problems: list[str] = []
    plain = _resolve(raw, _with_schema_defaults(raw), "", problems)
    return _unstash(plain, stash), problems, _interpolation_targets(OmegaConf.to_container(raw, resolve=False))


def _validated(plain: Any, problems: list[str], source: str) -> LoadedConfig:
    """NeMo spellings translated, every value typed against the schema, the cross-key checks run."""
    warnings: list[str] = []
    plain = apply_nemo_compat(plain, problems, warnings)
    cfg = build(ExperimentConfig, plain, "", problems)
    if cfg is not None:
        check_experiment(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    return LoadedConfig(cfg=cfg, source=source, warnings=warnings + run_length_warnings(cfg))


# ------------------------------------------------------------------------------------------ long lists


_LONG_LIST = 256  # items: shorter lists go through OmegaConf like everything else
_TOKEN = "__speechlm_long_list_{}__"


def _stash_long_lists(data: Any, overrides: list[str]) -> tuple[Any, list[list[Any]]]:
    """`data` with every long list of plain values replaced by a token, unless an override or an interpolation
    reaches into it."""
    references = _interpolation_targets(data)
    if references is None:
        return data, []  # some reference cannot be told statically: leave every list to OmegaConf
    targets = [o.lstrip("~+").split("=", 1)[0] for o in overrides] + sorted(references)
    stash: list[list[Any]] = []

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if not isinstance(value, list):
            return value
        plain = all(v is None or isinstance(v, (str, int, float, bool)) for v in value)
        if (
            len(value) >= _LONG_LIST
            and plain
            and not any(isinstance(v, str) and "${" in v for v in value)
            and not any(t.startswith(path + ".") for t in targets)
        ):
            stash.append(value)
            return _TOKEN.format(len(stash) - 1)
        return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]

    return walk(data, ""), stash


def _unstash(value: Any, stash: list[list[Any]]) -> Any:
    if not stash:
        return value
    if isinstance(value, dict):
        return {k: _unstash(v, stash) for k, v in value.items()}
    if isinstance(value, list):
        return [_unstash(v, stash) for v in value]
    if isinstance(value, str) and value.startswith("__speechlm_long_list_") and value.endswith("__"):
        index = value[len("__speechlm_long_list_") : -2]
        if index.isdigit() and int(index) < len(stash):
            return list(stash[int(index)])
    return value


# ------------------------------------------------------------------------------------------ variants


_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


def _interpolation_targets(data: Any) -> set[str] | None:
    """The keys that `${...}` interpolations in `data` refer to; None when one cannot be told (relative,
    nested or custom-resolver references), which sends every variant through the whole load."""
    found: set[str] = set()
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and "${" in value:
            inner = _INTERPOLATION.findall(value)
            if value.count("${") != len(inner):
                return None  # nested interpolation
            for ref in inner:
                if ref.startswith("oc.env:"):
                    continue
                if ref.startswith(".") or ":" in ref:
                    return None
                found.add(ref.strip())
    return found


def _touches(key: str, references: set[str] | None) -> bool:
    """Whether changing `key` can change a value that an interpolation computes."""
    if references is None:
        return True
    return any(r == key or r.startswith(key + ".") or key.startswith(r + ".") for r in references)


def _with_value(plain: Any, key: str, value: Any) -> Any:
    """`plain` with the dotted `key` set to `value` (as an override would); None when the key runs through
    something that is not a mapping or an in-range list index (the caller then does the whole load)."""
    parts = key.lstrip("+").split(".")
    node = plain
    for part in parts[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    last = parts[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    else:
        return None
    return plain


def _with_schema_defaults(raw: DictConfig) -> DictConfig:
    """The user's config laid over the schema defaults, so `${name}` or `${data.target_sample_rate}` resolve
    even when the user's YAML leaves those keys to their defaults (NeMo's documented snippets do)."""
    return OmegaConf.merge(_schema_defaults(), raw)


@functools.cache
def _schema_defaults() -> DictConfig:
    return OmegaConf.create(to_dict(ExperimentConfig()))  # merge copies it: never changed in place


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
    """The resolved config as YAML that `speechlm train` accepts back, with credentials masked (`redaction`):
    every config the project writes (checkpoints, MLflow artifacts, best_config.yaml) goes through here."""
    data = redact_data(to_dict(cfg))
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


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
