"""Sending webhook deliveries. Each API process runs a WebhookSender: a daemon thread that claims due
deliveries from the outbox (service.db.webhooks) and sends each from a small thread pool, so a slow
receiver delays only its own delivery, never a job or a request. A delivery is signed per Standard
Webhooks, POSTed to an address checked again at that moment (service.webhook_urls), and retried with
exponential backoff and jitter until a 2xx, or until DPO_WEBHOOK_RETRY_WINDOW_S after the event."""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from service import webhook_urls
from service.db.engine import is_unavailable
from service.db.models import DeliveryStatus
from service.db.webhooks import Claimed, claim_due, settle
from service.errors import InvalidInput
from service.settings import Settings
from service.webhooks import signer

log = logging.getLogger("dpo.webhooks")
RESPONSE_BYTES = 512  # what an attempt keeps of the receiver's answer, to show in /deliveries
USER_AGENT = "dpo-service-webhooks"


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """The wait after failed attempt number `attempt` (1: the first): base_s doubling with each attempt, at
    most max_s, with jitter (between half that and all of it), so receivers that failed together are not
    all retried at the same moment."""
    ceiling = min(max_s, base_s * 2 ** min(attempt - 1, 60))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def body_of(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def signed_headers(secret: str, event_id: str, body: bytes, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers: webhook-signature signs `<id>.<timestamp>.<body>` with HMAC-SHA256."""
    return {"webhook-id": event_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signer(secret).sign(event_id, at, body.decode()),
            "content-type": "application/json", "user-agent": USER_AGENT}


def attempt(client: httpx.Client, claimed: Claimed, settings: Settings) -> dict[str, Any]:
    """Send one delivery once; the attempt as /deliveries shows it. Never raises for the receiver's faults."""
    started = time.time()
    entry: dict[str, Any] = {"at": int(started), "status_code": None, "error": None, "response": None}
    try:
        target = webhook_urls.parse(claimed.url)
        addresses = webhook_urls.resolve(target, settings.webhook_allow_private)
        body = body_of(claimed.payload)
        headers = signed_headers(claimed.secret, claimed.id, body, datetime.now(UTC))
        entry["status_code"], entry["response"] = _post(client, target, addresses, body, headers)
    except InvalidInput as err:  # the URL now resolves to a refused address, or no longer resolves
        entry["error"] = f"{err.code}: {err.message}"
    except httpx.TimeoutException:
        entry["error"] = f"timeout: no answer within {settings.webhook_timeout_s:g}s"
    except httpx.HTTPError as err:
        entry["error"] = f"{type(err).__name__}: {err}"
    entry["duration_ms"] = int((time.time() - started) * 1000)
    return entry


def _post(client: httpx.Client, target: webhook_urls.Target, addresses: list, body: bytes,
          headers: dict[str, str]) -> tuple[int, str]:
    """POST to the first of `addresses` (each one checked) that takes the connection: the request goes to
    that address itself, never to a second lookup of the name; the Host header and the TLS name (SNI,
    and the name the certificate must match) stay the URL's."""
    extensions = {"sni_hostname": target.host} if target.scheme == "https" and not target.host_is_ip else {}
    for i, address in enumerate(addresses):
        try:
            with client.stream("POST", target.pinned_url(address), content=body,
                               headers={**headers, "host": target.host_header}, extensions=extensions) as response:
                return response.status_code, _first_bytes(response)
        except httpx.ConnectError:
            if i == len(addresses) - 1:
                raise
    raise AssertionError("resolve() returns at least one address")


def _first_bytes(response: httpx.Response) -> str:
    kept = b""
    for chunk in response.iter_bytes():
        kept += chunk
        if len(kept) >= RESPONSE_BYTES:
            break
    return kept[:RESPONSE_BYTES].decode("utf-8", errors="replace")


def next_step(claimed: Claimed, entry: dict[str, Any], settings: Settings,
              at: float) -> tuple[DeliveryStatus, float | None]:
    """After an attempt: delivered (a 2xx), failed (the retry window is over) or pending until when."""
    if entry["status_code"] is not None and 200 <= entry["status_code"] < 300:
        return DeliveryStatus.DELIVERED, None
    retry_at = at + backoff_s(claimed.attempt, settings.webhook_retry_base_s, settings.webhook_retry_max_s)
    if retry_at > claimed.created_at + settings.webhook_retry_window_s:
        return DeliveryStatus.FAILED, None
    return DeliveryStatus.PENDING, retry_at


class WebhookSender:
    """The delivery loop of one API process. Any number of processes may run one: claims keep them apart."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings):
        self.sessions, self.settings = sessions, settings
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="dpo-webhook")
        # No kept-alive connections: a pooled connection is keyed by the pinned address, and must not
        # carry one host's requests to another host at the same address.
        self._client = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False,
                                    limits=httpx.Limits(max_keepalive_connections=0))
        self._busy, self._lock = 0, threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def hold_s(self) -> float:
        """How long a claim holds a delivery: past the longest an attempt takes (connect, send, read)."""
        return 4 * self.settings.webhook_timeout_s + 30

    def run_once(self) -> int:
        """Claim the due deliveries there is room for and start sending them; how many were started."""
        with self._lock:
            room = self.settings.webhook_concurrency - self._busy
        if room <= 0:
            return 0
        with self.sessions() as s:
            claimed = claim_due(s, time.time(), room, self.hold_s)
        for c in claimed:
            with self._lock:
                self._busy += 1
            self._pool.submit(self._deliver, c)
        return len(claimed)

    def deliver_now(self, claimed: Claimed) -> DeliveryStatus:
        """One attempt of a claimed delivery, recorded; the delivery's status after it."""
        entry = attempt(self._client, claimed, self.settings)
        status, retry_at = next_step(claimed, entry, self.settings, time.time())
        with self.sessions() as s:
            if not settle(s, claimed, entry, status, retry_at):
                log.warning("webhook delivery %s: its claim was lost during the attempt; not recorded", claimed.id)
            s.commit()
        log.info("webhook delivery %s attempt %d: %s -> %s", claimed.id, claimed.attempt,
                 entry["status_code"] or entry["error"], status.value)
        return status

    def _deliver(self, claimed: Claimed) -> None:
        try:
            self.deliver_now(claimed)
        except Exception:  # noqa: BLE001 - the claim runs out and the delivery is tried again
            log.exception("webhook delivery %s: could not record the attempt; it is tried again", claimed.id)
        finally:
            with self._lock:
                self._busy -= 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dpo-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        unavailable = False  # the database did not answer the last pass: said once per outage
        while not self._stop.is_set():
            try:
                self.run_once()
                unavailable = False
            except Exception as err:  # noqa: BLE001 - a failed pass is retried next time; the loop never ends
                if not is_unavailable(err):
                    log.exception("webhook pass failed; retrying in %.1fs", self.settings.webhook_poll_interval_s)
                elif not unavailable:
                    log.warning("the database cannot be reached (%s); webhook deliveries wait for it",
                                type(err).__name__)
                    unavailable = True
            self._stop.wait(self.settings.webhook_poll_interval_s)
