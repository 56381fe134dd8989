"""API keys. Today: the admin key (DPO_API_KEY, or generated into the data directory at first start).
Per-team keys (stored hashed) will be looked up in `authenticate` too; nothing else changes."""
from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from api.settings import Settings

KEY_FILE = "api_key"


@dataclass(frozen=True)
class Principal:
    """Who is calling. The admin sees everything; team principals (later) see only their team's objects."""

    key_id: str
    team_id: str | None = None
    is_admin: bool = False


ADMIN = Principal(key_id="admin", is_admin=True)


def admin_key(settings: Settings) -> tuple[str, bool]:
    """The admin key and whether it was generated just now (so the caller prints it once)."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value(), False
    path = settings.data_dir / KEY_FILE
    if path.exists():
        return path.read_text().strip(), False
    return _generate(path)


def _generate(path: Path) -> tuple[str, bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "dpo-" + secrets.token_urlsafe(32)
    try:
        # O_EXCL: when API and worker start together only one of them writes the key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key, True


def authenticate(presented: str, admin: str) -> Principal | None:
    """The principal a presented key belongs to, or None. Constant-time comparison."""
    if hmac.compare_digest(presented.encode(), admin.encode()):
        return ADMIN
    return None
