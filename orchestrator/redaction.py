"""Credentials never leave the process: the one helper that masks them in everything the project prints or writes.

Applied to `speechlm validate`'s summary, the lines a run or sweep ends with, error messages, MLflow params,
tags and text artifacts, and every config written to disk (checkpoints, best_config.yaml; `config.to_yaml`).
What counts as a credential:
- the password (or token) in a URL's user-info: `https://user:TOKEN@host` -> `https://user:***@host`;
- secret-looking query parameters: `?token=...`, `X-Amz-Signature=...`, `sig=...`;
- AWS access key ids (`AKIA...`, `ASIA...`);
- the value of any secret-named environment variable (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD,
  HF_TOKEN, ...) wherever it appears, e.g. in the object-store options derived from the environment;
- in mappings, the value of a secret-named key (`password`, `secret`, `token`, `key`, `aws_secret_access_key`).

A config written with `***` in it still loads; its consumers (eval logging to the training run's MLflow store)
ask for the credential again instead of using the mask (`is_redacted`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

_SECRET_KEY = re.compile(
    r"^(key|secret|token|password|passwd|pwd|credentials?|authorization|auth)$"
    r"|(^|_)(password|passwd|secret|secret_key|secret_access_key|access_key|access_key_id|api_key|apikey|"
    r"auth_token|access_token|session_token|api_token|bearer_token|refresh_token|private_key)$",
    re.IGNORECASE,
)
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/\s:@]*)(?::(?P<password>[^/\s@]*))?@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&](?:token|access_token|api_key|apikey|key|password|secret|sig|signature|"
    r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential)=)[^&\s#'\"]+",
    re.IGNORECASE,
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_MIN_SECRET_LENGTH = 8  # shorter env values ("1", "true", "testing") would mask ordinary words


def _userinfo(match: re.Match) -> str:
    if match["password"] is not None:
        return f"{match['scheme']}{match['user']}:{REDACTED}@"
    return f"{match['scheme']}{REDACTED}@" if match["user"] else match[0]


def _env_secrets(env: Mapping[str, str]) -> list[str]:
    values = {v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is masked whole


def _current_environ() -> dict[str, str]:
    """A copy of `os.environ` that tolerates another thread unsetting a variable meanwhile (MLflow's telemetry
    thread does: iterating `os.environ` itself then raises KeyError for the vanished name)."""
    values = ((key, os.environ.get(key)) for key in list(os.environ))
    return {key: value for key, value in values if value is not None}


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with every credential it contains replaced by `***` (see the module docstring)."""
    if not text:
        return text
    for secret in _env_secrets(_current_environ() if env is None else env):
        text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(_userinfo, text)
    text = _QUERY_SECRET.sub(lambda m: m["name"] + REDACTED, text)
    return _AWS_KEY_ID.sub(REDACTED, text)


def is_secret_key(name: str) -> bool:
    """Whether a mapping key names a credential (`password`, `aws_secret_access_key`, `token`, ...)."""
    return bool(_SECRET_KEY.search(name))


def redact_data(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """A copy of plain data (dicts, lists, scalars) with secret-named keys masked and every string `redact`ed."""
    if env is None:  # one read of the environment for the whole structure, not one per string
        env = _current_environ()
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact_data(v, env))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(v, env) for v in value)
    if isinstance(value, str):
        return redact(value, env)
    return value


def is_redacted(value: str | None) -> bool:
    """Whether `value` had a credential masked by this module (so it cannot be used as it is)."""
    return bool(value) and REDACTED in str(value)
