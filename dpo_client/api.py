"""The REST API as `dpo` uses it: one httpx client, errors turned into one-line ClientErrors, and lists
followed page by page (`has_more` / `after`)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import httpx

from dpo_client.config import Target
from dpo_client.errors import ClientError, Unreachable

TIMEOUT = httpx.Timeout(60.0, connect=10.0)
PAGE_MAX = 100  # the API's largest `limit`


def _version() -> str:
    try:
        return metadata.version("dpo-service")
    except metadata.PackageNotFoundError:
        return "0"


class Api:
    def __init__(self, target: Target):
        self.target = target
        self.url = target.base_url
        self.http = httpx.Client(base_url=target.base_url, timeout=TIMEOUT, headers={
            "Authorization": f"Bearer {target.api_key}", "User-Agent": f"dpo/{_version()}"})

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise self.unreachable(err) from None
        self.check(response)
        return response

    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, **kwargs) -> Any:
        return self.request("POST", path, **kwargs).json()

    @contextmanager
    def stream(self, method: str, path: str, **kwargs) -> Iterator[httpx.Response]:
        """A response whose body is read as it arrives; an error answer raises before the body is read."""
        try:
            with self.http.stream(method, path, **kwargs) as response:
                if not response.is_success:
                    response.read()
                self.check(response)
                yield response
        except httpx.TransportError as err:
            raise self.unreachable(err) from None

    def pages(self, path: str, limit: int | None = None, **params) -> tuple[list[dict], bool]:
        """Every item of a list route (at most `limit`), following `has_more`/`after`; and whether more remain."""
        items: list[dict] = []
        while True:
            size = PAGE_MAX if limit is None else min(PAGE_MAX, limit - len(items))
            page = self.get(path, limit=size, **params)
            items += page["data"]
            more = bool(page["has_more"])
            if not more or not page["data"] or (limit is not None and len(items) >= limit):
                return items, more
            params["after"] = page["data"][-1]["id"]

    def unreachable(self, err: httpx.TransportError) -> Unreachable:
        if isinstance(err, httpx.TimeoutException):
            why = f"it did not answer in time ({type(err).__name__})"
        else:
            why = str(err) or type(err).__name__
        return Unreachable(f"cannot reach the API at {self.url}: {why}; check the URL (DPO_BASE_URL or "
                           "`dpo login URL`) and that the service is running")

    def check(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        body = _error_body(response)
        status = response.status_code
        if status == 401:
            raise ClientError(f"the API at {self.url} refused the key ({self.target.key_source}): "
                              f"{body.get('message', response.reason_phrase)}; run `dpo login {self.url}` "
                              "with a valid key, or set DPO_API_KEY", body.get("code"), status)
        if not body:
            raise ClientError(f"the API at {self.url} answered {status} {response.reason_phrase} to "
                              f"{response.request.method} {response.request.url.path}; is this a dpo-service URL?",
                              status=status)
        message = body.get("message") or response.reason_phrase
        if response.headers.get("retry-after"):
            message += f" (try again in {response.headers['retry-after']} s)"
        raise ClientError(message, body.get("code"), status)


def _error_body(response: httpx.Response) -> dict:
    """The API's `{"error": {...}}`, or {} when the answer is not one (a proxy's page, another server)."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}
