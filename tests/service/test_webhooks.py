"""Webhooks in-process: signatures (checked with standardwebhooks' own verify), backoff, the address rule,
the /v1/webhooks routes, the outbox written with the change it reports, claims shared by several loops,
and the address checked again at delivery time."""
from __future__ import annotations

import base64
import ipaddress
import json
import random
import threading
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook as Verifier
from standardwebhooks import WebhookVerificationError

from service import webhook_urls
from service.db import jobs
from service.db.models import DeliveryStatus, WebhookDelivery
from service.db.webhooks import Claimed, claim_due
from service.errors import InvalidInput
from service.webhook_delivery import WebhookSender, backoff_s, body_of, next_step, signed_headers
from service.webhooks import new_secret
from tests.service.receiver import Receiver
from tests.service.support import API_KEY, as_key, fresh_postgres, make_settings, make_team, sessions_for, upload

HOOK = "http://127.0.0.1:9/hook"  # nothing listens: the in-process tests never wait for a receiver
TRAINING = {"max_length": 64, "max_prompt_length": 32}


@pytest.mark.parametrize("secret", [new_secret(), "a-secret-of-our-own-at-least-32-characters"],
                         ids=["generated", "own"])
def test_a_delivery_verifies_with_standardwebhooks(secret):
    payload = {"object": "event", "id": "whevt-1", "type": "fine_tuning.job.succeeded", "created_at": 1,
               "data": {"id": "ftjob-1", "status": "succeeded"}}
    body = body_of(payload)
    headers = signed_headers(secret, "whevt-1", body, datetime.now(UTC))
    verifier = Verifier(secret) if secret.startswith("whsec_") else Verifier(secret.encode())
    assert verifier.verify(body, headers) == payload
    assert headers["webhook-signature"].startswith("v1,")
    with pytest.raises(WebhookVerificationError):
        verifier.verify(body.replace(b"succeeded", b"failed!!!"), headers)
    with pytest.raises(WebhookVerificationError):
        Verifier(new_secret()).verify(body, headers)


def test_a_generated_secret_is_standard_webhooks_form():
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert new_secret() != secret


def test_backoff_doubles_with_jitter_up_to_its_cap():
    rng = random.Random(0)
    for attempt, ceiling in ((1, 5), (2, 10), (3, 20), (4, 40), (10, 2560), (11, 3600), (60, 3600), (500, 3600)):
        delays = [backoff_s(attempt, 5, 3600, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) == 50  # jittered: receivers that failed together are not retried together


def test_after_an_attempt():
    settings = make_settings(Path("/nonexistent"), webhook_retry_base_s=10,
                             webhook_retry_window_s=3600)
    claimed = Claimed("whevt-1", "t", HOOK, new_secret(), {}, created_at=1000, attempt=1)
    for code in (200, 204, 299):
        assert next_step(claimed, {"status_code": code}, settings, 1001) == (DeliveryStatus.DELIVERED, None)
    for entry in ({"status_code": 500}, {"status_code": 302}, {"status_code": None, "error": "timeout"}):
        status, at = next_step(claimed, entry, settings, 1001)
        assert status == DeliveryStatus.PENDING and 1006 <= at <= 1011
    # Past the window after the event: failed, nothing more is due.
    assert next_step(claimed, {"status_code": 500}, settings, 1000 + 3600) == (DeliveryStatus.FAILED, None)


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("172.16.5.4", "private"), ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"),
    ("100.64.0.1", "non-global"), ("224.0.0.1", "multicast"), ("::1", "loopback"), ("fc00::1", "private"),
    ("fd12:3456::1", "private"), ("fe80::1", "link-local"), ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"), ("::", "unspecified"),
])
def test_non_global_addresses_are_refused(address, why):
    assert webhook_urls.refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address):
    assert webhook_urls.refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("url, code", [
    ("http://127.0.0.1:8000/hook", "webhook_url_private_address"),
    ("http://localhost:8000/hook", "webhook_url_private_address"),  # a name that resolves to loopback
    ("http://10.0.0.7/hook", "webhook_url_private_address"),
    ("http://169.254.169.254/latest/meta-data", "webhook_url_private_address"),
    ("http://[::1]:8000/hook", "webhook_url_private_address"),
    ("http://[fd00::5]/hook", "webhook_url_private_address"),
    ("http://2130706433/hook", "webhook_url_private_address"),  # 127.0.0.1 written as one number
    ("ftp://93.184.216.34/hook", "webhook_url_scheme"),
    ("file:///etc/passwd", "webhook_url_scheme"),
    ("93.184.216.34/hook", "webhook_url_scheme"),
    ("https://user:password@93.184.216.34/hook", "webhook_url_credentials"),
    ("https://token@93.184.216.34/hook", "webhook_url_credentials"),
    ("https:///hook", "webhook_url_invalid"),
    ("https://93.184.216.34:99999/hook", "webhook_url_invalid"),
    ("https://no-such-host.invalid/hook", "webhook_url_unresolvable"),
])
def test_urls_refused_without_the_setting(url, code):
    with pytest.raises(InvalidInput) as err:
        webhook_urls.check(url, allow_private=False)
    assert (err.value.code, err.value.param) == (code, "url")


