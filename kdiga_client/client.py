"""The kdiga Python SDK: a typed client of the REST API (docs/contracts.md, "REST v1 shapes").

    from kdiga_client import Client

    with Client("http://127.0.0.1:8000", api_key="kdg_...") as kd:
        ds = kd.wait_dataset(kd.register_builtin_dataset("digits", "digits").id)
        teacher = kd.wait_teacher(kd.upload_teacher("teacher.safetensors", "t", arch="cnn_medium",
                                                    num_classes=10, in_chans=1, img_size=8).id)
        job = kd.create_job("distill", ds.id, teacher_id=teacher.id, student={"arch": "cnn_small"},
                            objective={"method": "kdiga"})
        job = kd.wait_job(job.id, on_progress=lambda j: print(j.progress))
        kd.download_job(job.id, "out/")

HTTP only: no torch, no server code. Errors are the exceptions of `kdiga_client.errors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Self, TypeVar
from urllib.parse import unquote

import httpx

from kdiga_client.errors import (
    JobCancelledError,
    JobFailedError,
    JobStoppedError,
    KdigaError,
    RateLimitError,
    ServerUnreachableError,
    WaitTimeoutError,
    error_for_status,
)

TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled", "stopped"})  # stopped: until resumed
TERMINAL_UPLOAD_STATES = frozenset({"ready", "invalid"})
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- models


class _Model:
    """Build from the server's JSON, ignoring keys this SDK does not know (forward compatible)."""

    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}  # type: ignore[arg-type]
        kwargs = {k: v for k, v in data.items() if k in names}
        return cls(**kwargs, raw=dict(data))  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        """The JSON the server sent (including fields this SDK does not model)."""
        return dict(self.raw)


@dataclass
class Progress(_Model):
    phase: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps_per_epoch: int | None = None
    percent: float | None = None
    eta_s: float | None = None
    updated_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Artifact(_Model):
    id: str
    job_id: str | None = None
    name: str = ""
    kind: str = ""
    size_bytes: int | None = None
    sha256: str | None = None
    created_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Teacher(_Model):
    id: str
    name: str = ""
    status: str = ""
    format: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    spec: dict[str, Any] | None = None
    error: str | None = None
    created_at: str | None = None
    source_job_id: str | None = None
    normalization: dict[str, Any] | None = None  # {mean, std, source}: what the model normalises with
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_ready(self) -> bool:
        return self.status == "ready"


@dataclass
class Dataset(_Model):
    id: str
    name: str = ""
    kind: str | None = None
    builtin: str | None = None
    status: str = ""
    num_classes: int | None = None
    class_names: list[str] | None = None
    input_shape: list[int] | None = None
    train_size: int | None = None
    test_size: int | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    error: str | None = None
    created_at: str | None = None
    uri: str | None = None  # a dataset read in place
    layout: dict[str, Any] | None = None  # what its validation found: counts, image sizes, corrupt files
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_ready(self) -> bool:
        return self.status == "ready"


@dataclass
class Job(_Model):
    id: str
    kind: str = ""
    name: str | None = None
    status: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    progress: Progress | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    attempts: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    result: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        job: Job = super().from_dict(data)
        if isinstance(job.progress, dict):
            job.progress = Progress.from_dict(job.progress)
        job.artifacts = [Artifact.from_dict(a) if isinstance(a, dict) else a for a in (job.artifacts or [])]
        job.spec = job.spec or {}
        return job

    @property
    def is_finished(self) -> bool:
        return self.status in TERMINAL_JOB_STATES


@dataclass
class JobEvent:
    """One server-sent event of GET /v1/jobs/{id}/events: `event` is "progress" or "end"."""

    event: str
    job: Job | None
    data: Any


T = TypeVar("T")
_Upload = TypeVar("_Upload", Teacher, Dataset)


@dataclass
class Page(Generic[T]):
    """One page of a list endpoint: `data` and the total `count` across pages."""

    data: list[T]
    count: int

    def __iter__(self) -> Iterator[T]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


# --------------------------------------------------------------------------- helpers


