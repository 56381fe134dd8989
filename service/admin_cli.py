"""`dpo-service admin ...`: the admin API (teams, keys, usage, the pool) from a terminal, over HTTP.

It talks to a running service like any client, so it works from any machine that reaches the API, and
every check the API makes (validation, conflicts, the admin key) applies unchanged. The key is
--key, else $DPO_API_KEY, else the key generated into the data directory. Answers print as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import httpx

from service.auth import KEY_FILE
from service.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8000"
SWEEP_TIMEOUT_S = 3600


def add_parser(commands) -> None:
    admin = commands.add_parser("admin", help="manage teams, keys and usage through a running service")
    admin.add_argument("--url", default=os.environ.get("DPO_URL", DEFAULT_URL), help="default: $DPO_URL or %(default)s")
    admin.add_argument("--key", help="admin key; default: $DPO_API_KEY or the one in the data directory")
    admin.add_argument("--data-dir", help="where a generated admin key is kept (default: $DPO_DATA_DIR)")
    what = admin.add_subparsers(dest="admin_command", required=True)

    teams = what.add_parser("teams", help="teams").add_subparsers(dest="action", required=True)
    teams.add_parser("list", help="every team")
    create = teams.add_parser("create", help="a new team")
    create.add_argument("name")
    _limits(create)
    teams.add_parser("show", help="one team").add_argument("team_id")
    update = teams.add_parser("update", help="rename a team or change its limits ('none' removes one)")
    update.add_argument("team_id")
    update.add_argument("--name")
    _limits(update)
    teams.add_parser("delete", help="delete a team without unfinished jobs").add_argument("team_id")

    keys = what.add_parser("keys", help="a team's API keys").add_subparsers(dest="action", required=True)
    make = keys.add_parser("create", help="a new key (printed once)")
    make.add_argument("team_id")
    make.add_argument("--name", help="a label for the key")
    keys.add_parser("list", help="a team's keys (never their secrets)").add_argument("team_id")
    revoke = keys.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("team_id")
    revoke.add_argument("key_id")

    usage = what.add_parser("usage", help="GPU-seconds, jobs and trained tokens of every team")
    usage.add_argument("--since", type=float, help="Unix seconds")
    usage.add_argument("--until", type=float, help="Unix seconds")
    what.add_parser("pool", help="the workers and the queues")
    sweep = what.add_parser("sweep", help="remove stored objects no row names (older than DPO_SWEEP_MIN_AGE_S)")
    sweep.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")


def run(args, settings: Settings) -> int:
    """Do one admin command; print the answer (JSON) and return the exit status."""
    key = args.key or _stored_key(settings)
    if not key:
        print("dpo-service admin: no admin key: pass --key or set DPO_API_KEY", file=sys.stderr)
        return 2
    method, path, body, params = _request(args)
    try:
        # A sweep lists the whole store: it may take minutes on a large bucket.
        timeout = SWEEP_TIMEOUT_S if args.admin_command == "sweep" else 30
        with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as client:
            r = client.request(method, path, json=body, params=params)
    except httpx.HTTPError as err:
        print(f"dpo-service admin: cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    if r.status_code >= 400:
        message = r.json().get("error", {}).get("message") if _is_json(r) else r.text
        print(f"dpo-service admin: {r.status_code}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(r.json(), indent=2))
    if args.admin_command == "keys" and args.action == "create":
        print("Keep this key now: the service stores only its hash and cannot show it again.", file=sys.stderr)
    return 0


def _request(args) -> tuple[str, str, dict | None, dict | None]:
    teams = "/v1/admin/teams"
    if args.admin_command == "usage":
        return "GET", "/v1/admin/usage", None, {k: v for k in ("since", "until") if (v := getattr(args, k)) is not None}
    if args.admin_command == "pool":
        return "GET", "/v1/pool", None, None
    if args.admin_command == "sweep":
        return "POST", "/v1/admin/sweep", None, {"dry_run": str(args.dry_run).lower()}
    if args.admin_command == "keys":
        base = f"{teams}/{args.team_id}/keys"
        if args.action == "create":
            return "POST", base, {"name": args.name}, None
        if args.action == "revoke":
            return "DELETE", f"{base}/{args.key_id}", None, None
        return "GET", base, None, None
    if args.action == "list":
        return "GET", teams, None, None
    if args.action == "create":
        return "POST", teams, {"name": args.name, **_given_limits(args)}, None
    one = f"{teams}/{args.team_id}"
    if args.action == "update":
        body = {**({"name": args.name} if args.name else {}), **_given_limits(args)}
        return "PATCH", one, body, None
    return {"show": "GET", "delete": "DELETE"}[args.action], one, None, None


def _limits(parser) -> None:
    for name in ("--max-running-jobs", "--max-queued-jobs"):
        parser.add_argument(name, type=_limit, default=argparse.SUPPRESS, help="a number, or 'none' for no limit")
    parser.add_argument("--max-storage-bytes", type=_limit, default=argparse.SUPPRESS,
                        help="bytes, or 'none' for the service's DPO_TEAM_STORAGE_BYTES")


def _limit(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number or 'none'") from None


def _given_limits(args) -> dict:
    return {k: getattr(args, k) for k in ("max_running_jobs", "max_queued_jobs", "max_storage_bytes")
            if hasattr(args, k)}


def _stored_key(settings: Settings) -> str | None:
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    path = settings.data_dir / KEY_FILE
    return path.read_text().strip() if path.exists() else None


def _is_json(r: httpx.Response) -> bool:
    return r.headers.get("content-type", "").startswith("application/json")
