"""Issue 11 acceptance: datasets by reference through the REST API, to a succeeded distill job.

- a `file://` image folder of generated mixed-size PNGs (3 classes), img_size 32, preset imagenet;
- the same as WebDataset shards in a bucket of the moto S3 server (the tests' S3 stand-in).

Real API, broker, database and worker processes (the embedded service); the worker's streaming
DataLoader runs with a worker process of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import e2e_flow as flow
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))

from data_ref_helpers import CLASSES, webdataset_shards, write_image_folder  # noqa: E402

from kdiga_launcher.supervisor import start_embedded  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BUCKET = "kdiga-datasets"
TEACHER_META = {"name": "shapes teacher", "arch": "cnn_tiny", "num_classes": 3, "in_chans": 3, "img_size": 32}


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                      aws_secret_access_key="s")
    s3.create_bucket(Bucket=BUCKET)
    for rel, data in webdataset_shards().items():
        s3.put_object(Bucket=BUCKET, Key=f"shapes-wds/{rel}", Body=data)
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory, s3_endpoint):
    base = tmp_path_factory.mktemp("refs")
    write_image_folder(base / "data" / "shapes")
    env = {"KDIGA_PROGRESS_INTERVAL_S": "0.3", "OMP_NUM_THREADS": "1",
           "KDIGA_DATASET_ROOTS": f"{(base / 'data').as_uri()},s3://{BUCKET}/shapes-wds",
           "KDIGA_S3_ENDPOINT_URL": s3_endpoint, "KDIGA_S3_ACCESS_KEY_ID": "k", "KDIGA_S3_SECRET_ACCESS_KEY": "s",
           "KDIGA_S3_REGION": "us-east-1"}
    embedded = start_embedded(base / "home", port=0, env=env)
    try:
        api = flow.Api(embedded.url, embedded.admin_key)
        yield {"api": api, "data": base / "data", "teacher_id": _teacher(api, base / "teacher.safetensors"),
               "logs": base / "home" / "logs"}
    finally:
        embedded.stop()


def _teacher(api: flow.Api, path: Path) -> str:
    import torch
    from safetensors.torch import save_file

    from kdiga_core.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn_tiny", num_classes=3, in_chans=3, img_size=32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with open(path, "rb") as f:
        teacher = api.ok(api.http.post("/v1/teachers", files={"file": (path.name, f, "application/octet-stream")},
                                       data={"metadata": json.dumps(TEACHER_META)}), 202)
    teacher = api.wait(f"/v1/teachers/{teacher['id']}", {"ready", "invalid"}, 120)
    assert teacher["status"] == "ready", teacher
    return str(teacher["id"])


def _register(api: flow.Api, uri: str, fmt: str) -> dict:
    row = api.ok(api.http.post("/v1/datasets/reference", json={"uri": uri, "format": fmt}), 202)
    row = api.wait(f"/v1/datasets/{row['id']}", {"ready", "invalid"}, 180)
    assert row["status"] == "ready", row["error"]
    return row


def _distill(api: flow.Api, dataset_id: str, teacher_id: str) -> dict:
    request = {"kind": "distill", "dataset_id": dataset_id, "teacher_id": teacher_id, "student": {"arch": "cnn_tiny"},
               "objective": {"method": "kdiga", "gamma": 1.0, "iga_mode": "finite_difference"},
               "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "device": "cpu", "img_size": 32,
                         "augmentation": "imagenet", "loader_workers": 1},
               "evaluation": {"max_points": 12, "attacks": [{"name": "fgsm", "eps": 0.03}], "alignment": False,
                              "latency": False}}
    done = api.follow(api.submit(request)["id"], timeout=400)
    assert done["status"] == "succeeded", done["error"]
    return done


def test_image_folder_by_reference_to_a_succeeded_job(service):
    from kdiga_client import Client

    api = service["api"]
    with Client(str(api.http.base_url), api.http.headers["Authorization"].split()[1]) as sdk:  # the SDK's way in
        registered = sdk.register_reference_dataset("shapes", (service["data"] / "shapes").as_uri() + "/",
                                                    "image_folder")
    assert registered.uri == (service["data"] / "shapes").as_uri()
    row = api.wait(f"/v1/datasets/{registered.id}", {"ready", "invalid"}, 180)
    assert row["status"] == "ready", row["error"]
    assert row["class_names"] == list(CLASSES) and (row["train_size"], row["test_size"]) == (72, 24)
    assert set(row["layout"]["image_sizes"]) == {"40x40", "48x36", "33x50", "64x64"}  # mixed sizes
    assert row["size_bytes"] is None and row["sha256"] is None  # nothing was copied
    done = _distill(api, row["id"], service["teacher_id"])
    report = api.ok(api.http.get(f"/v1/jobs/{done['id']}/report"))
    assert report["points"]["per_class"] == dict.fromkeys(CLASSES, 4)
    assert 0.0 <= done["metrics"]["student_clean_accuracy"] <= 1.0
    # the teacher-cache decision (and its estimate) is in the job's log
    assert "teacher cache off: augmentation 'imagenet'" in (service["logs"] / "worker.log").read_text()


def test_webdataset_shards_on_s3_to_a_succeeded_job(service):
    api = service["api"]
    row = _register(api, f"s3://{BUCKET}/shapes-wds", "webdataset")
    assert row["class_names"] == list(CLASSES) and (row["train_size"], row["test_size"]) == (72, 24)
    assert row["layout"]["shards"] == {"train": 2, "test": 2} and row["layout"]["corrupt"]["count"] == 0
    assert "test_labels" not in row["layout"] and "train_shard_sizes" not in row["layout"]  # the worker's index
    done = _distill(api, row["id"], service["teacher_id"])
    report = api.ok(api.http.get(f"/v1/jobs/{done['id']}/report"))
    assert report["points"]["per_class"] == dict.fromkeys(CLASSES, 4)


def test_a_reference_outside_the_roots_is_refused(service):
    r = service["api"].http.post("/v1/datasets/reference", json={"uri": "file:///etc", "format": "image_folder"})
    assert r.status_code == 422 and "not under an allowed data root" in r.json()["detail"]