def _detail(response: httpx.Response) -> tuple[str, Any]:
    """The server's one-sentence detail (FastAPI 422 lists are flattened to one sentence)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return (text[:300] or f"HTTP {response.status_code} {response.reason_phrase}"), None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query"))
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        detail = "Invalid request: " + "; ".join(parts) + "."
    if not detail:
        detail = f"HTTP {response.status_code} {response.reason_phrase}"
    return str(detail), body


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _filename_from(response: httpx.Response) -> str | None:
    cd = response.headers.get("content-disposition", "")
    match = re.search(r"filename\*=(?:UTF-8'')?([^;]+)", cd) or re.search(r'filename="?([^";]+)"?', cd)
    if not match:
        return None
    return _safe_name(unquote(match.group(1).strip().strip('"')))


def _safe_name(name: str) -> str:
    """A file name that cannot escape the destination directory."""
    name = os.path.basename(name.replace("\\", "/")).strip()
    return name if name not in ("", ".", "..") else "artifact"


def _idempotency(key: str | None) -> dict[str, str] | None:
    return {"Idempotency-Key": key} if key else None


def _object(body: Any) -> dict[str, Any]:
    """A JSON body that the contract says is an object (a server that sends anything else is not ours)."""
    if not isinstance(body, dict):
        raise KdigaError(f"The server sent {type(body).__name__} where the API returns an object.")
    return body


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Yield (event, data) pairs from text/event-stream lines (comments and ids ignored)."""
    event: str = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


# --------------------------------------------------------------------------- client


