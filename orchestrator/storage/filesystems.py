"""Filesystems for local paths and storage URLs, with the object-store settings every Ray process must agree on.

Ray Train (checkpoints) talks to storage through pyarrow, Shar reading through fsspec. Both honour the
standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), but only in the process where it is set:
a Ray worker started before the driver set it, or on a node where it is not set, would go to real AWS instead
of MinIO/Ceph/moto. So the driver turns its environment into explicit objects that travel with the work:

- `pyarrow_filesystem(url)`: for `RunConfig(storage_filesystem=...)`, `Checkpoint(path, filesystem)`, and the
  driver's own listing of checkpoints; pickles with the endpoint and (when set in the env) the credentials.
- `fsspec_options()`: `{protocol: kwargs}` carried in the Ray Data read plan; `read_bytes(url, options)` and
  `fsspec_filesystem(url, options)` use it in the read tasks, in `data inspect` and wherever Shar is listed.

Run directories and checkpoints are read through pyarrow (`exists`, `read_text`, `list_names`), so the driver
sees exactly what Ray Train wrote; data through fsspec.

Without a custom endpoint nothing is spelled out: every process uses its own default credential chain
(instance profile, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS), which is what a real cloud cluster wants.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from orchestrator.storage.paths import is_url, local_path, protocol

S3_PROTOCOLS = ("s3", "s3a")
# botocore's names, service-specific first; pyarrow and s3fs read the same variables in-process.
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")


def s3_endpoint(env: Mapping[str, str] = os.environ) -> str | None:
    """The custom S3 endpoint (MinIO, Ceph, moto), or None for AWS itself."""
    return next((env[k] for k in ENDPOINT_ENV if env.get(k)), None)


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((env[k] for k in names if env.get(k)), None)


def pyarrow_filesystem(path: str, env: Mapping[str, str] = os.environ) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URL.

    An s3:// URL with a custom endpoint gets an S3FileSystem that carries the endpoint, region and (when the
    env has them) the credentials, so it still works after pickling into a process without that env.
    """
    if not is_url(path):
        return pafs.LocalFileSystem(), local_path(path)
    endpoint = s3_endpoint(env)
    if protocol(path) not in S3_PROTOCOLS or endpoint is None:
        return pafs.FileSystem.from_uri(path)
    parsed = urlparse(endpoint)
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme=parsed.scheme or "https",
        region=_first(env, REGION_ENV) or "us-east-1",
        access_key=key if key and secret else None,
        secret_key=secret if key and secret else None,
        session_token=env.get("AWS_SESSION_TOKEN") if key and secret else None,
    )
    return fs, path.split("://", 1)[1].rstrip("/")


def storage_filesystem(path: str) -> tuple[pafs.FileSystem | None, str]:
    """(storage_filesystem, storage_path) for ray.train.RunConfig.

    Local paths stay as they are (None: Ray uses the local filesystem). URLs become an explicit filesystem and
    the path inside it, as RunConfig requires when storage_filesystem is given.
    """
    if not is_url(path):
        return None, path
    return pyarrow_filesystem(path)


def to_url(fs_path: str | None, like: str) -> str | None:
    """A path that Ray reports inside `storage_filesystem` (bucket/run/step=...) as a URL in `like`'s scheme."""
    if fs_path is None or not is_url(like) or is_url(fs_path):
        return fs_path
    return f"{like.split('://', 1)[0]}://{fs_path.lstrip('/')}"


def fsspec_options(env: Mapping[str, str] = os.environ) -> dict[str, dict[str, Any]]:
    """`{protocol: fsspec kwargs}` for object stores configured through the env, e.g. a custom S3 endpoint.

    Empty when nothing is configured: read tasks then use fsspec's defaults on their own node.
    """
    endpoint = s3_endpoint(env)
    if endpoint is None:
        return {}
    s3: dict[str, Any] = {"endpoint_url": endpoint}
    region = _first(env, REGION_ENV)
    if region:
        s3["client_kwargs"] = {"region_name": region}
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        s3.update(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            s3["token"] = env["AWS_SESSION_TOKEN"]
    return {p: dict(s3) for p in S3_PROTOCOLS}


def read_bytes(path: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> bytes:
    """The whole file at a local path or URL; `options` from `fsspec_options()` (None: this process's env)."""
    if not is_url(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    import fsspec

    kwargs = (fsspec_options() if options is None else options).get(protocol(path), {})
    with fsspec.open(path, "rb", **kwargs) as f:
        return f.read()


def fsspec_filesystem(path: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it without a trailing '/') for a local path or URL, with the same
    endpoint and credentials as `read_bytes` (`options` from `fsspec_options()`; None: this process's env)."""
    import fsspec

    kwargs = (fsspec_options() if options is None else options).get(protocol(path), {})
    fs, root = fsspec.core.url_to_fs(local_path(path), **kwargs)
    return fs, root.rstrip("/") or root


# ------------------------------------------------------------------------------ run dirs and checkpoints


def exists(path: str) -> bool:
    fs, inner = pyarrow_filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, inner = pyarrow_filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def is_file(path: str) -> bool:
    fs, inner = pyarrow_filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def read_text(path: str) -> str:
    fs, inner = pyarrow_filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode()


def list_names(directory: str, prefix: str = "", dirs_only: bool = False) -> list[str]:
    """Names of the entries directly in `directory` (sorted; empty when it does not exist)."""
    fs, inner = pyarrow_filesystem(directory)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    return sorted(
        i.base_name
        for i in infos
        if i.base_name.startswith(prefix) and (not dirs_only or i.type == pafs.FileType.Directory)
    )


# ------------------------------------------------------------------------------------- credentials, offline

_EC2_HINTS = (
    ("/sys/devices/virtual/dmi/id/sys_vendor", "Amazon EC2"),  # Nitro instances
    ("/sys/devices/virtual/dmi/id/board_asset_tag", "i-"),
    ("/sys/hypervisor/uuid", "ec2"),  # Xen instances
)


def s3_credentials_visible(env: Mapping[str, str] = os.environ) -> bool:
    """Whether any AWS credential source is visible to this process without touching the network: keys in the
    env, a profile, web identity (EKS), a container role (ECS), the shared files, or an EC2 instance (whose
    profile is asked over the network only when used). False means every S3 request would fail with
    NoCredentialsError, which `speechlm validate` can say before a cluster job does."""
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    sources = (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    )
    if any(env.get(k) for k in sources):
        return True
    files = (env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), env.get("AWS_CONFIG_FILE", "~/.aws/config"))
    if any(os.path.isfile(os.path.expanduser(f)) for f in files):
        return True
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return False
    for path, prefix in _EC2_HINTS:
        try:
            with open(path) as f:
                if f.read().strip().startswith(prefix):
                    return True
        except OSError:
            continue
    return False
