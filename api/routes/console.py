"""The web console at /ui: server-rendered pages (Jinja2 templates shipped in the package), one small
script served by the app for live progress, no build step, nothing fetched from elsewhere.

Every page acts as the API key its session was opened with and reads through the same crud
helpers as the API (another key's job is "not found" here too). The job form, the cancel button,
the live stream and the downloads call the API's own route functions, so the console can never
drift from what the API allows.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, FastAPI, Form, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import AuthError, authenticate
from api.console_session import (
    LOGIN_CSRF_COOKIE,
    PATH,
    ConsoleUser,
    UserDep,
    check_csrf,
    close_session,
    current_user,
    open_session,
    set_cookie,
)
from api.errors import pydantic_sentence
from api.routes import artifacts as artifact_routes
from api.routes import jobs as job_routes
from api.schemas import JobCreate
from api.schemas_mlops import check_labels
from kdiga_service import crud
from kdiga_service.catalog import load_catalog, methods_by_kind
from kdiga_service.models import ACTIVE_STATES, READY, Artifact, Dataset, Job, Teacher

HERE = Path(__file__).resolve().parents[1] / "console"
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix=PATH, include_in_schema=False)

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
}
# The report is self-contained (inline CSS, data: images, no script): sandboxed, shown in our frame only.
REPORT_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "frame-ancestors 'self'", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
}
LOG_TAIL_LINES = 200
LIST_LIMIT = 100


def page(request: Request, name: str, context: dict[str, Any], code: int = 200) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=code)
    response.headers.update(PAGE_HEADERS)
    return response


def _with_session(request: Request, fn: Any, *args: Any) -> Any:
    with request.app.state.sessionmaker() as session:
        return fn(session, *args)


# -- sign in and out -------------------------------------------------------------------------------
@router.get("", response_class=HTMLResponse)
async def console_home() -> Response:
    return RedirectResponse(f"{PATH}/jobs", status_code=status.HTTP_303_SEE_OTHER)


def _login_page(request: Request, error: str | None = None, code: int = 200) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = page(request, "login.html", {"csrf_token": token, "error": error, "user": None}, code)
    set_cookie(response, request, LOGIN_CSRF_COOKIE, token, 3600)
    return response


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> Response:
    if await current_user(request) is not None:
        return RedirectResponse(f"{PATH}/jobs", status_code=status.HTTP_303_SEE_OTHER)
    return _login_page(request)


def _check_key(session: Session, key: str) -> str:
    return authenticate(session, key).id


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, api_key: Annotated[str, Form(max_length=300)] = "",
                csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
    check_csrf(request, request.cookies.get(LOGIN_CSRF_COOKIE, ""), csrf_token)
    try:
        owner_id = await to_thread.run_sync(_with_session, request, _check_key, api_key.strip())
    except AuthError as exc:
        return _login_page(request, str(exc), status.HTTP_401_UNAUTHORIZED)
    response = RedirectResponse(f"{PATH}/jobs", status_code=status.HTTP_303_SEE_OTHER)
    await to_thread.run_sync(open_session, request, response, owner_id)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=PATH)
    return response


@router.post("/logout")
async def logout(request: Request, user: UserDep, csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
    check_csrf(request, user.csrf_token, csrf_token)
    response = RedirectResponse(f"{PATH}/login", status_code=status.HTTP_303_SEE_OTHER)
    await to_thread.run_sync(close_session, request, response)
    return response


# -- lists -----------------------------------------------------------------------------------------
def _rows(session: Session, model: Any, owner_id: str) -> list[Any]:
    rows, _count = crud.list_owned(session, model, owner_id=owner_id, limit=LIST_LIMIT)
    for row in rows:
        session.expunge(row)
    return list(rows)


def _list(name: str, model: Any, what: str) -> Any:
    async def list_page(request: Request, user: UserDep) -> HTMLResponse:
        rows = await to_thread.run_sync(_with_session, request, _rows, model, user.owner.id)
        return page(request, name, {"user": user, "rows": rows, "active": ACTIVE_STATES, "what": what})

    list_page.__name__ = f"console_{what}"
    return list_page


router.add_api_route("/jobs", _list("jobs.html", Job, "jobs"), methods=["GET"], response_class=HTMLResponse)
router.add_api_route("/teachers", _list("teachers.html", Teacher, "teachers"), methods=["GET"],
                     response_class=HTMLResponse)
router.add_api_route("/datasets", _list("datasets.html", Dataset, "datasets"), methods=["GET"],
                     response_class=HTMLResponse)


# -- the job form ----------------------------------------------------------------------------------
def _ready(session: Session, model: Any, owner_id: str) -> list[Any]:
    return [r for r in _rows(session, model, owner_id) if r.status == READY]


async def _form_page(request: Request, user: ConsoleUser, values: dict[str, Any], error: str | None = None,
                     code: int = 200) -> HTMLResponse:
    teachers = await to_thread.run_sync(_with_session, request, _ready, Teacher, user.owner.id)
    datasets = await to_thread.run_sync(_with_session, request, _ready, Dataset, user.owner.id)
    return page(request, "new_job.html", {
        "user": user, "teachers": teachers, "datasets": datasets, "values": values, "error": error,
        "architectures": load_catalog()["architectures"], "methods": methods_by_kind()["distill"],
    }, code)


@router.get("/jobs/new", response_class=HTMLResponse)
async def new_job_form(request: Request, user: UserDep) -> HTMLResponse:
    defaults = {"arch": "cnn_tiny", "method": "kdiga", "epochs": 10, "gamma": 5.0, "name": "", "labels": "",
                "eps": round(8 / 255, 5), "evaluation": "standard"}
    return await _form_page(request, user, defaults)


def parse_labels(text: str) -> dict[str, str]:
    """`key=value` per line (or comma-separated) as a dict; ValueError with the first problem."""
    labels = {}
    for item in text.replace(",", "\n").splitlines():
        if item.strip():
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise ValueError(f"the label '{item.strip()[:60]}' must look like key=value")
            labels[key.strip()] = value.strip()
    return check_labels(labels)


def evaluation_preset(name: str, eps: Any) -> dict[str, Any]:
    """`standard`: PGD-20 and AutoAttack (the headline) on 1000 points with every section of the report;
    `quick`: PGD-20 alone on 200 points, no curve, certificates or latency (a first look in seconds)."""
    if name == "quick":
        return {"attacks": [{"name": "pgd", "eps": eps}], "max_points": 200, "eps_curve": [0.0, eps],
                "alignment": False, "smoothing_sigma": 0.0, "latency": False}
    return {"attacks": [{"name": "pgd", "eps": eps}, {"name": "autoattack", "eps": eps}]}


def _job_request(form: dict[str, Any]) -> JobCreate:
    labels = parse_labels(form.get("labels") or "")
    return JobCreate.model_validate({
        "kind": "distill", "name": form.get("name") or None, "dataset_id": form.get("dataset_id") or "",
        "teacher_id": form.get("teacher_id") or None, "student": {"arch": form.get("arch") or ""},
        "objective": {"method": form.get("method") or "kdiga", "gamma": form.get("gamma") or 5.0},
        "train": {"epochs": form.get("epochs") or 10},
        "evaluation": evaluation_preset(form.get("evaluation") or "standard", form.get("eps") or 8 / 255),
        "labels": labels or None,
    })


def _submit(request: Request, user: ConsoleUser, body: JobCreate) -> str:
    with request.app.state.sessionmaker() as session:
        job = job_routes.create_job(body=body, response=Response(), owner=user.owner, session=session,
                                    settings=request.app.state.settings, idempotency_key=None)
        return job.id


@router.post("/jobs", response_class=HTMLResponse)
async def submit_job(request: Request, user: UserDep) -> Response:
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    check_csrf(request, user.csrf_token, form.get("csrf_token"))
    try:
        job_id = await to_thread.run_sync(_submit, request, user, _job_request(form))
    except ValidationError as exc:
        return await _form_page(request, user, form, pydantic_sentence(exc), status.HTTP_422_UNPROCESSABLE_CONTENT)
    except ValueError as exc:
        return await _form_page(request, user, form, f"Invalid labels: {exc}.", status.HTTP_422_UNPROCESSABLE_CONTENT)
    except HTTPException as exc:
        return await _form_page(request, user, form, str(exc.detail), exc.status_code)
    return RedirectResponse(f"{PATH}/jobs/{job_id}", status_code=status.HTTP_303_SEE_OTHER)


# -- one job ---------------------------------------------------------------------------------------
def _job_view(session: Session, owner_id: str, job_id: str, store: Any) -> dict[str, Any] | None:
    job = crud.get_owned(session, Job, owner_id=owner_id, id=job_id)
    if job is None:
        return None
    arts = session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)).all()
    logs = {a.name: _tail(store, a.storage_key) for a in arts if a.name.endswith(".log")}
    events, _attempts = crud.job_deliveries(session, job_id=job.id)
    view = {"job": job, "artifacts": list(arts), "logs": logs, "events": list(events),
            "has_report": any(a.kind == "report_html" for a in arts),
            "spec": json.dumps(job.spec, indent=2, sort_keys=True),
            "metrics": {k: v for k, v in (job.metrics or {}).items() if not isinstance(v, dict)}}
    session.expunge_all()
    return view


def _tail(store: Any, key: str) -> str:
    try:
        text = store.read_bytes(key, max_bytes=8 * 1024 * 1024).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - a missing log is shown as such, the page still renders
        return "(the log file could not be read)"
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


def _not_found(request: Request, user: ConsoleUser, job_id: str) -> HTMLResponse:
    return page(request, "not_found.html", {"user": user, "what": f"Job '{job_id}' not found."}, 404)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(job_id: str, request: Request, user: UserDep) -> HTMLResponse:
    view = await to_thread.run_sync(_with_session, request, _job_view, user.owner.id, job_id,
                                    request.app.state.storage)
    if view is None:
        return _not_found(request, user, job_id)
    return page(request, "job.html", {"user": user, "active": ACTIVE_STATES, **view})


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, user: UserDep) -> Response:
    """The API's own server-sent events stream, for the signed-in key."""
    return await job_routes.stream_job_events(job_id, request, user.owner)