def test_the_setting_allows_private_addresses_only():
    assert webhook_urls.check("http://localhost:8000/hook", allow_private=True).host == "localhost"
    with pytest.raises(InvalidInput, match="must start with"):
        webhook_urls.check("gopher://127.0.0.1/hook", allow_private=True)
    target = webhook_urls.check("https://93.184.216.34/a?b=c", allow_private=False)
    assert target.pinned_url(ipaddress.ip_address("93.184.216.34")) == "https://93.184.216.34:443/a?b=c"
    assert webhook_urls.parse("http://[::1]:81/x").pinned_url(ipaddress.ip_address("::1")) == "http://[::1]:81/x"
    assert webhook_urls.parse("http://[::1]:81/x").host_header == "[::1]:81"


def test_the_routes(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    strict = settings.model_copy(update={"webhook_allow_private": False})
    with TestClient(create_app(strict), headers=as_key(API_KEY)) as client:
        team = make_team(client, "hooks")
        key = as_key(team["key"])
        r = client.post("/v1/webhooks", headers=key, json={"url": "http://127.0.0.1:9/x", "events": [
            "fine_tuning.job.succeeded"]})
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (
            400, "webhook_url_private_address", "url")
        made = []
        for events, secret in ((["fine_tuning.job.succeeded", "fine_tuning.job.succeeded"], None),
                               (["fine_tuning.job.failed"], "whsec_" + base64.b64encode(b"k" * 24).decode()),
                               (["fine_tuning.job.cancelled"], "x" * 32)):
            r = client.post("/v1/webhooks", headers=key, json={"url": "https://93.184.216.34/hook", "events": events,
                                                               **({"secret": secret} if secret else {})})
            assert r.status_code == 200, r.text
            made.append(r.json())
        assert made[0]["events"] == ["fine_tuning.job.succeeded"] and made[0]["secret"].startswith("whsec_")
        assert [m["secret"] for m in made[1:]] == ["whsec_" + base64.b64encode(b"k" * 24).decode(), "x" * 32]
        shown = client.get(f"/v1/webhooks/{made[0]['id']}", headers=key).json()
        assert shown["id"] == made[0]["id"] and "secret" not in shown and shown["object"] == "webhook"
        first = client.get("/v1/webhooks", headers=key, params={"limit": 2}).json()
        assert [w["id"] for w in first["data"]] == [made[2]["id"], made[1]["id"]] and first["has_more"]
        rest = client.get("/v1/webhooks", headers=key, params={"after": first["last_id"]}).json()
        assert [w["id"] for w in rest["data"]] == [made[0]["id"]] and not rest["has_more"]
        assert client.delete(f"/v1/webhooks/{made[1]['id']}", headers=key).json()["deleted"]
        assert client.get(f"/v1/webhooks/{made[1]['id']}", headers=key).status_code == 404
        assert client.get(f"/v1/webhooks/{made[0]['id']}/deliveries", headers=key).json()["data"] == []


BAD = [
    ({"url": HOOK, "events": []}, "events", "invalid_value"),
    ({"url": HOOK, "events": ["fine_tuning.job.started"]}, "events.0", "invalid_value"),
    ({"url": HOOK}, "events", "invalid_value"),
    ({"url": HOOK, "events": ["fine_tuning.job.failed"], "secret": "short"}, "secret", "invalid_webhook_secret"),
    ({"url": HOOK, "events": ["fine_tuning.job.failed"], "secret": "whsec_c2hvcnQ="}, "secret",
     "invalid_webhook_secret"),
    ({"url": HOOK, "events": ["fine_tuning.job.failed"], "secret": "whsec_" + "!" * 40}, "secret",
     "invalid_webhook_secret"),
    ({"url": HOOK, "events": ["fine_tuning.job.failed"], "extra": 1}, "extra", "invalid_value"),
]


def test_a_bad_webhook_is_refused_naming_the_field(client):
    for body, param, code in BAD:
        r = client.post("/v1/webhooks", json=body)
        assert r.status_code == 400, (body, r.text)
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code), (body, r.text)
    assert client.get("/v1/webhooks").json()["data"] == []


