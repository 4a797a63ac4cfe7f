"""GET /v1/artifacts[/{id}]: listing, streamed download, owner check."""

from __future__ import annotations

import hashlib

from api_helpers import distill_body, finish, ready_dataset, ready_teacher


def _job_with_artifacts(client, headers, files):
    body = distill_body(ready_dataset(client, headers), ready_teacher(client, headers))
    job_id = client.post("/v1/jobs", headers=headers, json=body).json()["id"]
    finish(client, job_id, artifacts=files)
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def test_download_artifact(client, owner, other):
    weights = bytes(range(256)) * 5000  # > 1 MiB: streamed in several chunks
    job = _job_with_artifacts(client, owner, {"student_weights": weights, "model_card": b"{}"})
    kinds = {a["kind"]: a for a in job["artifacts"]}
    art = kinds["student_weights"]
    assert art["size_bytes"] == len(weights) and art["sha256"] == hashlib.sha256(weights).hexdigest()
    r = client.get(f"/v1/artifacts/{art['id']}", headers=owner)
    assert r.status_code == 200 and r.content == weights
    assert r.headers["content-length"] == str(len(weights))
    assert r.headers["content-disposition"] == 'attachment; filename="student_weights.bin"; filename*=UTF-8\'\'student_weights.bin'
    assert r.headers["x-content-sha256"] == art["sha256"]
    r = client.get(f"/v1/artifacts/{art['id']}", headers=other)
    assert r.status_code == 404 and r.json() == {"detail": f"Artifact '{art['id']}' not found."}


def test_list_artifacts(client, owner, other):
    job = _job_with_artifacts(client, owner, {"onnx": b"o", "report_json": b"{}"})
    page = client.get(f"/v1/artifacts?job_id={job['id']}", headers=owner).json()
    assert page["count"] == 2 and {a["kind"] for a in page["data"]} == {"onnx", "report_json"}
    assert client.get("/v1/artifacts?kind=onnx", headers=owner).json()["count"] == 1
    assert client.get("/v1/artifacts", headers=other).json() == {"data": [], "count": 0}


def test_missing_artifact_404(client, owner):
    r = client.get("/v1/artifacts/does-not-exist", headers=owner)
    assert r.status_code == 404 and r.json() == {"detail": "Artifact 'does-not-exist' not found."}


def test_curl_oj_saves_under_the_artifacts_name(client, owner, tmp_path):
    """`curl -OJ` (which reads only the ASCII `filename=`) saves the file under the artifact's name, not its id."""
    import shutil
    import subprocess

    import pytest
    from api_helpers import serve

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    weights = b"weights" * 1000
    art = next(a for a in _job_with_artifacts(client, owner, {"student_weights": weights})["artifacts"])
    with serve(client.app) as url:
        done = subprocess.run([curl, "-sS", "-f", "-OJ", "-H", f"Authorization: {owner['Authorization']}",
                               f"{url}/v1/artifacts/{art['id']}"], cwd=tmp_path, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["student_weights.bin"]
    assert (tmp_path / "student_weights.bin").read_bytes() == weights