@router.get("/jobs/{job_id}/report", response_class=HTMLResponse)
async def job_report(job_id: str, request: Request, user: UserDep) -> Response:
    def read(session: Session) -> Response:
        return job_routes.read_job_report(job_id, user.owner, session, request.app.state.storage, "html")

    try:
        response: Response = await to_thread.run_sync(_with_session, request, read)
    except HTTPException as exc:
        return page(request, "not_found.html", {"user": user, "what": exc.detail}, exc.status_code)
    response.headers.update(REPORT_HEADERS)
    return response


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, user: UserDep,
                     csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
    check_csrf(request, user.csrf_token, csrf_token)

    def cancel(session: Session) -> None:
        job_routes.cancel_job(job_id, user.owner, session)

    try:
        await to_thread.run_sync(_with_session, request, cancel)
    except HTTPException as exc:
        if exc.status_code == status.HTTP_404_NOT_FOUND:
            return _not_found(request, user, job_id)
    return RedirectResponse(f"{PATH}/jobs/{job_id}", status_code=status.HTTP_303_SEE_OTHER)


@router.get("/artifacts/{artifact_id}")
async def download(artifact_id: str, request: Request, user: UserDep) -> Response:
    def fetch(session: Session) -> Response:
        return artifact_routes.download_artifact(artifact_id, user.owner, session, request.app.state.storage,
                                                 request.app.state.settings)

    try:
        return await to_thread.run_sync(_with_session, request, fetch)
    except HTTPException as exc:
        return page(request, "not_found.html", {"user": user, "what": exc.detail}, exc.status_code)


def install(app: FastAPI) -> None:
    """Mount the console's pages and its static files (CSS, the live-progress script)."""
    app.include_router(router)
    app.mount(f"{PATH}/static", StaticFiles(directory=str(HERE / "static")), name="console-static")
