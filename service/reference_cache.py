"""A team's cache of precomputed reference log-probs in the store (dpo_core.refcache makes and reads the
tables; this module keeps them): `teams/<team id>/reference-cache/<key>.pt`, one object per key.

A job with `reference_mode: precomputed` gets its team's object for its key before it trains (a hit: no
reference model is loaded), and a job that computed the tables puts them there. Each team reads only under
its own prefix. A use writes the object again, so that its modification time is its last use; the cache
keeps DPO_REFERENCE_CACHE_TEAM_BYTES per team, the most recently used first, and removes the rest. Nothing
else removes these objects: the orphan sweep looks only under `files/` and `jobs/`, and deleting a job
removes only what is under `jobs/<job id>/`.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from service.artifacts import Storage

log = logging.getLogger("dpo.storage")
SUFFIX = ".pt"
_NAME = re.compile(r"[0-9a-f]{16,64}")  # dpo_core.refcache.cache_key: hex


def team_prefix(team_id: str) -> str:
    """Where a team's cached tables live."""
    return f"teams/{team_id}/reference-cache"


def object_key(team_id: str, key: str) -> str:
    if not _NAME.fullmatch(key):
        raise ValueError(f"not a reference cache key: {key!r}")
    return f"{team_prefix(team_id)}/{key}{SUFFIX}"


def fetch(storage: Storage, team_id: str, key: str, dest: Path) -> bool:
    """The team's tables for `key` copied to `dest` (a file the run may replace), and marked as used now;
    False when the team has none."""
    name = object_key(team_id, key)
    try:
        got = storage.fetch_file(name, dest)
    except FileNotFoundError:
        return False
    if Path(got) != Path(dest):  # a local store's own file: the run gets a copy of its own
        shutil.copyfile(got, dest)
    storage.put_file(name, Path(dest))  # written again: its modification time is its last use
    return True


def put(storage: Storage, team_id: str, key: str, path: Path, max_bytes: int) -> bool:
    """Store the tables at `path` as the team's for `key`, then keep the team's cache within `max_bytes`;
    False when they are not kept (larger than the whole cache)."""
    name = object_key(team_id, key)
    storage.put_file(name, path)
    return name not in evict(storage, team_id, max_bytes, newest=name)


def evict(storage: Storage, team_id: str, max_bytes: int, newest: str | None = None) -> list[str]:
    """Remove the team's least recently used tables until the rest fit in `max_bytes`; the keys removed.
    `newest`: the one just written, first whatever the store's clock says (S3 keeps whole seconds)."""
    objects = sorted((o for o in storage.list(team_prefix(team_id)) if o.key.endswith(SUFFIX)),
                     key=lambda o: (o.key == newest, o.modified), reverse=True)
    kept, removed = 0, []
    for obj in objects:
        if kept + obj.size <= max_bytes:
            kept += obj.size
            continue
        try:
            storage.delete(obj.key)
        except FileNotFoundError:
            pass  # another worker evicted it meanwhile
        removed.append(obj.key)
    return removed
