"""What a validated config points at, checked before anything is spent: local data and model paths exist (and
data paths are Shar directories), and object-store URLs are usable from here (the filesystem package is
installed; S3 has credentials). Run by `speechlm validate`, `speechlm train` and `speechlm sweep`, not by
`load_experiment`: the config saved with a checkpoint is also loaded where its training data is not.

Offline only: nothing here opens a network connection (see `filesystems.s3_credentials_visible`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config.schema import DatasetConfig, ExperimentConfig
from orchestrator.storage import filesystems
from orchestrator.storage.paths import is_url, local_path, protocol

# Keys of `model` that take a hub id (org/name) or a local path: checked when they cannot be a hub id.
_PRETRAINED_KEYS = ("pretrained_llm", "pretrained_asr", "pretrained_audio_codec", "scoring_asr")


def source_problems(cfg: ExperimentConfig) -> list[str]:
    """Every problem with the data, models and storage that `cfg` names, each naming its key and the fix."""
    problems: list[str] = []
    for key, ds in _datasets(cfg):
        if ds.shar_path is not None:
            problems += _shar_path_problems(f"{key}.shar_path", ds.shar_path)
        problems += _input_problems(ds.input_cfg, f"{key}.input_cfg")
    for name in _PRETRAINED_KEYS:
        value = getattr(cfg.model, name)
        if isinstance(value, str) and _is_local_path(value) and not Path(local_path(value)).expanduser().exists():
            problems.append(
                f"model.{name}: {value!r} does not exist (a local path; a hub id looks like org/name); fix the path"
            )
    for key in ("explicit_log_dir", "exp_dir"):
        value = getattr(cfg.exp_manager, key)
        if value and is_url(value) and (problem := url_problem(value)):
            problems.append(f"exp_manager.{key}: {problem}")
    return problems


def _input_problems(entries: list, key: str) -> list[str]:
    from orchestrator.data.lhotse_manifest import is_cuts_manifest

    problems: list[str] = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if entry.shar_path is not None:
            problems += _shar_path_problems(f"{where}.shar_path", entry.shar_path)
        if entry.cuts_path is not None:
            first = entry.cuts_path[0] if isinstance(entry.cuts_path, list) and entry.cuts_path else entry.cuts_path
            if isinstance(first, str) and is_cuts_manifest(first):
                problems += _files_problems(f"{where}.cuts_path", entry.cuts_path)
            else:
                problems += _shar_path_problems(f"{where}.cuts_path", entry.cuts_path)
        for name in ("manifest_filepath", "tarred_audio_filepaths", "paths"):
            if getattr(entry, name) is not None:
                problems += _files_problems(f"{where}.{name}", getattr(entry, name))
        if entry.input_cfg:
            problems += _input_problems(entry.input_cfg, f"{where}.input_cfg")
    return problems


def _files_problems(key: str, spec: Any) -> list[str]:
    """Manifest, tar or text files in NeMo's notation (a path, a brace pattern, a list, [path, weight] pairs):
    the first one missing is reported (a list of 6,000 missing shards is one mistake)."""
    from orchestrator.data.nemo_manifest import expand_paths

    items = spec if isinstance(spec, list) else [spec]
    flat = []
    for item in items:
        item = item[0] if isinstance(item, list) and item else item  # [path, weight] or [tar path]
        flat.append(str(item))
    try:
        paths = expand_paths(flat)
    except ValueError as exc:
        return [f"{key}: {exc}"]
    for path in paths:
        if problem := _shard_file_problem(path):
            more = f" (and maybe others of its {len(paths)} files)" if len(paths) > 1 else ""
            return [f"{key}: {problem}{more}"]
    return []


def _datasets(cfg: ExperimentConfig) -> list[tuple[str, DatasetConfig]]:
    out = [("data.train_ds", cfg.data.train_ds)]
    val = cfg.data.validation_ds
    if val is not None:
        if val.datasets:
            out += [(f"data.validation_ds.datasets.{n}", ds) for n, ds in val.datasets.items()]
        else:
            out.append(("data.validation_ds", val))
    return out


def _is_local_path(value: str) -> bool:
    if is_url(value):
        return False
    return value.startswith(("/", "./", "../", "~", "file://")) or value.count("/") >= 2 or value.endswith(".nemo")


def _shar_path_problems(key: str, value: Any) -> list[str]:
    """`shar_path` in any documented form: a dir or URL, a list of them or of [dir, weight] pairs, or
    {field: [shard paths]}."""
    if isinstance(value, dict):
        problems = []
        for field, paths in value.items():
            for path in paths if isinstance(paths, list) else [paths]:
                if problem := _shard_file_problem(str(path)):
                    problems.append(f"{key}.{field}: {problem}")
                    break  # one per field: a list of 6,000 missing files is one mistake
        return problems
    if isinstance(value, list):
        out: list[str] = []
        for i, entry in enumerate(value):
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], (int, float)):
                entry = entry[0]
            out += _shar_path_problems(f"{key}[{i}]", entry)
        return out
    path = str(value)
    if is_url(path):
        return [f"{key}: {problem}"] if (problem := url_problem(path)) else []
    return [f"{key}: {problem}"] if (problem := _shar_dir_problem(path)) else []


def _shar_dir_problem(path: str) -> str | None:
    from orchestrator.data.shar import SharLayoutError, find_shar_dirs, list_fields

    local = Path(local_path(path)).expanduser()
    if not local.exists():
        parent = next((p for p in local.parents if p.exists()), None)
        return f"{path!r} does not exist" + (f" (the nearest existing directory is {parent})" if parent else "")
    if not local.is_dir():
        return f"{path!r} is a file; give the Shar directory that holds cuts.NNNNNN.jsonl.gz and the .tar shards"
    try:
        has_cuts = "cuts" in list_fields(path)
    except SharLayoutError as exc:
        return str(exc)
    if not has_cuts:
        below = find_shar_dirs(path)[:3]
        hint = f"; Shar directories below it: {', '.join(below)}" if below else ""
        return f"{path!r} holds no cuts.NNNNNN.jsonl.gz, so it is not a Lhotse Shar directory{hint}"
    return None


def _shard_file_problem(path: str) -> str | None:
    if is_url(path):
        return url_problem(path)
    local = Path(local_path(path)).expanduser()
    if not local.is_file():
        return f"{path!r} is not a file" if local.exists() else f"{path!r} does not exist"
    return None


def url_problem(url: str) -> str | None:
    """Why `url` cannot be read from here (no filesystem package for its scheme, no S3 credentials), or None."""
    import fsspec

    scheme = protocol(url)
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        return f"{url!r}: no filesystem for {scheme}:// is installed ({exc}); for s3:// pip install -e '.[s3]'"
    if scheme in filesystems.S3_PROTOCOLS and not filesystems.s3_credentials_visible():
        return (
            f"{url!r} is on S3 but this machine has no AWS credentials (none of AWS_ACCESS_KEY_ID + "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials, web identity, or an EC2 instance profile); "
            "set them (for MinIO/Ceph also AWS_ENDPOINT_URL)"
        )
    return None
