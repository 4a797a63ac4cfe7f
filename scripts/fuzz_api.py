"""Fuzz the whole OpenAPI document with schemathesis against the real app: `make fuzz`.

Starts the API (uvicorn, in this process) on a loopback port with a fresh SQLite database and the
real Redis (on queue names no worker reads), creates an API key and a few real resources (a ready
dataset and teacher, a finished job with a report and artifacts, so that ids in examples exist),
then runs `st run` over every operation with a fixed seed and every check, and prints one summary:
cases, answers by status, failures by check. tests/api/test_fuzz.py runs a bounded version;
FUZZING.md records the long run.

    python scripts/fuzz_api.py --max-examples 600 --seed 1 [--out fuzz-report]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "api"))

REDIS_URL = os.environ.get("KDIGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Checks that judge the API against its document; `all` minus those that need a second user or
# links between operations the document does not declare.
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection,missing_required_header,unsupported_method,"
          "ignored_auth,use_after_free,ensure_resource_availability")


def seed_resources(app: Any) -> dict[str, str]:
    """An API key and real resources of each kind; returns the key and the ids."""
    from api_helpers import distill_body, finish, new_key, ready_dataset, ready_teacher
    from fastapi.testclient import TestClient

    with TestClient(app) as tc:
        headers, _ = new_key(tc, "fuzz", is_admin=False)
        dataset_id, teacher_id = ready_dataset(tc, headers), ready_teacher(tc, headers)
        job_id = tc.post("/v1/jobs", headers=headers, json=distill_body(dataset_id, teacher_id)).json()["id"]
        finish(tc, job_id, artifacts={"report_json": b'{"models": {"student": {"clean_accuracy": NaN}}}',
                                      "student_weights": b"weights"})
    return {"auth": headers["Authorization"], "dataset_id": dataset_id, "teacher_id": teacher_id, "job_id": job_id}


def make_app(home: Path) -> Any:
    from api.main import create_app
    from kdiga_service.settings import Settings

    run = uuid.uuid4().hex[:8]
    settings = Settings(home=home, broker_url=REDIS_URL, queue_train=f"kdiga_fuzz_{run}", queue_eval=f"kdiga_fuzz_{run}",
                        queue_validate=f"kdiga_fuzz_{run}",
                        max_upload_bytes=64 * 1024, max_concurrent_jobs_per_key=10**6, auth_cache_ttl_s=2.0,
                        requeue_after_s=0)
    return create_app(settings)


def summarise(ndjson: Path) -> dict[str, Any]:
    """Requests sent ("cases": every interaction, examples and shrinking included), answers by
    status code, and failed checks by name, from schemathesis' NDJSON events."""
    statuses: collections.Counter[str] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    cases = 0
    for line in ndjson.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        for kind, body in event.items():
            if kind != "ScenarioFinished":
                continue
            for case in (body.get("recorder") or {}).get("interactions", {}).values():
                response = case.get("response") or {}
                cases += 1
                statuses[str(response.get("status_code", "no response"))] += 1
            for check in (body.get("recorder") or {}).get("checks", {}).values():
                for result in check:
                    if str(result.get("status", "")).lower() == "failure":
                        failures[result.get("name", "?")] += 1
    return {"cases": cases, "statuses": dict(sorted(statuses.items())), "failures": dict(failures)}


def run_schemathesis(url: str, auth: str, *, max_examples: int, seed: int, out: Path, workers: int = 1,
                     max_time: float | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "-H", f"Authorization: {auth}",
           "--checks", CHECKS, "--max-examples", str(max_examples), "--seed", str(seed), "--workers", str(workers),
           "--report", "ndjson,junit", "--report-dir", str(out), "--generation-database", "none", "--no-color",
           "--request-timeout", "20", "--suppress-health-check", "all", "--continue-on-failure"]
    if max_time:
        cmd += ["--max-time", str(int(max_time))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out, timeout=(max_time or 3600) + 600)
    return proc.returncode, proc.stdout + proc.stderr


def fuzz(max_examples: int, seed: int, out: Path, workers: int = 1, max_time: float | None = None) -> dict[str, Any]:
    from api_helpers import serve

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kdiga-fuzz-") as tmp:
        app = make_app(Path(tmp))
        ids = seed_resources(app)
        with serve(app) as url:
            start = time.monotonic()
            code, text = run_schemathesis(url, ids["auth"], max_examples=max_examples, seed=seed, out=out,
                                          workers=workers, max_time=max_time)
            seconds = time.monotonic() - start
    (out / "schemathesis.txt").write_text(text, encoding="utf-8")
    ndjson = next(out.glob("*.ndjson"), None)
    summary = summarise(ndjson) if ndjson else {"cases": 0, "statuses": {}, "failures": {}}
    generated = re.search(r"(\d+) generated", text)
    summary["generated"] = int(generated.group(1)) if generated else None
    return {**summary, "exit_code": code, "seconds": round(seconds, 1), "seed": seed, "max_examples": max_examples,
            "output_tail": text[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-time", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("fuzz-report"))
    args = parser.parse_args()
    result = fuzz(args.max_examples, args.seed, args.out.resolve(), args.workers, args.max_time)
    print(json.dumps({k: v for k, v in result.items() if k != "output_tail"}, indent=2))  # noqa: T201 - a CLI
    print(result["output_tail"])  # noqa: T201
    sys.exit(0 if result["exit_code"] == 0 else 1)


if __name__ == "__main__":
    main()
