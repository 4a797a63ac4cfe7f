"""The user's path over HTTP: upload a teacher, register digits, submit a tiny KDIGA job, follow it,
download the student and check it independently of the service."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import kdiga_svc_helpers as h


class Api:
    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def ok(self, response: httpx.Response, *codes: int) -> Any:
        assert response.status_code in (codes or (200,)), f"{response.status_code}: {response.text}"
        return response.json() if response.content and "json" in response.headers.get("content-type", "") else response

    def wait(self, path: str, done: set[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            body = self.ok(self.http.get(path))
            seen.append(body.get("progress") or {})
            if body["status"] in done:
                body["_seen_progress"] = seen
                return body
            assert time.monotonic() < deadline, f"{path} still {body['status']} after {timeout:.0f} s: {body}"
            time.sleep(0.5)

    def upload_teacher(self, path: Path) -> dict[str, Any]:
        with open(path, "rb") as f:
            files = {"file": (path.name, f, "application/octet-stream")}
            teacher = self.ok(self.http.post("/v1/teachers", files=files,
                                             data={"metadata": json.dumps(h.TEACHER_META)}), 202)
        return self.wait(f"/v1/teachers/{teacher['id']}", {"ready", "invalid"}, 120)

    def builtin_dataset(self, name: str = "digits") -> dict[str, Any]:
        dataset = self.ok(self.http.post("/v1/datasets", json={"name": name, "builtin": name}), 202, 201)
        return self.wait(f"/v1/datasets/{dataset['id']}", {"ready", "invalid"}, 120)

    def submit(self, request: dict[str, Any], **headers: str) -> dict[str, Any]:
        return self.ok(self.http.post("/v1/jobs", json=request, headers=headers), 201, 200)

    def follow(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        return self.wait(f"/v1/jobs/{job_id}", {"succeeded", "failed", "cancelled"}, timeout)

    def download(self, artifact: dict[str, Any], dest: Path) -> Path:
        response = self.http.get(f"/v1/artifacts/{artifact['id']}", follow_redirects=True)
        assert response.status_code == 200, response.text
        dest.write_bytes(response.content)
        assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
        return dest


def setup_inputs(api: Api, teacher_file: Path) -> dict[str, str]:
    teacher = api.upload_teacher(teacher_file)
    assert teacher["status"] == "ready", teacher
    dataset = api.builtin_dataset()
    assert dataset["status"] == "ready", dataset
    assert dataset["num_classes"] == 10
    return {"teacher_id": teacher["id"], "dataset_id": dataset["id"]}


def check_student(api: Api, job: dict[str, Any], workdir: Path) -> float:
    """Download the student, load it without the service's help, and compare with the report."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from kdiga_core.config import ModelSpec
    from kdiga_core.data import load_builtin
    from kdiga_core.evaluate.points import evaluation_points
    from kdiga_core.models import build_model

    by_name = {a["name"]: a for a in job["artifacts"]}
    assert sorted(by_name) == ["model_card.json", "report.html", "report.json", "student.onnx",
                               "student.safetensors"], sorted(by_name)
    workdir.mkdir(parents=True, exist_ok=True)
    weights = api.download(by_name["student.safetensors"], workdir / "student.safetensors")
    card = json.loads(api.download(by_name["model_card.json"], workdir / "model_card.json").read_text())
    report = api.ok(api.http.get(f"/v1/jobs/{job['id']}/report"))
    listed = card["files"]["student.safetensors"]
    assert (listed["sha256"] if isinstance(listed, dict) else listed) == by_name["student.safetensors"]["sha256"]

    model = build_model(ModelSpec.from_dict(card["spec"]))
    state = load_file(str(weights))
    target = model if set(state) == set(model.state_dict()) else model.net
    target.load_state_dict(state, strict=True)
    model.eval()
    data = load_builtin("digits")
    # the report's points: seeded and stratified, as its `points` block says (tests/core checks the sampler)
    assert report["points"]["method"] == "stratified" and report["points"]["n"] == report["n_points"]
    points = evaluation_points(data, report["n_points"], report["points"]["seed"])
    x, y = points.x, points.y
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert abs(accuracy - report["models"]["student"]["clean_accuracy"]) < 1e-6, (accuracy, report["models"])
    assert abs(accuracy - job["metrics"]["student_clean_accuracy"]) < 1e-6

    import onnxruntime as ort

    onnx_path = api.download(by_name["student.onnx"], workdir / "student.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy().astype(np.float32)}
    onnx_acc = float((session.run(None, feed)[0].argmax(1) == y.numpy()).mean())
    assert abs(onnx_acc - accuracy) < 1e-6
    return accuracy

