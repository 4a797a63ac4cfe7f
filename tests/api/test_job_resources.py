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
