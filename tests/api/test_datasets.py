"""POST/GET /v1/datasets: built-ins by name, npz / image-folder zip uploads with archive checks."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from api_helpers import MAX_UPLOAD

from api.routes.datasets import NOT_DATASET_BODY, NOT_ZIP
from kdiga_service.catalog import unknown_name_message


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _upload(client, headers, data: bytes, filename: str = "d.npz", meta: dict | None = None):
    return client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": (filename, data)},
        data={"metadata": json.dumps(meta or {})},
    )


def test_register_builtin(client, owner, redis_client, settings):
    r = client.post("/v1/datasets", headers=owner, json={"builtin": "digits", "name": "my digits"})
    assert r.status_code == 202
    body = r.json()
    assert (body["kind"], body["builtin"], body["status"], body["name"]) == (
        "builtin",
        "digits",
        "validating",
        "my digits",
    )
    messages = [json.loads(m) for m in redis_client.lrange(settings.queue_validate, 0, -1)]
    assert any(
        m["headers"]["task"] == "kdiga.validate_dataset" and body["id"] in m["headers"]["argsrepr"]
        for m in messages
    )


def test_register_unknown_builtin_422(client, owner):
    r = client.post("/v1/datasets", headers=owner, json={"builtin": "imagenet"})
    assert r.status_code == 422
    assert r.json() == {"detail": unknown_name_message("datasets", "imagenet")}
    r = client.post("/v1/datasets", headers=owner, json={"name": "x"})
    assert r.status_code == 422 and r.json() == {"detail": "Field 'builtin' is required."}


def test_upload_npz_and_zip(client, owner):
    r = _upload(client, owner, _zip({"x_train.npy": b"\x93NUMPY", "y_train.npy": b"\x93NUMPY"}))
    assert r.status_code == 202 and r.json()["kind"] == "npz" and r.json()["size_bytes"] > 0
    r = _upload(
        client, owner, _zip({"train/cat/1.png": b"png", "test/cat/2.png": b"png"}), filename="imgs.zip"
    )
    assert r.status_code == 202 and r.json()["kind"] == "image_folder_zip" and r.json()["name"] == "imgs.zip"


@pytest.mark.parametrize(
    "data, detail",
    [
        (_zip({"../evil.png": b"x"}), "The archive entry '../evil.png' points outside the archive."),
        (_zip({"/etc/cron.d/x": b"x"}), "The archive entry '/etc/cron.d/x' points outside the archive."),
        (
            _zip({"train/a/1.png": b"x"}, symlink="train/a/link.png"),
            "The archive entry 'train/a/link.png' is a symbolic link, which is not allowed.",
        ),
    ],
)
def test_upload_unsafe_archive_422(client, owner, data, detail):
    r = _upload(client, owner, data, filename="d.zip")
    assert r.status_code == 422 and r.json() == {"detail": detail}
    assert client.get("/v1/datasets", headers=owner).json()["count"] == 0


def test_upload_decompression_bomb_422(client, owner):
    data = _zip({"x_train.npy": b"\0" * (12 * 1024 * 1024)})
    assert len(data) < MAX_UPLOAD
    r = _upload(client, owner, data)
    assert r.status_code == 422
    assert r.json() == {
        "detail": "The archive entry 'x_train.npy' has a suspicious compression ratio (a decompression bomb)."
    }


def test_upload_errors(client, owner):
    r = _upload(client, owner, b"not a zip at all")
    assert r.status_code == 415 and r.json() == {"detail": NOT_ZIP}
    r = _upload(client, owner, _zip({"a": b"b"}), filename="data.bin")
    assert r.status_code == 422
    assert r.json() == {
        "detail": "Set 'kind' (npz or image_folder_zip) in the metadata; the file name does not say."
    }
    r = _upload(client, owner, _zip({"a": b"b"}), meta={"kind": "csv"})
    assert r.status_code == 422
    assert r.json() == {"detail": "Unknown kind 'csv'; valid names are: image_folder_zip, npz."}
    r = _upload(client, owner, b"PK\x03\x04" + b"\0" * (MAX_UPLOAD + 10))
    assert r.status_code == 413
    r = client.post("/v1/datasets", headers={**owner, "Content-Type": "text/csv"}, content=b"a,b\n1,2\n")
    assert r.status_code == 415 and r.json() == {"detail": NOT_DATASET_BODY}
    assert client.get("/v1/datasets", headers=owner).json()["count"] == 0


def test_list_and_read_datasets(client, owner, other):
    ids = [
        client.post("/v1/datasets", headers=owner, json={"builtin": b}).json()["id"]
        for b in ("digits", "cifar10")
    ]
    page = client.get("/v1/datasets?limit=1", headers=owner).json()
    assert page["count"] == 2 and page["data"][0]["id"] == ids[1]
    assert client.get(f"/v1/datasets/{ids[0]}", headers=owner).json()["builtin"] == "digits"
    r = client.get(f"/v1/datasets/{ids[0]}", headers=other)
    assert r.status_code == 404 and r.json() == {"detail": f"Dataset '{ids[0]}' not found."}


def test_delete_dataset(client, owner, other):
    from api_helpers import distill_body, ready_dataset, ready_teacher

    r = _upload(client, owner, _zip({"x_train.npy": b"\x93NUMPY"}))
    dataset_id = r.json()["id"]
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=other).status_code == 404
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=owner).status_code == 204
    assert client.get(f"/v1/datasets/{dataset_id}", headers=owner).status_code == 404
    busy = ready_dataset(client, owner)
    client.post("/v1/jobs", headers=owner, json=distill_body(busy, ready_teacher(client, owner)))
    r = client.delete(f"/v1/datasets/{busy}", headers=owner)
    assert r.status_code == 409
    assert r.json() == {
        "detail": f"Dataset '{busy}' is used by an active job; cancel the job or wait for it to finish."
    }


def test_reference_refused_while_no_roots_are_allowed(client, owner, settings, monkeypatch):
    from kdiga_service.dataset_refs import NO_ROOTS

    monkeypatch.setattr(settings, "dataset_roots", [])
    r = client.post("/v1/datasets/reference", headers=owner,
                    json={"uri": "file:///data/shapes", "format": "image_folder"})
    assert r.status_code == 422 and r.json()["detail"] == NO_ROOTS


@pytest.mark.parametrize("uri", ["file:///elsewhere/shapes", "file:///data/../etc", "s3://other/x", "not a url",
                                 "file:///database", "s3://[bucket/sets", "file:///data/x?y=1"])
def test_reference_outside_the_roots_is_refused(client, owner, settings, monkeypatch, uri):
    monkeypatch.setattr(settings, "dataset_roots", ["file:///data", "s3://bucket/sets"])
    r = client.post("/v1/datasets/reference", headers=owner, json={"uri": uri, "format": "webdataset"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("The dataset uri ")


def test_reference_under_a_root_is_registered_without_a_copy(client, owner, settings, monkeypatch, tmp_path):
    folder = tmp_path / "shapes"
    (folder / "train" / "a").mkdir(parents=True)
    (folder / "train" / "a" / "x.png").write_bytes(b"keep me")
    monkeypatch.setattr(settings, "dataset_roots", [tmp_path.as_uri(), "s3://bucket/sets"])
    r = client.post("/v1/datasets/reference", headers=owner,
                    json={"uri": folder.as_uri() + "/", "format": "image_folder", "name": "shapes"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["kind"], body["uri"], body["status"], body["storage_key"] if "storage_key" in body else None) == (
        "image_folder", folder.as_uri(), "validating", None)
    # the deprecated JSON form of POST /v1/datasets takes a reference too (it has a uri)
    old = client.post("/v1/datasets", headers=owner, json={"uri": "s3://bucket/sets/wds", "format": "webdataset"})
    assert old.status_code == 202 and old.json()["kind"] == "webdataset" and old.json()["name"] == "wds"
    # deleting the row never deletes the operator's data
    assert client.delete(f"/v1/datasets/{body['id']}", headers=owner).status_code == 204
    assert (folder / "train" / "a" / "x.png").read_bytes() == b"keep me"
