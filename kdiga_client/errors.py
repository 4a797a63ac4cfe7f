"""Exceptions raised by the kdiga SDK.

Every error carries the HTTP status (when there was a response) and the server's
one-sentence `detail`, so `str(err)` is what a person should read.
"""

from __future__ import annotations

from typing import Any, Protocol


class FinishedJob(Protocol):
    """What the job errors need of a `kdiga_client.Job` (a protocol, so this module imports no client)."""

    id: str
    error: str | None


class KdigaError(Exception):
    """Base class for every SDK error: `status` (or None) and the server's `detail` sentence."""

    def __init__(self, detail: str, status: int | None = None, *, response_body: Any = None):
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.response_body = response_body


class AuthError(KdigaError):
    """401/403: the API key is missing, wrong or revoked."""


class NotFoundError(KdigaError):
    """404: the resource does not exist, or belongs to another key."""


class ConflictError(KdigaError):
    """409: the request conflicts with the resource's state (a finished job, a teacher in use)."""


class ValidationError(KdigaError):
    """400/422: the request body or parameters are invalid."""


class RateLimitError(KdigaError):
    """429: too many requests or too many concurrent jobs; `retry_after` in seconds when given."""

    def __init__(self, detail: str, status: int | None = 429, *, retry_after: float | None = None,
                 response_body: Any = None):
        super().__init__(detail, status, response_body=response_body)
        self.retry_after = retry_after


class ServerUnreachableError(KdigaError):
    """No HTTP response at all: connection refused, DNS failure, connect timeout."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"Cannot reach the kdiga server at {url}: {reason}")
        self.url = url
        self.reason = reason


class WaitTimeoutError(KdigaError):
    """A wait_* call ran past its timeout; the resource is still being processed."""


class JobFailedError(KdigaError):
    """wait_job found the job `failed`; `job` is the final Job and `job.error` says why."""

    def __init__(self, job: FinishedJob):
        super().__init__(f"Job {job.id} failed: {job.error or 'no reason was recorded'}")
        self.job = job


class JobStoppedError(JobFailedError):
    """wait_job found the job `stopped` (its time budget was spent at a safe point); `job.error` says
    where. Not a failure: `Client.resume_job` continues it from its last checkpoint."""

    def __init__(self, job: FinishedJob):
        KdigaError.__init__(self, f"Job {job.id} stopped: {job.error or 'its time budget was spent'} "
                                  f"Resume it with `kdiga jobs resume {job.id}`.")
        self.job = job


class JobCancelledError(KdigaError):
    """wait_job found the job `cancelled`; `job` is the final Job."""

    def __init__(self, job: FinishedJob):
        super().__init__(f"Job {job.id} was cancelled.")
        self.job = job


def error_for_status(status: int, detail: str, *, retry_after: float | None = None,
                     body: Any = None) -> KdigaError:
    """The exception class for an HTTP error status."""
    if status == 429:
        return RateLimitError(detail, status, retry_after=retry_after, response_body=body)
    cls = {400: ValidationError, 401: AuthError, 403: AuthError, 404: NotFoundError,
           409: ConflictError, 422: ValidationError}.get(status, KdigaError)
    return cls(detail, status, response_body=body)
