"""Run directories on local disk or object storage (s3://, gs://, ...), through the same pyarrow filesystem
layer that Ray Train uses, so the driver sees exactly the checkpoints that Ray wrote."""

from __future__ import annotations

import re

import pyarrow.fs as pafs

from orchestrator.object_storage import pyarrow_filesystem

CHECKPOINT_DIR = re.compile(r"^step=(\d+)")


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    # The same filesystem (custom S3 endpoint included) that train.py hands to Ray as storage_filesystem.
    return pyarrow_filesystem(path)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def split_run_dir(run_dir: str) -> tuple[str, str]:
    """(storage_path, name) for ray.train.RunConfig, so that Ray writes into exactly `run_dir`."""
    parent, _, name = run_dir.rstrip("/").rpartition("/")
    return parent or ".", name


def exists(path: str) -> bool:
    fs, inner = _fs(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in `run_dir`, oldest first."""
    fs, inner = _fs(run_dir)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(inner, recursive=False)):
        match = CHECKPOINT_DIR.match(info.base_name)
        if info.type == pafs.FileType.Directory and match:
            complete = fs.get_file_info(_join(info.path, "state.json")).type == pafs.FileType.File
            if complete:
                path = _join(run_dir, info.base_name)
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint (Ray always keeps the latest besides the top-k), or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def read_text(path: str) -> str:
    fs, inner = _fs(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode()


def list_files(directory: str, prefix: str = "") -> list[str]:
    fs, inner = _fs(directory)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    return sorted(_join(directory, i.base_name) for i in infos if i.base_name.startswith(prefix))
