"""Webhooks: the key's signing secret (create / rotate), a job's deliveries, and the `notify` check."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api.deps import CurrentOwner, SessionDep
from api.errors import error_responses
from api.routes._common import owned_or_404
from api.routing import KdigaRoute
from api.schemas_mlops import (
    DeliveriesPublic,
    DeliveryPublic,
    EventPublic,
    NotifySpec,
    WebhookSecretCreated,
    WebhookSecretPublic,
    WebhookSecretsPublic,
)
from kdiga_service import crud
from kdiga_service.models import Job, WebhookSecret, utcnow
from kdiga_service.settings import Settings
from kdiga_service.webhooks import UrlPolicy, UrlRefused, check_url

router = APIRouter(tags=["webhooks"], route_class=KdigaRoute, responses=error_responses(401, 404, 422))

NO_SECRET = ("This API key has no webhook signing secret yet; create one with POST /v1/webhooks/secret "
             "(it is shown once) before asking for webhooks.")
MAX_GRACE_S = 7 * 24 * 3600


def check_notify(session: Session, owner_id: str, notify: NotifySpec | None, settings: Settings) -> dict[str, Any] | None:
    """A job's `notify` as stored in its spec, or 4xx: the URL must pass the SSRF policy, and the key
    must have a signing secret (unsigned events would be worthless to a careful receiver)."""
    if notify is None:
        return None
    try:
        check_url(notify.url, UrlPolicy.from_settings(settings))
    except UrlRefused as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    if not crud.has_webhook_secret(session, owner_id=owner_id):
        raise HTTPException(status.HTTP_409_CONFLICT, NO_SECRET)
    return notify.model_dump()


@router.post("/webhooks/secret", status_code=status.HTTP_201_CREATED, response_model=WebhookSecretCreated)
def rotate_webhook_secret(
    owner: CurrentOwner,
    session: SessionDep,
    grace_s: Annotated[int, Query(ge=0, le=MAX_GRACE_S, description="How long the previous secret still signs.")]
    = 24 * 3600,
) -> WebhookSecretCreated:
    """Create the key's webhook signing secret, or rotate it (the secret is shown only in this answer)."""
    row, previous_until = crud.rotate_webhook_secret(session, owner_id=owner.id, grace_s=grace_s)
    return WebhookSecretCreated(secret=row.secret, prefix=row.prefix, created_at=row.created_at,
                                previous_valid_until=previous_until)


@router.get("/webhooks/secret", response_model=WebhookSecretsPublic)
def read_webhook_secrets(owner: CurrentOwner, session: SessionDep) -> WebhookSecretsPublic:
    """The key's signing secrets that still sign events (their prefixes, never the secrets)."""
    now = utcnow()
    rows = session.scalars(select(WebhookSecret).where(
        WebhookSecret.owner_id == owner.id, or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > now))
        .order_by(WebhookSecret.created_at.desc())).all()
    return WebhookSecretsPublic(data=[WebhookSecretPublic(prefix=r.prefix, created_at=r.created_at,
                                                          expires_at=r.expires_at) for r in rows])


@router.get("/jobs/{job_id}/deliveries", response_model=DeliveriesPublic)
def list_job_deliveries(job_id: str, owner: CurrentOwner, session: SessionDep) -> DeliveriesPublic:
    """The job's webhook events (pending, delivered or given up) and every delivery attempt."""
    owned_or_404(session, Job, owner.id, job_id, "Job")
    events, attempts = crud.job_deliveries(session, job_id=job_id)
    return DeliveriesPublic(events=[EventPublic.model_validate(e) for e in events],
                            data=[DeliveryPublic.model_validate(a) for a in attempts], count=len(attempts))
