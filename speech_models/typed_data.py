"""Typed dataclasses from plain data (YAML, JSON), collecting every problem instead of stopping at the first.

The one place the project walks its typed schemas: experiment configs (`orchestrator.config`), sweep specs
(`orchestrator.sweep.spec`) and exported model directories (`speech_models.pretrained`) are all built by
`build`, and dotted keys (sweep search spaces) are looked up by `key_problem`.

The rules are deliberately small: dataclass fields, `X | None`, `Literal[...]`, `list[X]`, `dict[str, X]`, unions
tried in order, and scalar coercions that YAML and command-line overrides make necessary
(`precision: 32` is the string "32"; `lr=3e-4` arrives as a string and is a float). NaN and infinities are
never valid numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any, Literal, Union

# Returned for a value that failed validation: the dataclass keeps its default for that field, so the object
# is still built and the cross-key checks can run and report their problems in the same pass.
_INVALID = object()


def did_you_mean(name: str, candidates: typing.Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Return `data` converted to `cls` (a dataclass), or None; append a message per problem to `problems`.

    Invalid values fall back to the field's default so that the returned object is still usable for the
    cross-key checks; callers must not use it when `problems` is non-empty.
    """
    result = _convert(cls, data, path, problems)
    return None if result is _INVALID else result


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path, problems)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, path, problems)
    if origin is Literal:
        return _convert_literal(tp, value, path, problems)
    if origin is list:
        return _convert_list(tp, value, path, problems)
    if origin is dict:
        return _convert_dict(tp, value, path, problems)
    return _convert_scalar(tp, value, path, problems)


def _convert_dataclass(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a mapping of {cls.__name__} keys, got {_show(value)}")
        return _INVALID
    types_by_name = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.append(f"{key_path}: unknown key.{did_you_mean(str(key), fields)}")
            continue
        converted = _convert(types_by_name[key], item, key_path, problems)
        if converted is not _INVALID:
            kwargs[key] = converted
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without default
        problems.append(f"{path}: {exc}")
        return _INVALID


def _convert_union(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    options = typing.get_args(tp)
    if value is None:
        if type(None) in options:
            return None
        problems.append(f"{path}: must be set (got null); expected {_describe(tp)}")
        return _INVALID
    # A mapping goes to the dataclass alternative, so its own problems (unknown keys) are reported as such.
    non_none = [o for o in options if o is not type(None)]
    if isinstance(value, dict):
        dataclass_options = [o for o in non_none if dataclasses.is_dataclass(o)]
        if len(dataclass_options) == 1:
            return _convert(dataclass_options[0], value, path, problems)
    for option in non_none:
        scratch: list[str] = []
        converted = _convert(option, value, path, scratch)
        if not scratch:
            return converted
    problems.append(f"{path}: {_show(value)} is not valid; expected {_describe(tp)}")
    return _INVALID


def _convert_literal(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    allowed = typing.get_args(tp)
    for choice in allowed:
        if value == choice or (isinstance(choice, str) and not isinstance(value, bool) and str(value) == choice):
            return choice
    hint = did_you_mean(str(value), [str(a) for a in allowed])
    problems.append(
        f"{path}: {_show(value)} is not allowed; choose one of: {', '.join(str(a) for a in allowed)}.{hint}"
    )
    return _INVALID


def _convert_list(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    (item_type,) = typing.get_args(tp) or (Any,)
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        problems.append(f"{path}: expected a list, got {_show(value)}")
        return _INVALID
    items = [_convert(item_type, item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
    return [item for item in items if item is not _INVALID]


def _convert_dict(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    _, value_type = typing.get_args(tp) or (str, Any)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a mapping, got {_show(value)}")
        return _INVALID
    items = {str(k): _convert(value_type, v, f"{path}.{k}", problems) for k, v in value.items()}
    return {k: v for k, v in items.items() if v is not _INVALID}


def _convert_scalar(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:  # nan, inf, -inf: no setting means that; null means "unset" where allowed
            problems.append(f"{path}: {_show(value)} is not a finite number")
            return _INVALID
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported schema type {tp!r} at {path}")
    problems.append(f"{path}: expected {_describe(tp)}, got {_show(value)}")
    return _INVALID


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(o) for o in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------- dotted keys


def key_problem(cls: type, key: str, root: str = "the config") -> str | None:
    """None when the dotted `key` (e.g. `model.lora.r`) names a key of the dataclass `cls`, else what is wrong.

    `root` names `cls` in messages (e.g. "the experiment config").
    """
    tp: Any = cls
    walked: list[str] = []
    for part in key.split("."):
        tp = _unwrap_for_key(tp, part)
        origin = typing.get_origin(tp)
        if tp is Any:
            return None
        if dataclasses.is_dataclass(tp):
            names = list(_field_types(tp))
            if part not in names:
                prefix = ".".join(walked)
                close = did_you_mean(part, names)
                suggestion = close.split("'")[1] if close else _prefix_match(part, names)
                close = f" Did you mean '{prefix + '.' if prefix else ''}{suggestion}'?" if suggestion else ""
                where = f"'{prefix}' ({tp.__name__})" if prefix else root
                return f"unknown config key '{key}': {where} has no key '{part}'.{close}"
            tp = _field_types(tp)[part]
        elif origin is dict:
            tp = (typing.get_args(tp) or (str, Any))[1]
        elif origin is list:
            if not part.isdigit():
                return f"unknown config key '{key}': '{'.'.join(walked)}' is a list; index it with a number"
            tp = (typing.get_args(tp) or (Any,))[0]
        else:
            return f"unknown config key '{key}': '{'.'.join(walked)}' is a value, it has no key '{part}'"
        walked.append(part)
    return None


def _prefix_match(part: str, names: list[str]) -> str | None:
    """`rank` -> `r`, `max_step` -> `max_steps`: a field the key starts with, or that starts with the key."""
    hits = [n for n in names if part.startswith(n) or n.startswith(part)]
    return max(hits, key=len) if hits else None


def _unwrap_for_key(tp: Any, part: str) -> Any:
    """`X | None` -> X; for other unions the dataclass, or the list when indexed by a number, or the dict."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return tp
    options = [o for o in typing.get_args(tp) if o is not type(None)]
    for option in options:
        if dataclasses.is_dataclass(option):
            return option
    for option in options:
        if typing.get_origin(option) is list and part.isdigit():
            return option
        if typing.get_origin(option) is dict:
            return option
    return options[0] if len(options) == 1 else Any