def _job(client, task_files, key) -> str:
    train = upload(client, task_files[1], headers=key)
    r = client.post("/v1/fine_tuning/jobs", headers=key, json={"model": "m", "training_file": train["id"],
                                                               "training": TRAINING})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_the_outbox_row_is_written_with_the_change(client, settings, task_files):
    team = make_team(client, "outbox")
    key = as_key(team["key"])
    hooks = {name: client.post("/v1/webhooks", headers=key, json={"url": HOOK, "events": events}).json()["id"]
             for name, events in (("cancelled", ["fine_tuning.job.cancelled", "fine_tuning.job.checkpoint.created"]),
                                  ("succeeded", ["fine_tuning.job.succeeded"]))}
    other = make_team(client, "bystander")
    others = client.post("/v1/webhooks", headers=as_key(other["key"]), json={
        "url": HOOK, "events": ["fine_tuning.job.cancelled"]}).json()["id"]
    job_id = _job(client, task_files, key)
    with sessions_for(settings).begin() as s:
        ckpt = jobs.add_checkpoint(s, job_id, 2, f"jobs/{job_id}/checkpoint-2", {"loss": 0.5})
        checkpoint_id = ckpt.id
    with sessions_for(settings)() as s:  # a change rolled back leaves no delivery behind
        jobs.add_checkpoint(s, job_id, 4, f"jobs/{job_id}/checkpoint-4", None)
        s.rollback()
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=key).json()["status"] == "cancelled"

    shown = client.get(f"/v1/webhooks/{hooks['cancelled']}/deliveries", headers=key).json()["data"]
    assert [(d["event_type"], d["status"], d["attempts"]) for d in shown] == [
        ("fine_tuning.job.cancelled", "pending", []), ("fine_tuning.job.checkpoint.created", "pending", [])]
    cancelled, checkpoint = shown
    assert cancelled["payload"] == {"object": "event", "id": cancelled["id"], "type": "fine_tuning.job.cancelled",
                                    "created_at": cancelled["created_at"], "data": {
                                        "id": job_id, "status": "cancelled", "fine_tuned_model": None, "error": None}}
    assert checkpoint["payload"]["data"]["checkpoint"] == {"id": checkpoint_id, "step_number": 2, "final": False}
    assert checkpoint["payload"]["data"]["status"] == "queued" and checkpoint["job_id"] == job_id
    assert client.get(f"/v1/webhooks/{hooks['succeeded']}/deliveries", headers=key).json()["data"] == []
    assert client.get(f"/v1/webhooks/{others}/deliveries", headers=as_key(other["key"])).json()["data"] == []
    # Paging, and the filter on status.
    page = client.get(f"/v1/webhooks/{hooks['cancelled']}/deliveries", headers=key, params={"limit": 1}).json()
    assert page["has_more"] and page["data"][0]["id"] == cancelled["id"]
    after = client.get(f"/v1/webhooks/{hooks['cancelled']}/deliveries", headers=key,
                       params={"after": page["last_id"]}).json()
    assert [d["id"] for d in after["data"]] == [checkpoint["id"]]
    assert client.get(f"/v1/webhooks/{hooks['cancelled']}/deliveries", headers=key,
                      params={"status": "delivered"}).json()["data"] == []
    # Deleting the webhook drops what it had not sent.
    client.delete(f"/v1/webhooks/{hooks['cancelled']}", headers=key)
    with sessions_for(settings)() as s:
        assert s.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == hooks["cancelled"])).all() == []


