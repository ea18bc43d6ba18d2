"""Local paths and storage URLs: one rule for telling them apart, joining and normalising them.

A URL is anything with a scheme (`s3://bucket/x`, `gs://...`, `http://...`) except `file://`, which is a local
path written as a URL: `file:///data/x` and `/data/x` are the same place everywhere in this project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FILE_SCHEME = "file://"


def is_url(path: str) -> bool:
    """True for object-store and other fsspec/pyarrow URLs (s3://bucket/x), False for local paths and file://."""
    return "://" in path and not path.startswith(FILE_SCHEME)


def protocol(path: str) -> str:
    """`s3` for s3://..., `file` for local paths."""
    return path.split("://", 1)[0].lower() if is_url(path) else "file"


def local_path(path: str) -> str:
    """A local path without its `file://` prefix (URLs pass through unchanged)."""
    return path.removeprefix(FILE_SCHEME)


def join(base: str, name: str) -> str:
    """`base/name` for a local directory or a URL (URLs always use '/')."""
    if is_url(base):
        return f"{base.rstrip('/')}/{name}"
    return str(Path(local_path(base)) / name)


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working directory); URLs unchanged."""
    if is_url(path):
        return path
    return str(Path(local_path(path)).expanduser().resolve())


def absolute_if_exists(value: Any) -> Any:
    """Like `absolute` for a local path that exists here (a hub id such as `org/model` does not); lists
    item by item; anything else unchanged."""
    if isinstance(value, list):
        return [absolute_if_exists(v) for v in value]
    if isinstance(value, str) and not is_url(value) and Path(local_path(value)).exists():
        return absolute(value)
    return value


def too_broad_problem(path: str) -> str | None:
    """Why `path` is no place for a run or a sweep to write into (a filesystem root, the home directory, a
    bucket's root), or None. Run and sweep dirs get checkpoints, databases and result files written into them."""
    if is_url(path):
        bucket_and_key = path.split("://", 1)[1].strip("/")
        if "/" not in bucket_and_key:
            return f"{path!r} is the root of a bucket (use a prefix inside it, e.g. {path.rstrip('/')}/runs/<name>)"
        return None
    resolved = Path(absolute(path))
    if resolved == Path(resolved.anchor):
        return f"{path!r} is the root of the filesystem"
    if resolved == Path.home().resolve():
        return f"{path!r} is your home directory"
    return None
