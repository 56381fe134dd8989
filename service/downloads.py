"""Where a download is served from: with an object store (and DPO_STORAGE_PRESIGN on), the client is
sent to a presigned URL of the object, so the bytes never pass through the API; otherwise the API
streams them (api.byte_ranges). Either way a missing artifact is a 404 (artifact_missing) and a store
that cannot answer a 503, before any byte is sent.

A download link (link()) is the same presigned URL handed out as JSON, for a client that cannot send the
API key along with a navigation (a browser saving a file): it needs no key, and the bytes go straight from
the store to the browser's own download, never through the page's memory."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from service.artifacts import Storage
from service.errors import Conflict, NotFound, StorageFailed
from service.settings import Settings

NO_LINK = "download_link_unavailable"


@dataclass(frozen=True)
class DownloadLink:
    url: str
    expires_at: int  # Unix seconds; the URL may stay valid a little longer, never shorter


def presigned_url(storage: Storage, settings: Settings, key: str, filename: str, directory: bool = False,
                  method: str = "GET") -> str | None:
    """A URL that serves `key` (a published directory as its tar) to `method` (GET or HEAD) for
    DPO_PRESIGN_TTL_S, saved as `filename`; None when the API streams it itself. FileNotFoundError when
    nothing is stored there: the client gets the API's 404, not the store's."""
    if not (storage.remote and settings.storage_presign):
        return None
    if not (storage.dir_exists(key) if directory else storage.exists(key)):
        raise FileNotFoundError(key)
    sign = storage.presign_dir if directory else storage.presign
    return sign(key, settings.presign_ttl_s, filename, method)


def link(storage: Storage, settings: Settings, key: str, filename: str, param: str,
         directory: bool = False) -> DownloadLink:
    """A URL that serves `key` without the API key until expires_at. Conflict (NO_LINK) when the API
    streams its downloads itself (a local store, or DPO_STORAGE_PRESIGN off): a link would have to carry a
    credential of the API's own, so the client fetches the content route with its key instead."""
    expires_at = int(time.time()) + settings.presign_ttl_s  # taken before signing: never later than the URL's
    url = presigned_url(storage, settings, key, filename, directory)
    if url is None:
        raise Conflict("this service streams downloads itself (no object store, or DPO_STORAGE_PRESIGN=0), so it "
                       "has no download link to give; GET the content with the API key instead",
                       param=param, code=NO_LINK)
    return DownloadLink(url, expires_at)


@contextmanager
def reading(missing: NotFound, what: str) -> Iterator[None]:
    """Store errors while reading `what` as the API answers them: `missing` for a key that is not there,
    StorageFailed (503) for a store that failed."""
    try:
        yield
    except FileNotFoundError:
        raise missing from None
    except OSError as err:
        raise StorageFailed(f"could not read {what} from storage: {err.strerror or err}; try again later",
                            param=missing.param) from None
