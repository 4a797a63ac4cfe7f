"""GET /v1/jobs/{id}/events through one shared poller per process (api/job_watch.py), on a real server."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
from api_helpers import distill_body, finish, new_key, ready_dataset, ready_teacher, serve
from fastapi.testclient import TestClient

from api.main import create_app
from kdiga_service import crud


async def _open_streams(url: str, headers: dict[str, str], job_ids: list[str], opened: list[int]) -> list[list[str]]:
    """Open one stream per id; return each stream's event names once it ends."""
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30,
                                 limits=httpx.Limits(max_connections=len(job_ids))) as client:
        async def one(job_id: str) -> list[str]:
            events = []
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                assert response.status_code == 200
                opened.append(1)
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        events.append(line[7:])
            return events

        return await asyncio.gather(*(one(j) for j in job_ids))


def test_many_streams_share_one_poll(tmp_path, settings):
    settings = settings.model_copy(update={"sse_poll_interval_s": 0.1, "max_concurrent_jobs_per_key": 10})
    app = create_app(settings)
    with serve(app) as url, TestClient(app) as tc:
        owner, _ = new_key(tc)
        body = distill_body(ready_dataset(tc, owner), ready_teacher(tc, owner))
        jobs = [tc.post("/v1/jobs", headers=owner, json=body).json()["id"] for _ in range(3)]
        watcher, opened = app.state.job_watcher, []
        streams = jobs * 20  # 60 streams on 3 jobs
        loop_result: list = []

        def run() -> None:
            loop_result.append(asyncio.run(_open_streams(url, owner, streams, opened)))

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 30
        while len(opened) < len(streams) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.watched == len(streams)
        polls, start = watcher.polls, time.monotonic()
        time.sleep(1.0)
        rate = (watcher.polls - polls) / (time.monotonic() - start)
        assert rate <= 1 / settings.sse_poll_interval_s + 2  # one query per interval, not one per stream
        with app.state.sessionmaker() as session:
            claimed = crud.claim_job(session, jobs[0], "w")
            crud.update_progress(session, claimed.id, progress={"phase": "train", "percent": 50.0}, worker_id="w")
        for job_id in jobs[1:]:
            finish(tc, job_id)
        with app.state.sessionmaker() as session:
            crud.finish_job(session, jobs[0], result={}, worker_id="w")
        thread.join(timeout=30)
        assert not thread.is_alive()
        events = loop_result[0]
        assert all(e[-1] == "end" for e in events)
        assert all("progress" in e for e in events)
        assert watcher.watched == 0  # every stream let go of its watch


def test_a_stream_of_another_owners_job_is_not_found(client, owner):
    body = distill_body(ready_dataset(client, owner), ready_teacher(client, owner))
    job_id = client.post("/v1/jobs", headers=owner, json=body).json()["id"]
    other, _ = new_key(client)
    r = client.get(f"/v1/jobs/{job_id}/events", headers=other)
    assert r.status_code == 404 and r.json() == {"detail": f"Job '{job_id}' not found."}
    finish(client, job_id)
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=owner) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == "event: progress" and lines[-2] == "event: end"
    assert json.loads(lines[-1][6:])["status"] == "succeeded"
