"""What a validated config points at, checked before anything is spent: local data and model paths exist (and
data paths are Shar directories, model directories hold a config.json), a `pretrained_*` value that is not a
local path is a plausible hub id, and object-store URLs are usable from here (the filesystem package is
installed; S3 has credentials). Run by `speechlm validate`, `speechlm train` and `speechlm sweep`, not by
`load_experiment`: the config saved with a checkpoint is also loaded where its training data is not.

The one network call: a hub id that is not in the local Hugging Face cache is looked up on the hub (a metadata
request, nothing downloaded; skipped when HF_HUB_OFFLINE is set, and silent when the hub cannot be reached).
Object storage is checked offline (see `filesystems.s3_credentials_visible`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from orchestrator.config.schema import DatasetConfig, ExperimentConfig
from orchestrator.storage import filesystems
from orchestrator.storage.paths import is_url, local_path, protocol

# Keys of `model` that take a hub id (org/name) or a local path: checked when they cannot be a hub id.
_PRETRAINED_KEYS = ("pretrained_llm", "pretrained_asr", "pretrained_audio_codec", "scoring_asr")


def source_problems(cfg: ExperimentConfig, notes: list[str] | None = None) -> list[str]:
    """Every problem with the data, models and storage that `cfg` names, each naming its key and the fix.
    `notes` receives what could not be checked from here (a hub id offline) and may still fail later."""
    problems: list[str] = []
    notes = [] if notes is None else notes
    for key, ds in _datasets(cfg):
        if ds.shar_path is not None:
            problems += _shar_path_problems(f"{key}.shar_path", ds.shar_path)
        problems += _input_problems(ds.input_cfg, f"{key}.input_cfg")
    for name in _PRETRAINED_KEYS:
        value = getattr(cfg.model, name)
        if isinstance(value, str) and not is_url(value):
            problem, note = model_source_problem(value, needs_config=name != "scoring_asr")
            problems += [f"model.{name}: {problem}"] if problem else []
            notes += [f"model.{name}: {note}"] if note else []
    problems += adapter_width_problems(cfg)
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


def model_source_problem(value: str, needs_config: bool = True) -> tuple[str | None, str | None]:
    """(problem, note) for a `pretrained_*` value: a local directory (with a config.json when `needs_config`) or
    .nemo file, else a hub id that exists (in the local cache, or on the hub when it can be asked)."""
    local = Path(local_path(value)).expanduser()
    if local.is_dir():
        if needs_config and not (local / "config.json").is_file():
            return (
                f"{value!r} is a directory without a config.json, so it is not a Hugging Face model directory; "
                "point at the folder that save_pretrained wrote (config.json, weights, tokenizer)",
                None,
            )
        return None, None
    if local.is_file():
        return (
            (None, None)
            if value.endswith(".nemo") or not needs_config
            else (f"{value!r} is a file, not a model directory", None)
        )
    if _is_local_path(value):
        return f"{value!r} does not exist{_nearest_existing(local)}; fix the path (a hub id looks like org/name)", None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return f"{value!r} is neither an existing path nor a hub id (org/name); fix the path", None
    first = value.split("/", 1)[0]
    if "/" in value and Path(first).is_dir():
        return (
            f"{value!r} does not exist, but ./{first} does: a mistyped local path? (fix it; a hub id whose org is "
            "also a folder here is read as a path)",
            None,
        )
    return hub_id_problem(value)


def adapter_width_problems(cfg: ExperimentConfig) -> list[str]:
    """The modality adapter reads the pretrained encoder's output, so its feat_in must be that encoder's width;
    checked when the encoder's config can be read from here (see `encoder_width`)."""
    m = cfg.model
    adapter = m.perception.modality_adapter
    if adapter is None or not m.pretrained_asr or not m.pretrained_weights or is_url(m.pretrained_asr):
        return []
    own = m.perception.encoder.feat_out
    width = own if own and own > 0 else encoder_width(m.pretrained_asr)
    if width is None or width == adapter.feat_in:
        return []
    return [
        f"model.perception.modality_adapter.feat_in: {adapter.feat_in}, but the encoder of {m.pretrained_asr!r} "
        f"outputs {width} features; set model.perception.modality_adapter.feat_in={width} (`speechlm init-config` "
        "sets it from the encoder)"
    ]


def encoder_width(asr: str) -> int | None:
    """The output width of a pretrained encoder whose config can be read from here (a local dir or .nemo, or a hub
    id in the local Hugging Face cache), else None. Reads configs only, never weights, never the network."""
    from huggingface_hub import try_to_load_from_cache

    local = Path(local_path(asr)).expanduser()
    if not local.exists():
        if _is_local_path(asr):
            return None
        try:
            cached = try_to_load_from_cache(asr, "config.json")
        except Exception:  # not a valid hub id: reported by model_source_problem
            return None
        if not isinstance(cached, str):
            return None
        local = Path(cached).parent  # the cached snapshot: read as a directory, so nothing asks the hub
    try:
        from speech_models.perception import load_pretrained_asr

        encoder = load_pretrained_asr(str(local), with_weights=False).encoder
    except Exception:  # not an encoder this project reads: building the model names the problem
        return None
    return int(encoder["feat_out"]) if encoder.get("feat_out", -1) > 0 else int(encoder["d_model"])


def _nearest_existing(path: Path) -> str:
    parent = next((p for p in path.parents if p.exists()), None)
    return f" (the nearest existing directory is {parent})" if parent and str(parent) not in (".", "/") else ""


def hub_id_problem(repo_id: str) -> tuple[str | None, str | None]:
    """(problem, note) for a syntactically valid hub id: fine when cached; offline, a note that it cannot be
    checked; online, a problem when the hub says there is no such (or no visible) repository."""
    import os

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None, None
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in _OFFLINE_ENV)
    if offline:
        return None, (
            f"{repo_id!r} is not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
            "the workers will fail to load it unless their machines have it cached; give a local directory"
        )
    if hub_says_exists(repo_id) is False:
        return (
            f"{repo_id!r} is not a local path and the Hugging Face hub has no such model (or it is private: log in "
            "with `hf auth login` or set HF_TOKEN); fix the path or the hub id",
            None,
        )
    return None, None


_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@functools.lru_cache(maxsize=64)
def hub_says_exists(repo_id: str, timeout: float = 5.0) -> bool | None:
    """True/False as the hub answers (a gated repo exists); None when it cannot be asked (no network, a proxy).
    Asked once per process: a sweep checks the same base config for every trial."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo_id, timeout=timeout)
    except GatedRepoError:
        return True
    except RepositoryNotFoundError:
        return False
    except Exception:  # no network, DNS, proxy, rate limit: the workers will say, later
        return None
    return True


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
