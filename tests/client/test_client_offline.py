"""Client pieces that need no server: SSE parsing, tolerant models, spec building, the demo's table,
and what the SDK says when nothing listens. Everything that talks to a server runs against the
real embedded service in test_client_live.py (no fake of our own API)."""

from __future__ import annotations

import socket

import pytest

from kdiga_client import Job, KdigaError, ServerUnreachableError, cli
from kdiga_client.client import Client, _parse_sse

KEY = "kdg_not_a_real_key"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_says_where():
    url = f"http://127.0.0.1:{_closed_port()}"
    with Client(url, KEY, timeout=2) as c, pytest.raises(ServerUnreachableError) as info:
        c.list_jobs()
    assert str(info.value).startswith(f"Cannot reach the kdiga server at {url}: ")
    assert isinstance(info.value, KdigaError) and info.value.status is None


def test_sse_parser_handles_comments_multiline_and_missing_final_blank():
    lines = [": hi", "event: progress", 'data: {"a":', "data: 1}", "", "id: 3", "event: end", "data: {}"]
    assert list(_parse_sse(iter(lines))) == [("progress", '{"a":\n1}'), ("end", "{}")]


def test_unknown_fields_are_kept_not_fatal():
    job = Job.from_dict({"id": "j", "status": "queued", "brand_new": 1, "progress": {"percent": 5, "x": 2}})
    assert job.raw["brand_new"] == 1 and job.progress.percent == 5 and job.progress.raw["x"] == 2


def test_build_job_spec_evaluate_model_ref():
    spec = cli.build_job_spec(kind="evaluate", dataset="d", model_job="j1", eval_attacks=["pgd"], eval_norm="L2")
    assert spec == {"kind": "evaluate", "dataset_id": "d", "model": {"job_id": "j1"},
                    "evaluation": {"attacks": [{"name": "pgd", "norm": "L2"}]}}


def test_build_job_spec_resources_and_accumulation():
    spec = cli.build_job_spec(dataset="d", train={"batch_size": 32, "grad_accum_steps": 2},
                              resources={"nodes": 2, "devices_per_node": None})
    assert spec == {"kind": "distill", "dataset_id": "d", "train": {"batch_size": 32, "grad_accum_steps": 2},
                    "resources": {"nodes": 2}}
    assert "resources" not in cli.build_job_spec(dataset="d", resources={"nodes": None, "devices_per_node": None})


def test_student_kwargs_flag_and_its_one_sentence():
    spec = cli.build_job_spec(dataset="d", student_arch="vit_tiny_patch16_224", student_kwargs={"patch_size": 4})
    assert spec["student"] == {"arch": "vit_tiny_patch16_224", "kwargs": {"patch_size": 4}}
    assert cli._json_object('{"depth": 2}', "--student-kwargs") == {"depth": 2}
    for bad in ("[4]", "patch_size=4"):
        with pytest.raises(cli._Fail) as info:
            cli._json_object(bad, "--student-kwargs")
        assert str(info.value).startswith("--student-kwargs must be a JSON object")


def test_progress_lines_say_how_old_the_progress_is():
    """A long attack batch reports nothing for minutes: the CI line says how old its numbers are."""
    import datetime as dt

    from kdiga_client.client import Job
    from kdiga_client.progress_lines import describe

    old = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).isoformat()
    progress = {"phase": "evaluate", "stage": "model: autoattack (APGD-T)", "percent": 40.0, "eta_s": 90,
                "job_percent": 70.0, "job_eta_s": 120, "updated_at": old}
    job = Job.from_dict({"id": "j1", "kind": "evaluate", "status": "running", "progress": progress})
    key, text = describe(job)
    assert key == ("running", "evaluate", "model: autoattack (APGD-T)", None)
    assert text.startswith("running · evaluate · model: autoattack (APGD-T) · 40% (job 70%) · ETA 1:30 (job 2:00)")
    assert text.endswith("last progress 5:00 ago") or text.endswith("last progress 5:01 ago")
    fresh = Job.from_dict({**job.to_dict(), "progress": {**progress, "updated_at": dt.datetime.now(dt.UTC).isoformat()}})
    assert "last progress" not in describe(fresh)[1] and "\r" not in text


def test_build_job_spec_time_budget():
    assert cli.build_job_spec(dataset="d", limits={"time_budget_s": 90.0})["limits"] == {"time_budget_s": 90.0}
    assert "limits" not in cli.build_job_spec(dataset="d", limits={"time_budget_s": None})
