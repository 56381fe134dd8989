"""What the API writes to its logs holds no secret. Headers and bodies are never logged; a request's
target is logged with every query value withheld (a careless client sends its key as `?api_key=`), and
a path segment or query name that looks like a key is withheld too. Text that may quote a request (an
internal error's traceback) has every key-shaped string, the admin key and the caller's own key masked.
"""
from __future__ import annotations

import logging
import re

WITHHELD = "***"
# A team key (service.db.teams: `dpo-sk-` + 43 characters) or a generated admin key (service.auth: `dpo-` + 43).
KEY_SHAPED = re.compile(r"dpo-[A-Za-z0-9_-]{20,}")
# What a logged target keeps: path segments that are route words (`v1`, `fine_tuning`) or ids
# (`ftjob-01a2...`), and query names that are words. No key the service makes has either shape.
_SEGMENT = re.compile(r"[a-z0-9_.]{0,32}|[a-z]+-[0-9a-f]{1,64}")
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,31}")


def safe_target(target: str, *secrets: str) -> str:
    """`/v1/files/<junk>?api_key=dpo-sk-...&limit=5` -> `/v1/files/***?api_key=***&limit=***`; any of
    `secrets` (the admin key) left after that is masked too."""
    path, sep, query = target.partition("?")
    path = "/".join(segment if _SEGMENT.fullmatch(segment) else WITHHELD for segment in path.split("/"))
    if sep:
        path += "?" + "&".join(_safe_pair(pair) for pair in query.split("&"))
    return scrub(path, *secrets)


def _safe_pair(pair: str) -> str:
    name, has_value, _ = pair.partition("=")
    name = name if _NAME.fullmatch(name) else WITHHELD
    return f"{name}={WITHHELD}" if has_value else name


def scrub(text: str, *secrets: str | None) -> str:
    """`text` with every key-shaped string and each of `secrets` (the admin key, the caller's key) masked.
    A "secret" under 8 characters (a wrong key, mistyped) is left: masking it would mask ordinary words."""
    for secret in sorted((s for s in secrets if s and len(s) >= 8), key=len, reverse=True):
        text = text.replace(secret, WITHHELD)
    return KEY_SHAPED.sub(WITHHELD, text)


class AccessLogFilter(logging.Filter):
    """Rewrites uvicorn's access-log records (args: client, method, target, HTTP version, status) so the
    target is safe_target's, with the admin keys of the apps this process serves masked too."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], safe_target(args[2], *self.secrets), *args[3:])
        return True


def install_access_log_filter(admin_key: str) -> None:
    """On uvicorn's access logger, once per process (each `dpo-service api` process builds its app)."""
    logger = logging.getLogger("uvicorn.access")
    found = next((f for f in logger.filters if isinstance(f, AccessLogFilter)), None)
    if found is None:
        found = AccessLogFilter()
        logger.addFilter(found)
    found.secrets.add(admin_key)