def test_the_address_is_checked_again_when_sending(client, settings, task_files):
    """A webhook made while its host resolved to an allowed address, sent once it no longer does (as after
    DNS rebinding): the attempt is refused before any connection, recorded, and tried again later."""
    team = make_team(client, "rebind")
    key = as_key(team["key"])
    hook = client.post("/v1/webhooks", headers=key, json={"url": HOOK, "events": ["fine_tuning.job.cancelled"]})
    client.post(f"/v1/fine_tuning/jobs/{_job(client, task_files, key)}/cancel", headers=key)
    strict = settings.model_copy(update={"webhook_allow_private": False})
    sender = WebhookSender(sessions_for(settings), strict)
    with sessions_for(settings)() as s:
        claimed = claim_due(s, time.time(), 10, sender.hold_s)
    assert len(claimed) == 1
    assert sender.deliver_now(claimed[0]) == DeliveryStatus.PENDING
    delivery = client.get(f"/v1/webhooks/{hook.json()['id']}/deliveries", headers=key).json()["data"][0]
    [tried] = delivery["attempts"]
    assert tried["status_code"] is None and tried["error"].startswith("webhook_url_private_address")
    assert delivery["status"] == "pending" and delivery["next_attempt_at"] >= tried["at"]


def test_a_delivery_fails_once_its_retry_window_is_over(client, settings, task_files):
    """Nothing listens at the URL: the attempt records the refused connection, and with the window over
    the delivery is failed, with nothing more due."""
    hook = client.post("/v1/webhooks", json={"url": HOOK, "events": ["fine_tuning.job.cancelled"]}).json()
    client.post(f"/v1/fine_tuning/jobs/{_job(client, task_files, {})}/cancel")
    sender = WebhookSender(sessions_for(settings), settings.model_copy(update={"webhook_retry_window_s": 0.001}))
    with sessions_for(settings)() as s:
        [claimed] = claim_due(s, time.time(), 10, sender.hold_s)
    assert sender.deliver_now(claimed) == DeliveryStatus.FAILED
    [delivery] = client.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"status": "failed"}).json()["data"]
    assert delivery["next_attempt_at"] is None and delivery["attempts"][0]["error"].startswith("ConnectError")
    with sessions_for(settings)() as s:
        assert claim_due(s, time.time() + 10 ** 6, 10, 60) == []


def test_a_name_is_sent_to_a_checked_address_under_its_own_host(client, settings, task_files):
    """The attempt connects to an address it resolved and checked itself (trying the next when one refuses
    the connection: `localhost` may be ::1 first, and the receiver listens on 127.0.0.1 only), and the
    receiver still sees the URL's host."""
    with Receiver() as receiver:
        port = receiver.server.server_address[1]
        r = client.post("/v1/webhooks", json={"url": f"http://localhost:{port}/named",
                                              "events": ["fine_tuning.job.cancelled"]})
        receiver.secrets["/named"] = r.json()["secret"]
        client.post(f"/v1/fine_tuning/jobs/{_job(client, task_files, {})}/cancel")
        sender = WebhookSender(sessions_for(settings), settings)
        with sessions_for(settings)() as s:
            [claimed] = claim_due(s, time.time(), 10, sender.hold_s)
        assert sender.deliver_now(claimed) == DeliveryStatus.DELIVERED
        [got] = receiver.events("/named")
        assert got["verified"] and got["host"] == f"localhost:{port}" and got["id"] == claimed.id


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_loops_claim_each_due_delivery_once(tmp_path, backend, task_files):
    """Four loops claiming at once (as four API processes do) share the due deliveries without overlap."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    with fresh_postgres() if backend == "postgres" else nullcontext() as url:
        settings = make_settings(tmp_path / "data", **({"database_url": url} if url else {}))
        with TestClient(create_app(settings), headers=as_key(API_KEY)) as client:
            hooks = [client.post("/v1/webhooks", json={"url": HOOK, "events": ["fine_tuning.job.cancelled"]})
                     for _ in range(10)]
            assert all(h.status_code == 200 for h in hooks)
            for _ in range(3):
                client.post(f"/v1/fine_tuning/jobs/{_job(client, task_files, {})}/cancel")
        sessions, got, start = sessions_for(settings), [], threading.Barrier(4)

        def claim():
            start.wait()
            with sessions() as s:
                got.append([c.id for c in claim_due(s, time.time(), 30, 60)])
        threads = [threading.Thread(target=claim) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        claimed = [i for ids in got for i in ids]
        assert len(claimed) == len(set(claimed)) == 30
        with sessions() as s:  # claimed rows are due again only once their hold is over
            assert claim_due(s, time.time(), 30, 60) == []
            assert len(claim_due(s, time.time() + 61, 30, 60)) == 30
            rows = s.scalars(select(WebhookDelivery)).all()
            assert {json.dumps(r.payload["data"]["status"]) for r in rows} == {'"cancelled"'}
