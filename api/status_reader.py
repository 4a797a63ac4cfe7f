"""Job-status reads, the service's hot path: clients poll `GET /v1/jobs/{id}`.

On a networked database (PostgreSQL) this is `crud.job_status` in a worker thread. On SQLite (the
embedded default) the API runs it inline in the event loop, on one plain `sqlite3` connection per
API process, with the SQL that SQLAlchemy compiles for `crud.job_status`'s own statements: a
status read then costs ~25 µs of database work instead of ~85 µs through a pooled SQLAlchemy
connection (BENCHMARKS.md, "API"). The rows are decoded the way the models' column types do it
(JSON text, naive UTC timestamps, 0/1 booleans); tests/api/test_status_reader.py checks that both
paths give the same JobPublic for the same job.

`answer` also keeps, per job, the serialised JobPublic and its ETag keyed by the raw rows they were
made from: a poller reading a job that has not changed since the last read (the common case: progress
is written every few seconds, polls come faster) costs the two indexed SELECTs and a tuple comparison,
not the JSON decoding, the model validation and the JSON encoding (~60% of a read's CPU, profiled in
BENCHMARKS.md "API status reads, profiled"). The key is the rows themselves, so a stale answer is
never served.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import OrderedDict
from typing import Any

from sqlalchemy import Engine

from api.schemas import JobPublic
from kdiga_service import crud

ANSWERS_KEPT = 1024  # jobs whose last answer is kept: rows and answer are ~2-10 KB each, so <= ~20 MB

_JSON_FIELDS = frozenset({"spec", "progress", "metrics", "result", "labels"})
_TIME_FIELDS = frozenset({"created_at", "started_at", "finished_at"})


def _compiled(stmt: Any, engine: Engine) -> tuple[str, tuple[str, ...]]:
    """The statement's SQL for this dialect and the order of its `?` parameters."""
    compiled = stmt.compile(dialect=engine.dialect)
    return str(compiled), tuple(compiled.positiontup or ())


def _decode(keys: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(keys, row, strict=True))
    for key in _JSON_FIELDS.intersection(out):
        if isinstance(out[key], str):
            out[key] = json.loads(out[key])
    for key in _TIME_FIELDS.intersection(out):
        if isinstance(out[key], str):
            out[key] += "Z"  # stored naive, always UTC (models.UTCDateTime)
    return out


def _fields(job: tuple[Any, ...], artifacts: tuple[tuple[Any, ...], ...]) -> dict[str, Any]:
    fields = _decode(crud.JOB_STATUS_KEYS, job)
    fields["artifacts"] = [_decode(crud.ARTIFACT_KEYS, a) for a in artifacts]
    return fields


def _serialise(fields: dict[str, Any]) -> tuple[bytes, str]:
    body = JobPublic.model_validate(fields).model_dump_json().encode()
    return body, '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


class StatusReader:
    """`read(owner_id, job_id)`: JobPublic's fields, or None when the owner has no such job."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.sqlite_path = engine.url.database if engine.dialect.name == "sqlite" else None
        if self.sqlite_path in ("", ":memory:"):
            self.sqlite_path = None  # an in-memory database lives in the engine's own connection
        self._conn: sqlite3.Connection | None = None
        # job id -> (the raw rows, (body, etag)): the last answer made for each job, oldest first
        self._answers: OrderedDict[str, tuple[Any, tuple[bytes, str]]] = OrderedDict()
        self._job_sql = _compiled(crud.JOB_STATUS_QUERY, engine)
        self._artifacts_sql = _compiled(crud.JOB_ARTIFACTS_QUERY, engine)

    def read(self, owner_id: str, job_id: str) -> dict[str, Any] | None:
        if self.sqlite_path is None:
            return crud.job_status(self.engine, owner_id=owner_id, job_id=job_id)
        rows = self._rows(owner_id, job_id)
        return None if rows is None else _fields(*rows)

    def answer(self, owner_id: str, job_id: str) -> tuple[bytes, str] | None:
        """The job's JobPublic as JSON bytes and its ETag, or None when the owner has no such job."""
        if self.sqlite_path is None:
            fields = crud.job_status(self.engine, owner_id=owner_id, job_id=job_id)
            return None if fields is None else _serialise(fields)
        rows = self._rows(owner_id, job_id)
        if rows is None:
            return None
        kept = self._answers.get(job_id)
        if kept is not None and kept[0] == rows:
            return kept[1]
        made = _serialise(_fields(*rows))
        self._answers[job_id] = (rows, made)
        self._answers.move_to_end(job_id)
        if len(self._answers) > ANSWERS_KEPT:
            self._answers.popitem(last=False)
        return made

    def _rows(self, owner_id: str, job_id: str) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        params = {"owner_id": owner_id, "job_id": job_id}
        conn = self._connection()
        job = conn.execute(self._job_sql[0], [params[p] for p in self._job_sql[1]]).fetchone()
        if job is None:
            return None
        artifacts = conn.execute(self._artifacts_sql[0], [params[p] for p in self._artifacts_sql[1]]).fetchall()
        return tuple(job), tuple(tuple(a) for a in artifacts)

    def _connection(self) -> sqlite3.Connection:
        # Autocommit (isolation_level=None): each SELECT is its own read transaction, so a WAL
        # reader always sees the worker's latest committed progress and never holds a snapshot.
        if self._conn is None:
            assert self.sqlite_path is not None  # this reader is only built for a SQLite database
            conn = sqlite3.connect(self.sqlite_path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA query_only=ON")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
