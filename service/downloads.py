"""Where a download is served from: with an object store (and DPO_STORAGE_PRESIGN on), the client is
sent to a presigned URL of the object, so the bytes never pass through the API; otherwise the API
streams them (api.byte_ranges). Either way a missing artifact is a 404 (artifact_missing) and a store
that cannot answer a 503, before any byte is sent."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.artifacts import Storage
from service.errors import NotFound, StorageFailed
from service.settings import Settings


def presigned_url(storage: Storage, settings: Settings, key: str, filename: str, directory: bool = False
                  ) -> str | None:
    """A URL that serves `key` (a published directory as its tar) for DPO_PRESIGN_TTL_S, saved as
    `filename`; None when the API streams it itself. FileNotFoundError when nothing is stored there:
    the client gets the API's 404, not the store's."""
    if not (storage.remote and settings.storage_presign):
        return None
    if not (storage.dir_exists(key) if directory else storage.exists(key)):
        raise FileNotFoundError(key)
    sign = storage.presign_dir if directory else storage.presign
    return sign(key, settings.presign_ttl_s, filename)


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
