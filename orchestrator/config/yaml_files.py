"""Reading the YAML files users hand us (experiment configs, sweep specs): plain data, or one clear error.

Every failure is one line that names the file, the line and what to change: a file too large to be a config,
bytes that are not UTF-8, a tab in the indentation, a Python tag (`!!python/...`: configs hold plain data, and
no tag can construct an object), a YAML syntax error. Parsing uses OmegaConf's own loader (C-accelerated; the
same number and duplicate-key rules as `OmegaConf.load`), with its alias-bomb guard kept on but its absolute
cap of 10,000 nodes lifted: a dataset listed as 6,000 shard URLs per field is a real config, not an attack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.config.errors import ConfigError

MAX_YAML_BYTES = 32 * 1024 * 1024  # ~500,000 shard URLs; a directory per field (shar_path: s3://b/train) has no limit
# OmegaConf refuses documents above this many nodes after alias expansion. Its other guard, aliases expanding a
# document more than 100x, is what stops alias bombs; this bound only has to exceed what MAX_YAML_BYTES can hold.
MAX_YAML_NODES = MAX_YAML_BYTES


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The plain data (dicts, lists, scalars) of the YAML file at `path`; ConfigError naming the problem."""
    source = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(
                [
                    f"the file is {size / 2**20:.0f} MiB; a {what} may be at most {MAX_YAML_BYTES // 2**20} MiB. "
                    "List shards by directory (shar_path: s3://bucket/train) rather than one URL per shard"
                ],
                source,
            )
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read the file ({exc.strerror or exc})"], source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [
                f"line {line}: byte 0x{data[exc.start]:02x} is not UTF-8; save the file as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8 FILE > NEW)"
            ],
            source,
        ) from None
    try:
        return yaml.load(text, Loader=_loader())  # OmegaConf's loader is a SafeLoader: no Python tags
    except yaml.YAMLError as exc:
        raise ConfigError([_describe_yaml_error(exc, text, what)], source) from None


def _loader() -> Any:
    from omegaconf._yaml import get_yaml_loader

    return get_yaml_loader(max_yaml_expanded_nodes=MAX_YAML_NODES)


def _describe_yaml_error(exc: yaml.YAMLError, text: str, what: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = str(getattr(exc, "problem", None) or exc).strip()
    if "could not determine a constructor for the tag" in problem:
        tag = problem.split("for the tag", 1)[1].strip(" '").replace("tag:yaml.org,2002:", "!!")
        return (
            f"{where}the tag {tag!r} is not allowed: a {what} holds plain data (mappings, lists, strings, "
            "numbers), never Python objects; remove the tag"
        )
    if mark is not None and 0 <= mark.index < len(text) and text[mark.index] == "\t":
        return f"{where}a tab character: YAML indents with spaces only; replace the tabs with spaces"
    context = str(getattr(exc, "context", None) or "").strip()
    return f"{where}invalid YAML: {problem}" + (f" ({context})" if context and context != problem else "")