class Client:
    """A synchronous client of the kdiga REST API (thread-safe; use as a context manager)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float | None = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        headers = {"User-Agent": "kdiga-client/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, follow_redirects=True,
                                  timeout=self._timeout(),
                                  transport=transport)

    def _timeout(self, **overrides: float | None) -> httpx.Timeout:
        connect = 10.0 if self.timeout is None else min(self.timeout, 10.0)
        return httpx.Timeout(self.timeout, **{"connect": connect, **overrides})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    # ------------------------------------------------------------------ transport

    def _raise_for(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        if response.is_stream_consumed is False:
            response.read()
        detail, body = _detail(response)
        raise error_for_status(response.status_code, detail, retry_after=_retry_after(response), body=body)

    @contextlib.contextmanager
    def _unreachable_as_error(self) -> Iterator[None]:
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ServerUnreachableError(self.url, str(exc) or type(exc).__name__) from exc
        except httpx.RemoteProtocolError as exc:
            raise ServerUnreachableError(self.url, f"the connection broke ({exc})") from exc
        except httpx.TimeoutException as exc:
            raise KdigaError(f"The kdiga server at {self.url} did not answer in time ({type(exc).__name__}).") from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._unreachable_as_error():
            response = self._http.request(method, path, **kwargs)
        self._raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON body (an object for every route that has one; None for a 204)."""
        response = self._request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def _page(self, path: str, model: type[_Model], limit: int, offset: int, **params: Any) -> Page[Any]:
        body = self._json("GET", path, params=_drop_none({"limit": limit, "offset": offset, **params}))
        return Page([model.from_dict(d) for d in body.get("data", [])], int(body.get("count", 0)))

    # ------------------------------------------------------------------ service

    def health(self) -> dict[str, Any]:
        """GET /healthz."""
        return _object(self._json("GET", "/healthz"))

    def ready(self) -> dict[str, Any]:
        """GET /readyz (database and broker reachable)."""
        return _object(self._json("GET", "/readyz"))

    def openapi(self) -> dict[str, Any]:
        """GET /openapi.json: the server's schema (what fields this server version accepts)."""
        return _object(self._json("GET", "/openapi.json"))

    def catalog(self) -> dict[str, Any]:
        """GET /v1/catalog: architectures, attacks, methods, datasets, job kinds."""
        return _object(self._json("GET", "/v1/catalog"))

    # ------------------------------------------------------------------ teachers

    def upload_teacher(self, path: str | os.PathLike[str], name: str, *, arch: str | None = None,
                       num_classes: int | None = None, in_chans: int | None = None,
                       img_size: int | None = None, mean: list[float] | None = None,
                       std: list[float] | None = None, class_names: list[str] | None = None,
                       arch_kwargs: dict[str, Any] | None = None, idempotency_key: str | None = None) -> Teacher:
        """Upload a teacher file (safetensors or ONNX), streamed from disk; it starts as `validating`.

        `arch_kwargs`: timm keyword arguments of a non-default shape (a ViT's ``{"patch_size": 4}``).

        With `idempotency_key`, sending the same upload again returns the first teacher (no duplicate).
        """
        path = Path(path)
        metadata = _drop_none({"name": name, "arch": arch, "num_classes": num_classes, "in_chans": in_chans,
                               "img_size": img_size, "mean": mean, "std": std, "class_names": class_names,
                               "kwargs": arch_kwargs})
        with path.open("rb") as fh:
            body = self._json("POST", "/v1/teachers", data={"metadata": json.dumps(metadata)},
                              files={"file": (path.name, fh, "application/octet-stream")},
                              headers=_idempotency(idempotency_key))
        return Teacher.from_dict(body)

    def list_teachers(self, *, limit: int = 50, offset: int = 0) -> Page[Teacher]:
        return self._page("/v1/teachers", Teacher, limit, offset)

    def get_teacher(self, teacher_id: str) -> Teacher:
        return Teacher.from_dict(self._json("GET", f"/v1/teachers/{teacher_id}"))

    def delete_teacher(self, teacher_id: str) -> None:
        self._request("DELETE", f"/v1/teachers/{teacher_id}")

    def wait_teacher(self, teacher_id: str, *, poll: float = 0.5, timeout: float | None = 300.0) -> Teacher:
        """Poll until the teacher is `ready` or `invalid` (check `.status` / `.error`)."""
        return self._wait_upload(self.get_teacher, teacher_id, "Teacher", poll, timeout)

    # ------------------------------------------------------------------ datasets

    def upload_dataset(self, path: str | os.PathLike[str], name: str, kind: str = "npz", *,
                       idempotency_key: str | None = None) -> Dataset:
        """Upload a dataset file (`npz` or `image_folder_zip`), streamed from disk."""
        path = Path(path)
        with path.open("rb") as fh:
            body = self._json("POST", "/v1/datasets", data={"metadata": json.dumps({"name": name, "kind": kind})},
                              files={"file": (path.name, fh, "application/octet-stream")},
                              headers=_idempotency(idempotency_key))
        return Dataset.from_dict(body)

    def register_builtin_dataset(self, name: str, builtin: str, *, idempotency_key: str | None = None) -> Dataset:
        """Register a built-in dataset (e.g. `digits`) under `name` (POST /v1/datasets/builtin)."""
        return Dataset.from_dict(self._json("POST", "/v1/datasets/builtin", json={"name": name, "builtin": builtin},
                                            headers=_idempotency(idempotency_key)))

    def register_reference_dataset(self, name: str, uri: str, format: str, *,  # noqa: A002 - the API's field
                                   idempotency_key: str | None = None) -> Dataset:
        """Register a dataset read in place: `uri` (file:// or s3://..., under the server's KDIGA_DATASET_ROOTS),
        `format` image_folder or webdataset (POST /v1/datasets/reference)."""
        return Dataset.from_dict(self._json("POST", "/v1/datasets/reference",
                                            json={"name": name, "uri": uri, "format": format},
                                            headers=_idempotency(idempotency_key)))

    def list_datasets(self, *, limit: int = 50, offset: int = 0) -> Page[Dataset]:
        return self._page("/v1/datasets", Dataset, limit, offset)

    def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.from_dict(self._json("GET", f"/v1/datasets/{dataset_id}"))

    def wait_dataset(self, dataset_id: str, *, poll: float = 0.5, timeout: float | None = 300.0) -> Dataset:
        """Poll until the dataset is `ready` or `invalid` (check `.status` / `.error`)."""
        return self._wait_upload(self.get_dataset, dataset_id, "Dataset", poll, timeout)

    def _wait_upload(self, get: Callable[[str], _Upload], rid: str, what: str, poll: float,
                     timeout: float | None) -> _Upload:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            obj = get(rid)
            if obj.status in TERMINAL_UPLOAD_STATES:
                return obj
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"{what} {rid} is still '{obj.status}' after {timeout:g} s.")
            time.sleep(poll)

    # ------------------------------------------------------------------ jobs

    def create_job(self, kind: str, dataset_id: str, *, teacher_id: str | None = None,
                   student: dict[str, Any] | None = None, objective: dict[str, Any] | None = None,
                   train: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
                   model: dict[str, Any] | None = None, name: str | None = None,
                   idempotency_key: str | None = None, labels: dict[str, str] | None = None,
                   notify: dict[str, Any] | None = None, resources: dict[str, int] | None = None,
                   threat_model: dict[str, Any] | None = None) -> Job:
        """Create a `distill`, `adversarial_train` or `evaluate` job; it starts `queued`.

        What is left out is sized to the dataset by the service (the job's ``spec.defaulted`` lists
        those values); `threat_model` (``{"norm": "Linf" | "L2", "eps", "step"}``) is the one
        threat model of the job's training attacks, IGA noise and report.

        `labels`: `{key: value}` to find it by (`?label=key=value`); `notify`: `{"url", "events"}`
        for signed webhooks (see `kdiga_client.webhooks`). `resources` (``{"nodes": N,
        "devices_per_node": M}``) runs a training job on N worker hosts × M devices (GPUs, or
        processes on a CPU worker); ``train.batch_size`` is then per device.
        """
        body = _drop_none({"kind": kind, "name": name, "dataset_id": dataset_id, "teacher_id": teacher_id,
                           "student": student, "model": model, "objective": objective, "train": train,
                           "evaluation": evaluation, "labels": labels, "notify": notify, "resources": resources,
                           "threat_model": threat_model})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return Job.from_dict(self._json("POST", "/v1/jobs", json=body, headers=headers))

    def submit_job(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Create a job from a full JSON spec (the body of POST /v1/jobs)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return Job.from_dict(self._json("POST", "/v1/jobs", json=spec, headers=headers))

    def list_jobs(self, *, limit: int = 50, offset: int = 0, status: str | None = None) -> Page[Job]:
        return self._page("/v1/jobs", Job, limit, offset, status=status)

    def get_job(self, job_id: str) -> Job:
        return Job.from_dict(self._json("GET", f"/v1/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> Job:
        """Ask the job to stop (cooperative); ConflictError when it has already finished."""
        return Job.from_dict(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def resume_job(self, job_id: str, *, time_budget_s: float | None = None) -> Job:
        """Queue a `stopped` job again (or one that failed after training): it continues from its last
        checkpoint, with a new ``time_budget_s`` when given; ConflictError for any other status."""
        body = {"time_budget_s": time_budget_s} if time_budget_s is not None else None
        return Job.from_dict(self._json("POST", f"/v1/jobs/{job_id}/resume", json=body))

    def stream_events(self, job_id: str, *, read_timeout: float | None = 60.0) -> Iterator[JobEvent]:
        """Yield the job's server-sent events until the stream ends (after the `end` event)."""
        timeout = self._timeout(read=read_timeout)
        with self._unreachable_as_error(), self._http.stream(
                "GET", f"/v1/jobs/{job_id}/events", timeout=timeout,
                headers={"Accept": "text/event-stream"}) as response:
            self._raise_for(response)
            for event, data in _parse_sse(response.iter_lines()):
                yield self._event(event, data)
                if event == "end":
                    return

    @staticmethod
    def _event(event: str, data: str) -> JobEvent:
        try:
            payload: Any = json.loads(data)
        except ValueError:
            payload = data
        job = Job.from_dict(payload) if isinstance(payload, dict) and "id" in payload else None
        return JobEvent(event, job, payload)

    def wait_job(self, job_id: str, *, on_progress: Callable[[Job], None] | None = None, poll: float = 1.0,
                 timeout: float | None = None, use_events: bool = True) -> Job:
        """Block until the job finishes; return it when `succeeded`.

        Follows the SSE stream and falls back to polling every `poll` seconds when the stream is
        unavailable or breaks. `on_progress(job)` is called on every update.

        Raises:
            JobFailedError / JobCancelledError: the job ended `failed` / `cancelled`.
            WaitTimeoutError: still running after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = None
        if use_events:
            while True:
                job, stalled = self._wait_events(job_id, on_progress, deadline)
                if job is not None or not stalled or (deadline is not None and time.monotonic() >= deadline):
                    break
                time.sleep(min(poll, 1.0))
        if job is None or not job.is_finished:
            job = self._wait_poll(job_id, on_progress, poll, deadline)
        return self._final(job)

    def _wait_events(self, job_id: str, on_progress: Callable[[Job], None] | None,
                     deadline: float | None) -> tuple[Job | None, bool]:
        """Follow the SSE stream: (finished job, _) or (None, stalled); the caller reconnects or polls."""
        last = None
        try:
            read = 30.0 if deadline is None else max(0.1, min(30.0, deadline - time.monotonic()))
            for ev in self.stream_events(job_id, read_timeout=read):
                if ev.job is not None:
                    last = ev.job
                    if on_progress is not None:
                        on_progress(ev.job)
                if ev.event == "end" or (last is not None and last.is_finished):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
        except (KdigaError, httpx.HTTPError) as exc:
            # A stalled or broken stream is reconnected; an unavailable one (or a real error such as
            # 404/401, which polling raises again with its detail) makes the caller poll.
            cause = exc.__cause__ if isinstance(exc, KdigaError) else exc
            return None, isinstance(cause, (httpx.ReadTimeout, httpx.RemoteProtocolError))
        if last is None or not last.is_finished:
            return None, last is not None
        final = self.get_job(job_id)  # the stored row, with its final artifacts and result
        if on_progress is not None:
            on_progress(final)
        return final, False

    def _wait_poll(self, job_id: str, on_progress: Callable[[Job], None] | None, poll: float,
                   deadline: float | None) -> Job:
        last_seen: Any = None
        while True:
            try:
                job = self.get_job(job_id)
            except RateLimitError as exc:
                time.sleep(exc.retry_after or poll)
                continue
            if on_progress is not None and job.raw != last_seen:
                on_progress(job)
                last_seen = job.raw
            if job.is_finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"Job {job_id} is still '{job.status}' after the wait timed out.")
            time.sleep(poll)

    @staticmethod
    def _final(job: Job) -> Job:
        if job.status == "failed":
            raise JobFailedError(job)
        if job.status == "stopped":
            raise JobStoppedError(job)
        if job.status == "cancelled":
            raise JobCancelledError(job)
        return job

    # ------------------------------------------------------------------ reports and artifacts

    def get_report(self, job_id: str, format: str = "json") -> dict[str, Any] | str:
        """The job's robustness report: a dict (`json`) or the HTML page as a string (`html`)."""
        if format not in ("json", "html"):
            raise ValueError("format must be 'json' or 'html'.")
        if format == "html":
            return self._request("GET", f"/v1/jobs/{job_id}/report", params={"format": "html"}).text
        return _object(self._json("GET", f"/v1/jobs/{job_id}/report"))

    def download_artifact(self, artifact_id: str, dest: str | os.PathLike[str], *,
                          expected_sha256: str | None = None) -> Path:
        """Stream an artifact to `dest` (a file path, or an existing directory: the server's file name).

        Written to a temporary file and renamed, so `dest` is either complete or absent. When
        `expected_sha256` is given, a mismatch raises KdigaError and nothing is kept.
        """
        dest = Path(dest)
        with self._unreachable_as_error(), self._http.stream("GET", f"/v1/artifacts/{artifact_id}") as response:
            self._raise_for(response)
            if dest.is_dir():
                dest = dest / (_filename_from(response) or artifact_id)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.part")
            digest = hashlib.sha256()
            try:
                with tmp.open("wb") as fh:
                    for chunk in response.iter_bytes(_CHUNK):
                        fh.write(chunk)
                        digest.update(chunk)
                if expected_sha256 and digest.hexdigest() != expected_sha256:
                    raise KdigaError(f"Artifact {artifact_id} arrived corrupted (sha256 mismatch); try again.")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return dest

    def download_job(self, job_id: str, dest_dir: str | os.PathLike[str], *,
                     kinds: set[str] | None = None, include_checkpoints: bool = False) -> dict[str, Path]:
        """Download the job's artifacts into `dest_dir`; returns {artifact name: path}.

        Checkpoints are skipped unless `include_checkpoints`; `kinds` restricts to those kinds.
        """
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for art in self.get_job(job_id).artifacts:
            if art.kind == "checkpoint" and not include_checkpoints:
                continue
            if kinds is not None and art.kind not in kinds:
                continue
            name = _safe_name(art.name or art.id)
            paths[name] = self.download_artifact(art.id, dest_dir / name, expected_sha256=art.sha256)
        return paths
