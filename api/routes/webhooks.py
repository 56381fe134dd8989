"""/v1/webhooks: a team's endpoints for job events (signed per Standard Webhooks), and their deliveries."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.deps import CurrentPrincipal, SessionDep, SettingsDep
from api.pagination import After, Limit, page
from api.schemas.common import DeletedPublic, ListPublic
from api.schemas.webhooks import DeliveryPublic, WebhookCreate, WebhookCreatedPublic, WebhookPublic
from service import webhooks
from service.db.models import Webhook, WebhookDelivery, is_id
from service.errors import InvalidInput, NotFound

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
Status = Annotated[str | None, Query(pattern="^(pending|delivered|failed)$", description="only deliveries in it")]


@router.post("", response_model=WebhookCreatedPublic)
def create_webhook(req: WebhookCreate, session: SessionDep, settings: SettingsDep,
                   principal: CurrentPrincipal) -> WebhookCreatedPublic:
    """Create a webhook; the response holds its signing secret, shown this once."""
    row = webhooks.create(session, settings, principal.team_id, req.url, list(req.events), req.secret)
    return WebhookCreatedPublic.of(row)


@router.get("", response_model=ListPublic[WebhookPublic])
def list_webhooks(session: SessionDep, principal: CurrentPrincipal, after: After = None,
                  limit: Limit = 20) -> ListPublic[WebhookPublic]:
    """The team's webhooks (the admin: every team's), newest first."""
    anchor = None
    if after:
        try:
            last = webhooks.load(session, principal, after, param="after")
        except NotFound:
            raise InvalidInput(f"no webhook {after!r} to page after", param="after") from None
        anchor = (last.created_at, last.id)
    stmt = select(Webhook) if principal.is_admin else select(Webhook).where(Webhook.team_id == principal.team_id)
    rows = page(session, stmt, (Webhook.created_at, Webhook.id), anchor, limit)
    return ListPublic[WebhookPublic].page([WebhookPublic.of(r) for r in rows], limit)


@router.get("/{webhook_id}", response_model=WebhookPublic)
def retrieve_webhook(webhook_id: str, session: SessionDep, principal: CurrentPrincipal) -> WebhookPublic:
    """One webhook (without its secret)."""
    return WebhookPublic.of(webhooks.load(session, principal, webhook_id))


@router.delete("/{webhook_id}", response_model=DeletedPublic)
def delete_webhook(webhook_id: str, session: SessionDep, principal: CurrentPrincipal) -> DeletedPublic:
    """Delete a webhook; its deliveries not yet sent are dropped."""
    webhook = webhooks.load(session, principal, webhook_id)
    webhooks.remove(session, webhook)
    return DeletedPublic(id=webhook_id, object="webhook")


@router.get("/{webhook_id}/deliveries", response_model=ListPublic[DeliveryPublic])
def list_deliveries(webhook_id: str, session: SessionDep, principal: CurrentPrincipal, after: After = None,
                    limit: Limit = 20, status: Status = None) -> ListPublic[DeliveryPublic]:
    """The webhook's deliveries, newest first, each with its attempts and the receiver's answers."""
    webhook = webhooks.load(session, principal, webhook_id)
    anchor = None
    if after:
        last = session.get(WebhookDelivery, after) if is_id(after, "whevt") else None
        if last is None or last.webhook_id != webhook.id:
            raise InvalidInput(f"no delivery {after!r} of webhook {webhook.id} to page after", param="after")
        anchor = (last.created_at, last.id)
    stmt = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id)
    if status:
        stmt = stmt.where(WebhookDelivery.status == status)
    rows = page(session, stmt, (WebhookDelivery.created_at, WebhookDelivery.id), anchor, limit)
    return ListPublic[DeliveryPublic].page([DeliveryPublic.of(r) for r in rows], limit)
