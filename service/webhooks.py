"""A team's webhooks: create (URL and secret checked), find, delete; and the signing key of a secret.
Their deliveries are queued by service.db.webhooks and sent by service.webhook_delivery."""
from __future__ import annotations

import base64
import binascii
import secrets

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook as Signer

from service import webhook_urls
from service.auth import Principal
from service.db.models import Webhook, WebhookDelivery, is_id, new_id, now
from service.errors import Conflict, InvalidInput, NotFound
from service.settings import Settings

SECRET_PREFIX = "whsec_"  # Standard Webhooks' form: whsec_ + base64 of the key's bytes
SECRET_BYTES = (24, 64)  # the key sizes Standard Webhooks allows
MIN_OWN_SECRET_CHARS = 32  # a secret not in whsec_ form is used as its UTF-8 bytes
MAX_WEBHOOKS_PER_TEAM = 20


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(secret: str) -> None:
    """A secret a team chose: whsec_ + base64 of 24 to 64 bytes, or any other string of 32 characters or more."""
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except binascii.Error:
            key = b""
        if not SECRET_BYTES[0] <= len(key) <= SECRET_BYTES[1]:
            raise InvalidInput(f"a {SECRET_PREFIX} secret must be followed by the base64 of {SECRET_BYTES[0]} to "
                               f"{SECRET_BYTES[1]} random bytes; leave `secret` out to have one generated",
                               param="secret", code="invalid_webhook_secret")
    elif len(secret) < MIN_OWN_SECRET_CHARS:
        raise InvalidInput(f"a webhook secret must be at least {MIN_OWN_SECRET_CHARS} characters (or "
                           f"{SECRET_PREFIX}<base64>); leave `secret` out to have one generated",
                           param="secret", code="invalid_webhook_secret")


def signer(secret: str) -> Signer:
    """standardwebhooks' signer for a webhook's secret (see check_secret for the two forms)."""
    return Signer(secret) if secret.startswith(SECRET_PREFIX) else Signer(secret.encode())


def create(session: Session, settings: Settings, team_id: str, url: str, events: list[str],
           secret: str | None) -> Webhook:
    """A new webhook of the team, committed; InvalidInput naming what is wrong with the URL or the secret."""
    webhook_urls.check(url, settings.webhook_allow_private)
    if secret is not None:
        check_secret(secret)
    count = session.scalar(select(func.count()).select_from(Webhook).where(Webhook.team_id == team_id))
    if count >= MAX_WEBHOOKS_PER_TEAM:
        raise Conflict(f"a team may have at most {MAX_WEBHOOKS_PER_TEAM} webhooks; delete one first",
                       code="too_many_webhooks")
    webhook = Webhook(id=new_id("wh"), team_id=team_id, url=url, events=list(dict.fromkeys(events)),
                      secret=secret if secret is not None else new_secret(), created_at=now())
    session.add(webhook)
    session.commit()
    return webhook


def load(session: Session, principal: Principal, webhook_id: str, param: str = "webhook_id") -> Webhook:
    """The webhook if it exists and the caller may see it; otherwise NotFound."""
    webhook = session.get(Webhook, webhook_id) if is_id(webhook_id, "wh") else None
    if webhook is None or not principal.may_see(webhook.team_id):
        raise NotFound(f"no webhook {webhook_id!r}", param=param)
    return webhook


def remove(session: Session, webhook: Webhook) -> None:
    """Delete the webhook and its deliveries, sent or not: nothing more goes to its URL."""
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id))
    session.execute(delete(Webhook).where(Webhook.id == webhook.id))
    session.commit()
