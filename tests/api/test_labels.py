"""Labels on teachers, datasets and jobs: validated, returned, and filtered with ?label=key=value."""

from __future__ import annotations

import json

import pytest
from api_helpers import distill_body, ready_dataset, ready_teacher, upload_teacher


def test_labels_on_every_resource_and_the_and_filter(client, owner, other):
    dataset = client.post("/v1/datasets", headers=owner,
                          json={"builtin": "digits", "labels": {"team": "vision", "stage": "dev"}})
    assert dataset.status_code == 202 and dataset.json()["labels"] == {"team": "vision", "stage": "dev"}
    teacher = upload_teacher(client, owner, meta={"arch": "cnn_tiny", "num_classes": 10, "labels": {"team": "vision"}})
    assert teacher.status_code == 202 and teacher.json()["labels"] == {"team": "vision"}
    assert "labels" not in teacher.json()["spec"]
    dataset_id, teacher_id = ready_dataset(client, owner), ready_teacher(client, owner)
    jobs = {}
    for name, labels in (("a", {"commit": "3f2c1ab", "branch": "feat/x"}), ("b", {"commit": "3f2c1ab"}),
                         ("c", {"branch": "feat/x"})):
        r = client.post("/v1/jobs", headers=owner, json=distill_body(dataset_id, teacher_id, name=name, labels=labels))
        assert r.status_code == 201, r.text
        assert r.json()["labels"] == labels and r.json()["spec"]["labels"] == labels
        jobs[name] = r.json()["id"]
        if name == "b":
            client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=owner)  # stay under the active-job limit
    assert client.get(f"/v1/jobs/{jobs['a']}", headers=owner).json()["labels"]["branch"] == "feat/x"

    def names(path, *filters):
        query = "&".join(f"label={f}" for f in filters)
        return sorted(item["name"] for item in client.get(f"{path}?{query}", headers=owner).json()["data"])

    assert names("/v1/jobs", "commit=3f2c1ab") == ["a", "b"]
    assert names("/v1/jobs", "commit=3f2c1ab", "branch=feat/x") == ["a"]  # repeated: all must match
    assert names("/v1/jobs", "branch=feat/y") == []
    assert names("/v1/teachers", "team=vision") == ["teacher.safetensors"]
    assert names("/v1/datasets", "team=vision", "stage=dev") == ["digits"]
    other_sees = client.get("/v1/jobs?label=commit=3f2c1ab", headers=other).json()
    assert other_sees == {"data": [], "count": 0}


@pytest.mark.parametrize("labels, words", [
    ({"bad key": "x"}, "label key 'bad key' is not valid"),
    ({"-x": "x"}, "is not valid"),
    ({"k" * 64: "x"}, "is not valid"),
    ({"commit": "a b"}, "the value of label 'commit' is not valid"),
    ({"commit": "x" * 257}, "the value of label 'commit' is not valid"),
    ({"mlflow.source": "x"}, "reserved prefix"),
    ({f"k{i}": "v" for i in range(33)}, "at most 32 labels"),
    ({"n": 1}, "valid string"),
])
def test_bad_labels_get_one_sentence(client, owner, labels, words):
    r = client.post("/v1/datasets", headers=owner, json={"builtin": "digits", "labels": labels})
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    meta = json.dumps({"arch": "cnn_tiny", "num_classes": 10, "labels": labels})
    r = client.post("/v1/teachers", headers=owner, files={"file": ("t.safetensors", b"x" * 16)}, data={"metadata": meta})
    assert r.status_code == 422 and words in r.json()["detail"], r.text


@pytest.mark.parametrize("query, words", [("label=nokey", "must look like 'key=value'"),
                                          ("label==v", "must look like 'key=value'"),
                                          ("label=bad key=v", "is not valid")])
def test_bad_label_filters_get_one_sentence(client, owner, query, words):
    for path in ("/v1/jobs", "/v1/teachers", "/v1/datasets", "/v1/pipelines"):
        r = client.get(f"{path}?{query}", headers=owner)
        assert r.status_code == 422 and words in r.json()["detail"], (path, r.text)
