"""Config: YAML with NeMo speechlm2 keys + command-line overrides -> one validated ExperimentConfig."""

from orchestrator.config.errors import ConfigError
from orchestrator.config.loader import (
    LoadedConfig,
    experiment_from_dict,
    find_config_file,
    flatten,
    load_experiment,
    to_dict,
    to_yaml,
)
from orchestrator.config.schema import DataConfig, DatasetConfig, ExperimentConfig, TrainerConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "ExperimentConfig",
    "LoadedConfig",
    "TrainerConfig",
    "experiment_from_dict",
    "find_config_file",
    "flatten",
    "load_experiment",
    "to_dict",
    "to_yaml",
]
