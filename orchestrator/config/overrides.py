"""Command-line overrides in Hydra's grammar: `a.b=c` sets, `+a.b=c` adds, `++a.b=c` forces, `~a.b` deletes.

Values are parsed as YAML (`[]`, `[1, 2]`, `null`, `true`, numbers), so `model.freeze_params=[]` and
`trainer.max_steps=1000` mean what they look like. Unknown keys are not rejected here: the schema
validation that follows reports them with a did-you-mean, together with every other problem.
"""

from __future__ import annotations

from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf


class OverrideError(ValueError):
    """An override that cannot be parsed or applied; the message names it."""


def parse_value(text: str) -> Any:
    """YAML-parse an override value; anything YAML rejects stays a plain string."""
    if text == "":
        return ""
    try:
        # OmegaConf's own YAML loader, so an override parses exactly like the same value in a config file
        # (plain PyYAML would read 1e-4 as a string).
        return OmegaConf.to_container(OmegaConf.create(f"value: {text}"))["value"]
    except (yaml.YAMLError, ValueError):
        return text


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply `overrides` to `cfg` in order and return it."""
    for override in overrides:
        _apply_one(cfg, override)
    return cfg


def _apply_one(cfg: DictConfig, override: str) -> None:
    if override.startswith("~"):
        key = override[1:].split("=", 1)[0]
        _delete(cfg, key, override)
        return
    if "=" not in override:
        raise OverrideError(
            f"override {override!r} has no '='; write key=value (e.g. trainer.max_steps=1000), "
            "+key=value to add a key, or ~key to delete one"
        )
    key, raw = override.split("=", 1)
    adding = key.startswith("+")
    key = key.lstrip("+")
    if not key:
        raise OverrideError(f"override {override!r} names no key")
    exists = OmegaConf.select(cfg, key, default=_Absent) is not _Absent
    if adding and exists and not override.startswith("++"):
        raise OverrideError(f"override {override!r}: key {key!r} already exists; drop the '+' to change it")
    OmegaConf.update(cfg, key, parse_value(raw), merge=False, force_add=True)


def _delete(cfg: DictConfig, key: str, override: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise OverrideError(f"override {override!r}: there is no key {key!r} to delete")
    del parent[leaf]


class _Absent:
    pass
