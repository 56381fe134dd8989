"""Webhooks and their deliveries: the request that creates one, and the responses."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.db.models import Webhook, WebhookDelivery
from service.requests import PRINTABLE

EventType = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled",
                    "fine_tuning.job.checkpoint.created"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, pattern=PRINTABLE,
                     description="https:// (or http://) URL the events are POSTed to; it must resolve to public "
                     "addresses unless the operator set DPO_WEBHOOK_ALLOW_PRIVATE=1")
    events: list[EventType] = Field(min_length=1, max_length=4, description="the event types to send")
    secret: str | None = Field(None, max_length=256, pattern=PRINTABLE,
                               description="signing secret: whsec_<base64 of 24 to 64 bytes>, or any string of 32 "
                               "characters or more; default: a generated whsec_ secret")


class WebhookPublic(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    url: str
    events: list[str]
    created_at: int

    @classmethod
    def of(cls, row: Webhook) -> WebhookPublic:
        return cls(id=row.id, url=row.url, events=row.events, created_at=row.created_at)


class WebhookCreatedPublic(WebhookPublic):
    secret: str = Field(description="the signing secret; shown only in this response")

    @classmethod
    def of(cls, row: Webhook) -> WebhookCreatedPublic:
        return cls(id=row.id, url=row.url, events=row.events, created_at=row.created_at, secret=row.secret)


class DeliveryAttempt(BaseModel):
    at: int = Field(description="when the attempt started (Unix seconds)")
    status_code: int | None = Field(description="the receiver's HTTP status; null when no answer came")
    error: str | None = Field(description="why no answer came (timeout, connection refused, refused address)")
    response: str | None = Field(description="the first 512 bytes of the receiver's answer")
    duration_ms: int


class DeliveryPublic(BaseModel):
    id: str = Field(description="the event's id: the webhook-id header and the payload's `id`, in every attempt")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    webhook_id: str
    event_type: str
    job_id: str
    status: str = Field(description="pending | delivered | failed")
    created_at: int = Field(description="when the event happened")
    next_attempt_at: int | None = Field(description="while pending: when the next attempt is due")
    attempts: list[DeliveryAttempt] = Field(description="oldest first")
    payload: dict[str, Any] = Field(description="the event as sent")

    @classmethod
    def of(cls, row: WebhookDelivery) -> DeliveryPublic:
        due = int(row.next_attempt_at) if row.next_attempt_at is not None else None
        return cls(id=row.id, webhook_id=row.webhook_id, event_type=row.event_type, job_id=row.job_id,
                   status=row.status, created_at=row.created_at, next_attempt_at=due,
                   attempts=row.attempts or [], payload=row.payload)
