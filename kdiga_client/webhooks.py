"""Verify kdiga's webhook requests in a receiver (no server code needed).

Each request carries `Kdiga-Signature: t=<unix seconds>,v1=<hex>` (one more `v1` while a rotated
secret is still valid), where hex = HMAC-SHA256(secret, "<t>." + raw body). Verify against the raw
bytes you received, before parsing them; refuse timestamps older than the replay window; drop
events whose `Kdiga-Event-Id` you have already handled (delivery is at least once).

    from kdiga_client.webhooks import verify_webhook
    if not verify_webhook(secret, request.body, request.headers["Kdiga-Signature"]):
        return 400
"""

from __future__ import annotations

import hashlib
import hmac
import time

REPLAY_TOLERANCE_S = 300


def verify_webhook(secret: str, body: bytes, header: str, *, tolerance_s: int = REPLAY_TOLERANCE_S,
                   now: float | None = None) -> bool:
    """True when `header` signs `body` with `secret` and its timestamp is within `tolerance_s` of now."""
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v.strip() for k, v in parts if k.strip() == "t"]
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v.strip()) for k, v in parts if k.strip() == "v1")
