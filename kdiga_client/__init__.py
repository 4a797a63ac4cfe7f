"""kdiga_client: the Python SDK and `kdiga` command line of the kdiga service (HTTP only, no torch)."""

from kdiga_client.client import Artifact, Client, Dataset, Job, JobEvent, Page, Progress, Teacher
from kdiga_client.errors import (
    AuthError,
    ConflictError,
    JobCancelledError,
    JobFailedError,
    JobStoppedError,
    KdigaError,
    NotFoundError,
    RateLimitError,
    ServerUnreachableError,
    ValidationError,
    WaitTimeoutError,
)

__all__ = [
    "Artifact", "AuthError", "Client", "ConflictError", "Dataset", "Job", "JobCancelledError", "JobEvent",
    "JobFailedError", "KdigaError", "NotFoundError", "JobStoppedError", "Page", "Progress", "RateLimitError",
    "ServerUnreachableError", "Teacher", "ValidationError", "WaitTimeoutError",
]
