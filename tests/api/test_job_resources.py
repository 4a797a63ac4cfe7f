"""POST /v1/jobs with `resources` (hosts × devices per host) and the batch settings that go with it."""

from __future__ import annotations

import json

import pytest
from api_helpers import distill_body, ready_dataset, ready_teacher


@pytest.fixture
def ready(client, owner):
    return ready_dataset(client, owner), ready_teacher(client, owner)


def test_resources_default_to_one_device_and_are_kept(client, owner, ready, redis_client, settings):
    r = client.post("/v1/jobs", headers=owner, json=distill_body(*ready))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["resources"] == {"nodes": 1, "devices_per_node": 1}
    body = distill_body(*ready, resources={"nodes": 2, "devices_per_node": 4}, objective={"gamma": 5.0},
                        train={"epochs": 1, "grad_accum_steps": 2, "lr_scaling": "linear"})
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["resources"] == {"nodes": 2, "devices_per_node": 4}
    assert spec["train"]["grad_accum_steps"] == 2 and spec["train"]["lr_scaling"] == "linear"
    # published to the queue of workers that see 4 devices
    queued = [json.loads(m)["headers"]["argsrepr"] for m in redis_client.lrange(f"{settings.queue_train}-x4", 0, -1)]
    assert any(r.json()["id"] in args for args in queued)


AUTHOR = {"method": "kdiga", "iga_reduction": "author", "gamma": 5.0}
SPLIT = ("iga_reduction 'author' divides one norm over the whole batch by its squared size, which cannot be "
         "split across devices; use 'per_sample' for a job on several devices.")
SWEEP = ("objective.gamma 'auto' (the default) chooses γ by a sweep that runs on one device; give objective.gamma "
         "a number for a job on several devices, e.g. the γ a one-device job chose.")


@pytest.mark.parametrize("patch, detail", [
    ({"resources": {"nodes": 9}},
     "resources.nodes is 9 but this service allows at most 8 hosts per job (KDIGA_MAX_NODES)."),
    ({"resources": {"devices_per_node": 9}},
     "resources.devices_per_node is 9 but this service allows at most 8 (KDIGA_MAX_DEVICES_PER_NODE)."),
    ({"resources": {"nodes": 0}}, "Invalid value for 'resources.nodes': input should be greater than or equal to 1."),
    ({"resources": {"gpus": 2}}, "Unknown field 'resources.gpus'."),
    ({"resources": {"devices_per_node": 2}, "objective": AUTHOR}, SPLIT),
    ({"resources": {"nodes": 2}}, SWEEP),
    ({"train": {"grad_accum_steps": 0}},
     "Invalid value for 'train.grad_accum_steps': input should be greater than or equal to 1."),
    ({"train": {"lr_scaling": "cubic"}}, "Unknown lr_scaling 'cubic'; valid names are: linear, none, sqrt."),
])
def test_bad_resources_get_one_sentence(client, owner, ready, patch, detail):
    r = client.post("/v1/jobs", headers=owner, json=distill_body(*ready, **patch))
    assert r.status_code == 422
    assert r.json() == {"detail": detail}


def test_author_reduction_is_fine_on_one_device(client, owner, ready):
    r = client.post("/v1/jobs", headers=owner, json=distill_body(*ready, objective=AUTHOR))
    assert r.status_code == 201, r.text


def test_an_evaluate_job_runs_on_one_device(client, owner, ready):
    dataset_id, teacher_id = ready
    body = {"kind": "evaluate", "dataset_id": dataset_id, "model": {"teacher_id": teacher_id},
            "resources": {"devices_per_node": 2}}
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 422
    assert r.json() == {"detail": "An evaluate job runs on one device; 'resources' applies to training jobs."}


def _shards_dataset(client, owner, settings, monkeypatch, tmp_path, layout: dict) -> str:
    """A WebDataset reference, marked validated with ``layout`` (what the worker's validation records)."""
    from kdiga_service import crud

    monkeypatch.setattr(settings, "dataset_roots", [tmp_path.as_uri()])
    r = client.post("/v1/datasets/reference", headers=owner, json={"uri": (tmp_path / "wds").as_uri(),
                                                                  "format": "webdataset"})
    assert r.status_code == 202, r.text
    info = {"num_classes": 10, "class_names": [str(i) for i in range(10)], "input_shape": [3, 32, 32],
            "train_size": 300, "test_size": 50, "layout": layout}
    with client.app.state.sessionmaker() as session:
        assert crud.set_dataset_validated(session, r.json()["id"], info=info)
    return str(r.json()["id"])


def test_webdataset_shards_need_one_per_device_and_recorded_sizes(client, owner, settings, monkeypatch, tmp_path):
    teacher_id = ready_teacher(client, owner, {"arch": "cnn_tiny", "num_classes": 10, "name": "rgb"})  # 3×32×32
    sizes = {f"train/train-{k}.tar": 100 for k in range(3)}
    dataset_id = _shards_dataset(client, owner, settings, monkeypatch, tmp_path,
                                 {"shards": {"train": 3, "test": 1}, "train_shard_sizes": sizes})
    layout = client.get(f"/v1/datasets/{dataset_id}", headers=owner).json()["layout"]
    assert layout == {"shards": {"train": 3, "test": 1}}  # the sizes per shard are the worker's, not listed
    body = distill_body(dataset_id, teacher_id, objective={"gamma": 5.0}, train={"epochs": 1, "img_size": 32})
    r = client.post("/v1/jobs", headers=owner, json={**body, "resources": {"devices_per_node": 3}})
    assert r.status_code == 201, r.text  # one shard per device is enough
    r = client.post("/v1/jobs", headers=owner, json={**body, "resources": {"devices_per_node": 4}})
    assert r.status_code == 422
    assert r.json() == {"detail": f"Dataset '{dataset_id}' has 3 training shards, fewer than the job's 4 devices; "
                                  "each device reads whole shards, so use at most 3 or split the set into more "
                                  "shards."}
    old = _shards_dataset(client, owner, settings, monkeypatch, tmp_path, {"shards": {"train": 3, "test": 1}})
    r = client.post("/v1/jobs", headers=owner, json={**body, "dataset_id": old, "resources": {"nodes": 2}})
    assert r.status_code == 422
    assert r.json()["detail"].endswith("was validated before its shard sizes were recorded; register it again "
                                       "to train on several devices.")
    r = client.post("/v1/jobs", headers=owner, json={**body, "dataset_id": old})
    assert r.status_code == 201, r.text  # one device reads every shard, sizes or not
