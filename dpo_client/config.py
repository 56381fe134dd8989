"""Where `dpo` finds the service: DPO_BASE_URL and DPO_API_KEY, else what `dpo login` stored.

The login is kept in the user's config directory (platformdirs: ~/.config/dpo/config.json on Linux), in a
file only its owner may read (mode 0600). A stored key is only ever sent to the URL it was stored with:
pointing DPO_BASE_URL at another service without DPO_API_KEY is an error, not a leak of the key.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs

from dpo_client.errors import ClientError

URL_ENV, KEY_ENV = "DPO_BASE_URL", "DPO_API_KEY"


@dataclass(frozen=True)
class Target:
    """A service to talk to: its base URL (without /v1), the key, and where the key came from."""

    base_url: str
    api_key: str
    key_source: str


def config_path() -> Path:
    return Path(platformdirs.user_config_dir("dpo", appauthor=False)) / "config.json"


def normalize_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all name the same service."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError(f"{url!r} is not an http(s) URL; give the service's address, e.g. http://127.0.0.1:8000")
    return url.removesuffix("/v1")


def stored() -> dict[str, str]:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ClientError(f"cannot read {path} ({err}); run `dpo login URL` again") from None
    return data if isinstance(data, dict) else {}


def target() -> Target:
    """The service and key to use: the environment wins over the stored login."""
    env_url, env_key = os.environ.get(URL_ENV), os.environ.get(KEY_ENV)
    if env_url and env_key:
        return Target(normalize_url(env_url), env_key, KEY_ENV)
    login = stored()
    url = env_url or login.get("base_url")
    if not url:
        raise ClientError(f"no service to talk to: run `dpo login URL`, or set {URL_ENV} and {KEY_ENV}")
    url = normalize_url(url)
    if env_key:
        return Target(url, env_key, KEY_ENV)
    if login.get("api_key") and login.get("base_url") and normalize_url(login["base_url"]) == url:
        return Target(url, login["api_key"], f"stored by `dpo login` in {config_path()}")
    raise ClientError(f"no API key for {url}: run `dpo login {url}`, or set {KEY_ENV}")


def save(base_url: str, api_key: str) -> Path:
    """Store the login, readable by its owner only; written whole or not at all."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when a leftover file had looser bits
        with os.fdopen(fd, "w") as f:
            json.dump({"base_url": base_url, "api_key": api_key}, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def forget() -> bool:
    """Remove the stored login; whether there was one."""
    try:
        config_path().unlink()
    except FileNotFoundError:
        return False
    return True
