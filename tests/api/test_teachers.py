"""POST/GET/DELETE /v1/teachers."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

from api_helpers import (
    MAX_UPLOAD,
    distill_body,
    ready_dataset,
    ready_teacher,
    safetensors_bytes,
    upload_teacher,
)

from api.uploads import NOT_MULTIPART, PICKLE_REFUSED, TORCHSCRIPT_REFUSED, UNKNOWN_MODEL_FORMAT
from kdiga_service.catalog import unknown_name_message


def _stored_files(client) -> list[Path]:
    root = Path(client.app.state.settings.home) / "artifacts" / "teachers"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _count(client, headers) -> int:
    return client.get("/v1/teachers", headers=headers).json()["count"]


def test_create_teacher_safetensors(client, owner, redis_client, settings):
    r = upload_teacher(client, owner)
    assert r.status_code == 202
    body = r.json()
    assert body["status"] == "validating" and body["format"] == "safetensors" and body["name"] == "t"
    assert body["size_bytes"] == len(safetensors_bytes()) and len(body["sha256"]) == 64
    assert body["spec"]["arch"] == "cnn_tiny" and body["spec"]["num_classes"] == 10
    messages = [json.loads(m) for m in redis_client.lrange(settings.queue_validate, 0, -1)]
    assert any(
        m["headers"]["task"] == "kdiga.validate_teacher" and body["id"] in m["headers"]["argsrepr"]
        for m in messages
    )


def test_create_teacher_onnx_without_arch(client, owner):
    onnx_like = b"\x08\x07\x12\x07pytorch" + b"\0" * 32
    r = upload_teacher(client, owner, onnx_like, meta={}, filename="model.onnx")
    assert r.status_code == 202 and r.json()["format"] == "onnx" and r.json()["name"] == "model.onnx"


def test_create_teacher_refuses_pickle(client, owner):
    before = len(_stored_files(client))
    r = upload_teacher(client, owner, pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
    assert r.status_code == 415
    assert r.json() == {"detail": PICKLE_REFUSED}
    assert len(_stored_files(client)) == before and _count(client, owner) == 0


def test_create_teacher_refuses_torch_zip_checkpoint(client, owner):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
        zf.writestr("archive/version", "3")
    r = upload_teacher(client, owner, buf.getvalue(), filename="model.pt")
    assert r.status_code == 415 and r.json() == {"detail": PICKLE_REFUSED}


def test_create_teacher_refuses_torchscript_by_default(client, owner):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"x")
        zf.writestr("archive/constants.pkl", b"x")
        zf.writestr("archive/code/__torch__/m.py", "pass")
    r = upload_teacher(client, owner, buf.getvalue(), filename="model.pt")
    assert r.status_code == 415 and r.json() == {"detail": TORCHSCRIPT_REFUSED}


def test_create_teacher_unknown_format(client, owner):
    r = upload_teacher(client, owner, b"hello, I am not a model" * 4, filename="x.bin")
    assert r.status_code == 415 and r.json() == {"detail": UNKNOWN_MODEL_FORMAT}


def test_create_teacher_oversized_413(client, owner):
    before = len(_stored_files(client))
    r = upload_teacher(client, owner, safetensors_bytes(MAX_UPLOAD // 4 + 10))
    assert r.status_code == 413
    assert r.json() == {"detail": f"The file is larger than the upload limit of {MAX_UPLOAD} bytes."}
    assert len(_stored_files(client)) == before and _count(client, owner) == 0


def test_create_teacher_oversized_without_content_length(client, owner):
    """A chunked body (no Content-Length) is still capped while streaming."""
    boundary = "XyZ"
    payload = safetensors_bytes(MAX_UPLOAD // 4 + 10)

    def body():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.safetensors"\r\n\r\n'.encode()
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(
        "/v1/teachers",
        headers={**owner, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body(),
    )
    assert r.status_code == 413


def test_create_teacher_wrong_content_type_415(client, owner):
    r = client.post("/v1/teachers", headers=owner, json={"arch": "cnn_tiny"})
    assert r.status_code == 415 and r.json() == {"detail": NOT_MULTIPART}


def test_create_teacher_missing_file_422(client, owner):
    r = client.post("/v1/teachers", headers=owner, files={"other": ("a.txt", b"x")}, data={"metadata": "{}"})
    assert r.status_code == 422 and r.json() == {"detail": "The upload has no 'file' part."}


def test_create_teacher_safetensors_needs_arch(client, owner):
    before = len(_stored_files(client))
    r = upload_teacher(client, owner, meta={"num_classes": 10})
    assert r.status_code == 422
    assert r.json() == {"detail": "A safetensors teacher needs 'arch' and 'num_classes' in its metadata."}
    assert len(_stored_files(client)) == before


def test_create_teacher_unknown_arch_lists_names(client, owner):
    r = upload_teacher(client, owner, meta={"arch": "resnet9000", "num_classes": 10})
    assert r.status_code == 422
    assert r.json() == {"detail": unknown_name_message("architectures", "resnet9000")}


def test_create_teacher_bad_metadata(client, owner):
    r = client.post(
        "/v1/teachers",
        headers=owner,
        files={"file": ("t.safetensors", safetensors_bytes())},
        data={"metadata": "{not json"},
    )
    assert r.status_code == 422 and r.json() == {"detail": "The 'metadata' part is not valid JSON."}
    r = upload_teacher(
        client, owner, meta={"arch": "cnn_tiny", "num_classes": 10, "in_chans": 1, "mean": [0.1, 0.2]}
    )
    assert r.status_code == 422
    assert r.json() == {"detail": "Invalid value for 'body': mean must have one value per input channel (1)."}
    r = upload_teacher(client, owner, meta={"arch": "cnn_tiny", "num_classes": 1})
    assert r.status_code == 422
    assert r.json() == {
        "detail": "Invalid value for 'num_classes': input should be greater than or equal to 2."
    }


def test_list_and_read_teachers(client, owner, other):
    ids = [upload_teacher(client, owner).json()["id"] for _ in range(3)]
    page = client.get("/v1/teachers?limit=2&offset=0", headers=owner).json()
    assert page["count"] == 3 and [t["id"] for t in page["data"]] == ids[::-1][:2]
    page2 = client.get("/v1/teachers?limit=2&offset=2", headers=owner).json()
    assert [t["id"] for t in page2["data"]] == ids[:1]
    assert client.get(f"/v1/teachers/{ids[0]}", headers=owner).json()["id"] == ids[0]
    assert client.get("/v1/teachers", headers=other).json() == {"data": [], "count": 0}
    r = client.get(f"/v1/teachers/{ids[0]}", headers=other)
    assert r.status_code == 404 and r.json() == {"detail": f"Teacher '{ids[0]}' not found."}
    r = client.get("/v1/teachers?limit=0", headers=owner)
    assert r.status_code == 422 and r.json() == {
        "detail": "Invalid value for 'limit': input should be greater than or equal to 1."
    }


def test_delete_teacher(client, owner, other):
    teacher_id = upload_teacher(client, owner).json()["id"]
    before = len(_stored_files(client))
    assert client.delete(f"/v1/teachers/{teacher_id}", headers=other).status_code == 404
    r = client.delete(f"/v1/teachers/{teacher_id}", headers=owner)
    assert r.status_code == 204 and r.content == b""
    assert len(_stored_files(client)) == before - 1
    assert client.get(f"/v1/teachers/{teacher_id}", headers=owner).status_code == 404


def test_delete_teacher_in_use_409(client, owner):
    teacher_id, dataset_id = ready_teacher(client, owner), ready_dataset(client, owner)
    assert (
        client.post("/v1/jobs", headers=owner, json=distill_body(dataset_id, teacher_id)).status_code == 201
    )
    r = client.delete(f"/v1/teachers/{teacher_id}", headers=owner)
    assert r.status_code == 409
    assert r.json() == {
        "detail": f"Teacher '{teacher_id}' is used by an active job; cancel the job or wait for it to finish."
    }


def test_metadata_sent_first_is_checked_before_the_file(client, owner):
    """A bad 'metadata' part that precedes the file is refused with 422, not 413 after streaming the file."""
    r = upload_teacher(client, owner, safetensors_bytes(MAX_UPLOAD), meta={"arch": "nope", "num_classes": 10})
    assert r.status_code == 422 and r.json()["detail"].startswith("Unknown architecture 'nope'")
    assert _count(client, owner) == 0


def test_torchscript_accepted_when_enabled(tmp_path, redis_client):
    from api_helpers import REDIS_URL, new_key
    from fastapi.testclient import TestClient

    from api.main import create_app
    from kdiga_service.settings import Settings

    queue = f"kdiga_test_{tmp_path.name}_ts"
    settings = Settings(home=tmp_path, broker_url=REDIS_URL, allow_torchscript=True, queue_eval=queue,
                        queue_validate=queue)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"x")
        zf.writestr("archive/constants.pkl", b"x")
        zf.writestr("archive/code/__torch__/m.py", "pass")
    try:
        with TestClient(create_app(settings)) as client:
            headers, _ = new_key(client)
            r = upload_teacher(client, headers, buf.getvalue(), meta={}, filename="m.pt")
            assert r.status_code == 202 and r.json()["format"] == "torchscript"
    finally:
        redis_client.delete(queue)
