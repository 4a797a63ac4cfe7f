"""A job on two devices through the embedded default: `kdiga serve`'s worker runs it as two gloo ranks
under torchrun, and its report records the world size."""

from __future__ import annotations

import e2e_flow as flow
import kdiga_svc_helpers as h
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_embedded_job_on_one_host_with_two_devices(owner, tmp_path, teacher_file):
    api: flow.Api = owner["api"]  # the shared embedded service (tests/e2e/conftest.py), a key of its own
    ids = flow.setup_inputs(api, teacher_file)
    request = h.tiny_job_request(ids["dataset_id"], ids["teacher_id"], epochs=2, name="two devices")
    request["resources"] = {"nodes": 1, "devices_per_node": 2}
    request["train"]["grad_accum_steps"] = 2
    request["train"]["lr_scaling"] = "linear"
    done = api.follow(api.submit(request)["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1 and done["spec"]["resources"] == {"nodes": 1, "devices_per_node": 2}
    report = api.ok(api.http.get(f"/v1/jobs/{done['id']}/report"))
    assert report["compute"] == {
        "world_size": 2, "nodes": 1, "devices_per_node": 2, "backend": "gloo", "per_device_batch_size": 64,
        "grad_accum_steps": 2, "effective_batch_size": 256, "lr": 0.05, "lr_scaling": "linear",
        "effective_lr": pytest.approx(0.2)}
    flow.check_student(api, done, tmp_path / "download")  # rank 0's model, as trained on both ranks
