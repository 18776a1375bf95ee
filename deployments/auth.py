"""Optional bearer-token auth: API keys from an environment variable and/or a file.

Keys are read when the ingress starts (in its own process, so on a cluster the variable or file
must exist where the ingress runs). Every comparison runs over all keys in constant time, so a
response's timing says nothing about how much of a key was right.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class AuthConfig(BaseModel):
    """`args.auth`: who may call the API. Off unless keys are configured or `required` is set."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    api_keys_env: str = "MODELFLEET_API_KEYS"
    """Environment variable holding comma-separated keys (read by the ingress at start)."""
    api_keys_file: str | None = None
    """File with one key per line (`#` comments and blank lines ignored)."""
    required: bool = False
    """Refuse to start without at least one key (the GPU and cluster configs set this)."""
    min_key_chars: int = Field(default=16, ge=1)
    """Shortest key accepted; a shorter one is a configuration error, not a weak key."""
    admin_keys_env: str = "MODELFLEET_ADMIN_KEYS"
    """Environment variable holding comma-separated admin keys: they alone open the admin routes (adapters
    and models loaded at run time); without one those routes answer 403. An admin key is also an API key."""
    admin_keys_file: str | None = None
    """File with one admin key per line."""


class AuthConfigError(ValueError):
    """Auth is required but no usable key is configured, or a key file cannot be read."""


def load_keys(config: AuthConfig) -> list[str]:
    keys = _read_keys(config, config.api_keys_env, config.api_keys_file, "api_keys_file", "API")
    if config.required and not keys:
        raise AuthConfigError(
            f"auth.required is set but no API key is configured: set {config.api_keys_env}=<key>[,<key>...] "
            "where Ray starts (the app is built and served in Ray's worker processes, which take the environment "
            "of `ray start` or `serve run`, never that of `serve deploy`; on a cluster see cluster/README.md), "
            "or auth.api_keys_file in serve_config.yaml"
        )
    return keys


def load_admin_keys(config: AuthConfig) -> list[str]:
    """The admin keys (`auth.admin_keys_env` / `auth.admin_keys_file`); none: the admin routes are off."""
    return _read_keys(config, config.admin_keys_env, config.admin_keys_file, "admin_keys_file", "admin")


def _read_keys(config: AuthConfig, variable: str, file: str | None, file_field: str, what: str) -> list[str]:
    keys = [k.strip() for k in os.environ.get(variable, "").split(",") if k.strip()]
    if file:
        try:
            path = Path(file).expanduser()
        except RuntimeError:  # "~user" of no such user: a file that is not there, said as such below
            path = Path(file)
        try:  # utf-8-sig: a file saved "with BOM" (Notepad) would give its first key, or comment, a U+FEFF
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except OSError as exc:
            raise AuthConfigError(f"auth.{file_field} {str(path)!r} cannot be read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise AuthConfigError(f"auth.{file_field} {str(path)!r} is not UTF-8 text (byte {exc.start}: "
                                  f"{exc.reason}); save it as UTF-8, one key per line") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    short = [k for k in keys if len(k) < config.min_key_chars]
    if short:
        raise AuthConfigError(
            f"{len(short)} {what} key(s) are shorter than auth.min_key_chars={config.min_key_chars}; use long random "
            "keys (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return keys


class KeyChecker:
    """Constant-time membership test of a presented key against the configured ones."""

    def __init__(self, keys: list[str], also: list[str] | None = None):
        """`also`: keys accepted as well, which do not turn the check on by themselves (admin keys)."""
        # Digests have one length, so compare_digest's time does not depend on the key lengths.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self._also = [hashlib.sha256(k.encode()).digest() for k in also or []]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization: Bearer <key>` header carries a configured key."""
        if not self.enabled:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).digest()
        ok = False
        for digest in self._digests + self._also:  # no early exit: every key is compared
            ok |= hmac.compare_digest(presented, digest)
        return ok and scheme.lower() == "bearer"
