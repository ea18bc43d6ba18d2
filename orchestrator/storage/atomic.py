"""Writes that are never seen half done: what the tools write appears under its final name only when complete.

- `write_text` / `write_bytes`: one file, written to a temporary sibling and renamed over the final name.
- `atomic_dir(final)`: a whole directory (a Shar set, an export) built under a hidden sibling
  `.<name>.partial`, with a marker file `.<name>.partial.json` beside it, then renamed into place. A crash
  (kill -9, power loss) leaves only that partial directory: readers do not take it for a finished one
  (`data inspect` names it), and the next run removes it, because the marker says it was ours. An exception
  inside the block removes it at once.

Checkpoints are written by Ray Train's own upload; their completion marker is `storage.checkpoints`' job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
MARKER_SUFFIX = ".json"  # `.<name>.partial.json`, beside the partial dir: who is writing it, for what final name


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (a reader sees the old file or the whole new one, never a prefix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def partial_dir_for(final: str | Path) -> Path:
    """Where `atomic_dir(final)` builds its directory: `.<name>.partial` next to it."""
    final = Path(final)
    return final.parent / f".{final.name}{PARTIAL_SUFFIX}"


def marker_for(partial: str | Path) -> Path:
    """The in-progress marker of a partial directory: `.<name>.partial.json` beside it."""
    partial = Path(partial)
    return partial.parent / f"{partial.name}{MARKER_SUFFIX}"


def is_partial_dir(path: str | Path) -> bool:
    """A directory left by an interrupted `atomic_dir` (its in-progress marker is still beside it)."""
    return Path(path).is_dir() and marker_for(path).is_file()


def _remove_stale_partial(partial: Path) -> None:
    if not partial.exists():
        marker_for(partial).unlink(missing_ok=True)
        return
    if not is_partial_dir(partial):
        raise FileExistsError(
            f"{partial} exists but was not made by speechlm (no {marker_for(partial).name} beside it); move it "
            "away: this command builds its output there before renaming it into place"
        )
    shutil.rmtree(partial)
    marker_for(partial).unlink()


@contextlib.contextmanager
def atomic_dir(
    final: str | Path,
    *,
    merge_into_existing: bool = False,
    last: Callable[[str], bool] | None = None,
    replace: Callable[[str], bool] | None = None,
) -> Iterator[Path]:
    """Yield an empty directory to fill; on success it becomes `final`, on an exception it is removed.

    `final` must not exist or be empty. With `merge_into_existing`, a non-empty `final` (holding other files)
    receives the new entries one by one instead: entries of `final` for which `replace(name)` is true are
    deleted first (only once the new ones are complete), and new entries for which `last(name)` is true are
    moved last (e.g. the cuts manifests of a Shar set, so an interrupted move never shows a whole shard).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a directory; choose another output directory")
    if final.is_dir() and any(final.iterdir()) and not merge_into_existing:
        raise FileExistsError(f"{final} exists and is not empty; choose a new directory or remove it")
    partial = partial_dir_for(final)
    _remove_stale_partial(partial)
    marker = marker_for(partial)
    marker.write_text(
        json.dumps({"final": str(final), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    )
    partial.mkdir()
    try:
        yield partial
        _commit(partial, final, last, replace)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        marker.unlink(missing_ok=True)
        raise
    marker.unlink()


def _commit(
    partial: Path, final: Path, last: Callable[[str], bool] | None, replace: Callable[[str], bool] | None
) -> None:
    if replace is not None and final.is_dir():
        for old in sorted(final.iterdir()):
            if not replace(old.name):
                continue
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if not final.exists():
        os.replace(partial, final)  # atomic: the finished directory appears at once
        return
    names = sorted(os.listdir(partial))
    taken = [n for n in names if (final / n).exists()]
    if taken:
        raise FileExistsError(f"{final / taken[0]} already exists; remove it or choose another output directory")
    for name in sorted(names, key=lambda n: bool(last and last(n))):  # stable: the `last` ones at the end
        os.replace(partial / name, final / name)
    shutil.rmtree(partial)
