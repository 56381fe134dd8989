"""The webhook outbox: a delivery row per subscribed webhook, written in the transaction of the change it
reports (so an event is sent if, and only if, its change committed), then claimed and settled by the
delivery loops of the API processes (service.webhook_delivery)."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db.models import Checkpoint, DeliveryStatus, Job, JobStatus, Webhook, WebhookDelivery, new_id, now

CHECKPOINT_CREATED = "fine_tuning.job.checkpoint.created"
STATUS_EVENTS = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
}
EVENTS = (*STATUS_EVENTS.values(), CHECKPOINT_CREATED)


def record_status(session: Session, job_id: str, status: JobStatus) -> None:
    """Queue the event of a job's move to `status` (a terminal one) for the team's webhooks that want it."""
    if status in STATUS_EVENTS:
        _enqueue(session, job_id, STATUS_EVENTS[status])


def record_checkpoint(session: Session, checkpoint: Checkpoint) -> None:
    """Queue checkpoint.created for the team's webhooks that want it."""
    _enqueue(session, checkpoint.job_id, CHECKPOINT_CREATED,
             {"id": checkpoint.id, "step_number": checkpoint.step_number, "final": checkpoint.final})


def _enqueue(session: Session, job_id: str, event_type: str, checkpoint: dict | None = None) -> None:
    # One query finds the team's webhooks and the job's state as this transaction left it.
    rows = session.execute(
        select(Webhook.id, Webhook.events, Job.status, Job.fine_tuned_model, Job.error_code, Job.error_message)
        .join(Job, Job.team_id == Webhook.team_id).where(Job.id == job_id)).all()
    for row in rows:
        if event_type not in row.events:
            continue
        error = {"code": row.error_code, "message": row.error_message or ""} if row.error_code else None
        data = {"id": job_id, "status": row.status, "fine_tuned_model": row.fine_tuned_model, "error": error}
        if checkpoint is not None:
            data["checkpoint"] = checkpoint
        event_id, at = new_id("whevt"), now()
        payload = {"object": "event", "id": event_id, "type": event_type, "created_at": at, "data": data}
        session.add(WebhookDelivery(id=event_id, webhook_id=row.id, event_type=event_type, job_id=job_id,
                                    payload=payload, status=DeliveryStatus.PENDING.value, attempts=[],
                                    next_attempt_at=time.time(), created_at=at))


@dataclass(frozen=True)
class Claimed:
    """A delivery one loop holds for one attempt: what to send, where, and the token its result needs."""

    id: str
    token: str
    url: str
    secret: str
    payload: dict[str, Any]
    created_at: int
    attempt: int  # this attempt's number, 1 for the first


def claim_due(session: Session, at: float, limit: int, hold_s: float) -> list[Claimed]:
    """Up to `limit` deliveries due at `at`, each claimed for `hold_s` seconds (committed here): a
    conditional update moves its next_attempt_at past the attempt, so another process's claim of the same
    row changes nothing (on PostgreSQL the second update waits for the first's row lock, then finds the
    row no longer due)."""
    due = session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == DeliveryStatus.PENDING.value, WebhookDelivery.next_attempt_at <= at)
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()
    claimed = []
    for delivery_id in due:
        token = secrets.token_hex(8)
        result = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING.value,
                   WebhookDelivery.next_attempt_at <= at)
            .values(next_attempt_at=at + hold_s, claim_token=token)
            .execution_options(synchronize_session=False))
        if result.rowcount == 1:
            claimed.append(token)
    session.commit()
    if not claimed:
        return []
    rows = session.execute(
        select(WebhookDelivery, Webhook.url, Webhook.secret)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(WebhookDelivery.claim_token.in_(claimed))).all()
    return [Claimed(d.id, d.claim_token, url, secret, d.payload, d.created_at, len(d.attempts or ()) + 1)
            for d, url, secret in rows]


def settle(session: Session, claimed: Claimed, attempt: dict[str, Any], status: DeliveryStatus,
           next_attempt_at: float | None) -> bool:
    """Record an attempt and what comes next; False when the claim was lost meanwhile (the attempt
    outlasted its hold and another loop took the row, or the webhook was deleted)."""
    attempts = session.scalar(select(WebhookDelivery.attempts).where(
        WebhookDelivery.id == claimed.id, WebhookDelivery.claim_token == claimed.token))
    if attempts is None:
        return False
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claimed.id, WebhookDelivery.claim_token == claimed.token)
        .values(attempts=[*attempts, attempt], status=status.value, next_attempt_at=next_attempt_at,
                claim_token=None)
        .execution_options(synchronize_session=False))
    return result.rowcount == 1
