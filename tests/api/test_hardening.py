"""Issue 16's and 17's reproductions at the HTTP layer, each on SQLite and PostgreSQL: no input gets a
5xx, every refusal is one sentence, nothing is half-written."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from api_helpers import (
    distill_body,
    finish,
    new_key,
    ready_dataset,
    ready_teacher,
    safetensors_bytes,
    upload_teacher,
)
from fastapi.testclient import TestClient

from api.json_input import MAX_DEPTH
from api.main import create_app
from api.routing import NUL_IN_URL
from kdiga_service import crud
from kdiga_service.settings import Settings

LIST_ROUTES = ("/v1/jobs", "/v1/teachers", "/v1/datasets", "/v1/artifacts")
DEEP = "[" * 100_000 + "]" * 100_000


def _npz_like() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x_train.npy", b"\x93NUMPY")
    return buf.getvalue()


def _multipart_after_file(client, path, headers, file: tuple[str, bytes], metadata: str):
    """The `metadata` part *after* the file part (httpx sends data fields first, so build it by hand)."""
    boundary = "kdigaboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file[0]}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + file[1] + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n"
    ).encode() + metadata.encode() + f"\r\n--{boundary}--\r\n".encode()
    return client.post(path, headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                       content=body)


def _stored_files(client, kind: str) -> int:
    root = Path(client.app.state.settings.home) / "artifacts" / kind
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


# -- integers, query parameters, NUL ----------------------------------------------------------------
@pytest.mark.parametrize("route", LIST_ROUTES)
@pytest.mark.parametrize("param", ["offset", "limit"])
def test_list_paging_beyond_64_bits_is_a_422(client, owner, route, param):
    r = client.get(route, headers=owner, params={param: 2**63})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"Invalid value for '{param}': input should be less than or equal to")


def test_unknown_query_parameters_and_status_values_are_refused(client, owner):
    r = client.get("/v1/jobs", headers=owner, params={"statsu": "failed"})
    assert r.status_code == 422
    assert r.json() == {"detail": "Unknown query parameter 'statsu' for this operation; "
                                  "it takes: kind, label, limit, offset, status."}
    r = client.get("/v1/jobs", headers=owner, params={"status": "finished"})
    assert r.status_code == 422
    assert r.json() == {"detail": "Unknown status 'finished'; valid names are: cancelled, cancelling, failed, "
                                  "queued, running, stopped, succeeded."}
    assert client.get("/healthz", params={"x": "1"}).status_code == 422


def test_nul_characters_are_refused_everywhere(client, owner):
    r = client.get("/v1/jobs/a%00b", headers=owner)
    assert r.status_code == 400 and r.json() == {"detail": NUL_IN_URL}
    assert client.get("/v1/artifacts", headers=owner, params={"kind": "a\x00"}).status_code == 400
    r = client.post("/v1/datasets/builtin", headers=owner, json={"builtin": "digits", "name": "a\x00b"})
    assert r.status_code == 422
    assert r.json() == {"detail": "The request body holds a NUL character in a text value, which is not allowed."}
    r = upload_teacher(client, owner, meta={"arch": "cnn_tiny", "num_classes": 10, "name": "t\x00"})
    assert r.status_code == 422 and "NUL character" in r.json()["detail"]
    dataset_id, teacher_id = ready_dataset(client, owner), ready_teacher(client, owner)
    r = client.post("/v1/jobs", headers=owner, json=distill_body(dataset_id, teacher_id, name="\x00"))
    assert r.status_code == 422 and "NUL character" in r.json()["detail"]
    # the file name is the teacher's name when the metadata has none: a NUL there is refused too
    r = _multipart_after_file(client, "/v1/teachers", owner, ("a\x00.safetensors", safetensors_bytes()),
                              json.dumps({"arch": "cnn_tiny", "num_classes": 10}))
    assert r.status_code == 400
    assert r.json() == {"detail": "A part's name or file name contains a NUL character, which is not allowed."}


def test_lone_surrogates_are_refused(client, owner):
    """`"\\ud800"` is valid JSON but not Unicode: neither SQLite nor PostgreSQL can store it (it was a 500)."""
    body = b'{"kind": "distill", "dataset_id": "\\ud800", "teacher_id": "x", "student": {"arch": "cnn_tiny"}}'
    r = client.post("/v1/jobs", headers={**owner, "Content-Type": "application/json"}, content=body)
    assert r.status_code == 422
    assert r.json() == {"detail": "The request body holds an unpaired surrogate (\\ud800-\\udfff) in a text value, "
                                  "which is not valid Unicode."}
    r = client.post("/v1/datasets/builtin", headers={**owner, "Content-Type": "application/json"},
                    content=b'{"builtin": "digits", "\\udfff": 1}')
    assert r.status_code == 422 and "unpaired surrogate" in r.json()["detail"] and "in a key" in r.json()["detail"]
    r = client.post("/v1/teachers", headers=owner, files={"file": ("t.safetensors", safetensors_bytes())},
                    data={"metadata": '{"arch": "cnn_tiny", "num_classes": 10, "name": "\\ud800"}'})
    assert r.status_code == 422 and r.json()["detail"].startswith("The 'metadata' part holds an unpaired surrogate")


# -- JSON bodies: encoding, depth, non-finite numbers -------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/datasets", "/v1/datasets/builtin"])
def test_json_bodies_that_are_not_utf8_get_one_sentence(client, owner, path):
    r = client.post(path, headers={**owner, "Content-Type": "application/json"}, content=b'{"name": "\xff"}')
    assert r.status_code == 422
    assert r.json() == {"detail": "The request body is not valid JSON: it must be UTF-8 text."}


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/datasets", "/v1/datasets/builtin"])
def test_deeply_nested_json_bodies_are_refused(client, owner, path):
    r = client.post(path, headers={**owner, "Content-Type": "application/json"}, content=DEEP.encode())
    assert r.status_code == 422
    assert r.json() == {"detail": f"The request body nests deeper than {MAX_DEPTH} levels."}


@pytest.mark.parametrize("path, file", [("/v1/teachers", ("t.safetensors", safetensors_bytes())),
                                        ("/v1/datasets", ("d.npz", _npz_like()))])
def test_deep_metadata_after_the_file_part_is_refused_and_nothing_is_kept(client, owner, path, file):
    kind = path.rsplit("/", 1)[1]
    before = _stored_files(client, kind)
    r = _multipart_after_file(client, path, owner, file, DEEP)
    assert r.status_code == 422
    assert r.json() == {"detail": f"The 'metadata' part nests deeper than {MAX_DEPTH} levels."}
    assert _stored_files(client, kind) == before
    assert client.get(path, headers=owner).json()["count"] == 0


@pytest.mark.parametrize("metadata, detail", [
    ('{"arch": "cnn_tiny", "num_classes": 10, "in_chans": 1, "mean": [NaN], "std": [Infinity]}',
     "The 'metadata' part holds NaN; numbers must be finite."),
    ('{"arch": "cnn_tiny", "num_classes": 10, "in_chans": 1, "mean": [0.5], "std": [1e999]}',
     "The 'metadata' part holds the number 1e999, which is out of range; numbers must be finite."),
])
def test_non_finite_normalisation_is_a_422(client, owner, metadata, detail):
    r = client.post("/v1/teachers", headers=owner, files={"file": ("t.safetensors", safetensors_bytes())},
                    data={"metadata": metadata})
    assert r.status_code == 422 and r.json() == {"detail": detail}
    assert client.get("/v1/teachers", headers=owner).json()["count"] == 0


def test_non_finite_job_parameters_are_a_422(client, owner):
    dataset_id, teacher_id = ready_dataset(client, owner), ready_teacher(client, owner)
    body = json.dumps(distill_body(dataset_id, teacher_id)).replace('"epochs": 1', '"epochs": 1, "lr": Infinity')
    r = client.post("/v1/jobs", headers={**owner, "Content-Type": "application/json"}, content=body)
    assert r.status_code == 422 and r.json() == {"detail": "The request body holds Infinity; numbers must be finite."}


# -- reports and errors that leave the API -------------------------------------------------------------
def test_a_report_holding_nan_is_served_with_nulls(client, owner):
    dataset_id, teacher_id = ready_dataset(client, owner), ready_teacher(client, owner)
    job_id = client.post("/v1/jobs", headers=owner, json=distill_body(dataset_id, teacher_id)).json()["id"]
    report = b'{"models": {"student": {"clean_accuracy": NaN, "latency_ms": Infinity, "ok": 0.5}}}'
    finish(client, job_id, artifacts={"report_json": report})
    r = client.get(f"/v1/jobs/{job_id}/report", headers=owner)
    assert r.status_code == 200
    assert r.json() == {"models": {"student": {"clean_accuracy": None, "latency_ms": None, "ok": 0.5}}}


def test_stored_errors_are_shown_without_server_paths(client, owner):
    r = client.post("/v1/datasets/builtin", headers=owner, json={"builtin": "cifar10"})
    with client.app.state.sessionmaker() as session:
        crud.set_dataset_validated(session, r.json()["id"],
                                   error="CIFAR-10 is not installed under /srv/kdiga/home/data/cifar10; see the docs.")
    shown = client.get(f"/v1/datasets/{r.json()['id']}", headers=owner).json()["error"]
    assert shown == "CIFAR-10 is not installed under <server path>; see the docs."
    job = client.post("/v1/jobs", headers=owner, json=distill_body(r.json()["id"], ready_teacher(client, owner)))
    assert job.status_code == 409 and "/srv" not in job.json()["detail"]
    assert job.json()["detail"].endswith("(status invalid): CIFAR-10 is not installed under <server path>; see the docs.")


def test_unexpected_errors_answer_a_request_id_not_the_exception(tmp_path, redis_client, caplog):
    app = create_app(Settings(home=tmp_path, broker_url="redis://127.0.0.1:6379/0"))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("tried to allocate 4000000000000 bytes in /srv/kdiga/x")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom", headers={"X-Request-ID": "req-42"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-42"
    assert r.json() == {"detail": "Internal server error; quote request id req-42 when reporting it."}
    assert any("req-42" in rec.getMessage() for rec in caplog.records)


def test_an_unreachable_database_is_a_503_with_retry_after(tmp_path, redis_client):
    settings = Settings(home=tmp_path, run_migrations=False, broker_url="redis://127.0.0.1:6379/0",
                        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none", db_pool_timeout_s=1)
    with TestClient(create_app(settings)) as client:
        r = client.get("/v1/jobs", headers={"Authorization": "Bearer kdg_whatever"})
    assert r.status_code == 503 and r.headers["retry-after"] == str(settings.retry_after_s)
    assert r.json() == {"detail": "The database is unavailable, so nothing was changed; try again shortly."}


# -- limits: concurrent jobs, parameter ceilings, work budget ---------------------------------------
def test_429_carries_retry_after(client, owner, settings):
    body = distill_body(ready_dataset(client, owner), ready_teacher(client, owner))
    for _ in range(settings.max_concurrent_jobs_per_key):
        assert client.post("/v1/jobs", headers=owner, json=body).status_code == 201
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 429 and r.headers["retry-after"] == str(settings.retry_after_s)


@pytest.mark.parametrize("patch, detail", [
    ({"train": {"epochs": 10000}}, "'train.epochs' is 10000, above this server's maximum of 1000 (KDIGA_MAX_EPOCHS)."),
    ({"train": {"batch_size": 1}}, "'train.batch_size' is 1, below this server's minimum of 4 (KDIGA_MIN_BATCH_SIZE)."),
    ({"objective": {"attack_steps": 1000}},
     "'objective.attack_steps' is 1000, above this server's maximum of 100 (KDIGA_MAX_TRAIN_ATTACK_STEPS)."),
    ({"evaluation": {"attacks": [{"name": "pgd", "steps": 10**9, "restarts": 10**6}]}},
     "'evaluation.attacks[0] steps × restarts' is 1000000000000000, above this server's maximum of 10000 "
     "(KDIGA_MAX_ATTACK_ITERATIONS)."),
    ({"evaluation": {"max_points": 10**9}},
     "'evaluation.max_points' is 1000000000, above this server's maximum of 100000 (KDIGA_MAX_EVAL_POINTS)."),
    ({"evaluation": {"smoothing_samples": 10**9}},
     "'evaluation.smoothing_samples' is 1000000000, above this server's maximum of 100000 "
     "(KDIGA_MAX_SMOOTHING_SAMPLES)."),
    ({"evaluation": {"eps_curve": [0.01] * 40}},
     "'evaluation.eps_curve (points)' is 40, above this server's maximum of 32 (KDIGA_MAX_EPS_CURVE_POINTS)."),
])
def test_job_parameters_above_the_ceilings_are_refused(client, owner, patch, detail):
    body = {**distill_body(ready_dataset(client, owner), ready_teacher(client, owner)), **patch}
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 422 and r.json() == {"detail": detail}
    assert client.get("/v1/jobs", headers=owner).json()["count"] == 0


def test_the_work_budget_is_checked_per_key(tmp_path, settings):
    # digits: 1000 training points; kdiga costs 8 passes a sample: 1000 epochs are 8e6 passes of
    # training, plus 48,400 of evaluation (2 models × 100 points × (1 + pgd 21 + curve 8×21) + alignment
    # 100 × (4 + 2×50)), kdiga_service/work_budget.py
    settings = settings.model_copy(update={"home": tmp_path, "database_url": f"sqlite:///{tmp_path}/k.db",
                                           "max_work_per_key": 2_000_000, "max_concurrent_jobs_per_key": 4})
    evaluation = {"attacks": [{"name": "pgd", "steps": 10}], "max_points": 100, "smoothing_sigma": 0}
    with TestClient(create_app(settings)) as client:
        owner, _ = new_key(client)
        body = distill_body(ready_dataset(client, owner), ready_teacher(client, owner), evaluation=evaluation)
        body["objective"] = {"method": "kdiga", "gamma": 5.0}  # a fixed γ: one training run (auto costs its sweep)
        big = {**body, "train": {"epochs": 1000}}
        r = client.post("/v1/jobs", headers=owner, json=big)
        assert r.status_code == 422
        assert r.json()["detail"].startswith("This job's expected work is 8.05e+06 passes (training 8e+06, evaluation 4.84e+04)")
        assert "above the per-key budget of 2e+06 (KDIGA_MAX_WORK_PER_KEY)" in r.json()["detail"]
        medium = {**body, "train": {"epochs": 150}}
        assert client.post("/v1/jobs", headers=owner, json=medium).status_code == 201
        r = client.post("/v1/jobs", headers=owner, json=medium)
        assert r.status_code == 429 and r.headers["retry-after"] == str(settings.retry_after_s)
        assert "with your 1 active job(s)" in r.json()["detail"] and "wait for one to finish" in r.json()["detail"]


def test_student_weights_for_another_architecture_are_refused_at_submit(client, owner):
    dataset_id, teacher_id = ready_dataset(client, owner), ready_teacher(client, owner)  # a cnn_tiny teacher
    body = {**distill_body(dataset_id, teacher_id), "student": {"arch": "cnn_small", "weights_id": teacher_id}}
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 422
    assert r.json() == {"detail": f"Student weights '{teacher_id}' are for architecture 'cnn_tiny', not 'cnn_small'; "
                                  "set student.arch to 'cnn_tiny' or choose weights made for 'cnn_small'."}
    body["student"]["arch"] = "cnn_tiny"
    assert client.post("/v1/jobs", headers=owner, json=body).status_code == 201


def test_a_model_for_other_classes_is_refused_at_submit(client, owner):
    """A teacher, initial weights or evaluated model whose class count is not the dataset's: 422 at submit,
    naming both counts, not a failure in the worker after queueing."""
    dataset_id = ready_dataset(client, owner)  # digits: 10 classes
    r = upload_teacher(client, owner, meta={"arch": "cnn_tiny", "num_classes": 100, "name": "cifar100 teacher"})
    with client.app.state.sessionmaker() as session:
        assert crud.set_teacher_validated(session, r.json()["id"], spec=r.json()["spec"])
    other = r.json()["id"]
    detail = (f"predicts 100 classes but dataset '{dataset_id}' has 10; choose a model made for this dataset.")
    for body, role in [(distill_body(dataset_id, other), "teacher"),
                       ({**distill_body(dataset_id, ready_teacher(client, owner)),
                         "student": {"arch": "cnn_tiny", "weights_id": other}}, "student's initial weights"),
                       ({"kind": "evaluate", "dataset_id": dataset_id, "model": {"teacher_id": other}}, "model")]:
        r = client.post("/v1/jobs", headers=owner, json=body)
        assert r.status_code == 422 and r.json() == {"detail": f"The {role} '{other}' {detail}"}, r.json()
    assert client.get("/v1/jobs", headers=owner).json()["count"] == 0


def _validated_teacher(client, owner, **spec) -> str:
    r = upload_teacher(client, owner, meta={"arch": "cnn_tiny", "num_classes": 10, "name": "t", **spec})
    with client.app.state.sessionmaker() as session:
        assert crud.set_teacher_validated(session, r.json()["id"], spec=r.json()["spec"])
    return str(r.json()["id"])


def test_a_model_for_other_inputs_is_refused_at_submit(client, owner):
    """A teacher, initial weights or evaluated model whose input shape is not the dataset's: 422 at submit,
    naming both shapes, and no job row; not a failure in the worker after queueing."""
    dataset_id = ready_dataset(client, owner)  # digits: 1×8×8
    rgb = _validated_teacher(client, owner)  # 3×32×32, the upload's defaults
    small = _validated_teacher(client, owner, in_chans=1, img_size=16)  # the channels match, not the size
    for model_id, shape in [(rgb, "(3, 32, 32)"), (small, "(1, 16, 16)")]:
        detail = (f"inputs of shape {shape} but dataset '{dataset_id}' has (1, 8, 8); "
                  "choose a model made for this dataset's inputs.")
        for body, role in [(distill_body(dataset_id, model_id), "teacher"),
                           ({**distill_body(dataset_id, ready_teacher(client, owner)),
                             "student": {"arch": "cnn_tiny", "weights_id": model_id}}, "student's initial weights"),
                           ({"kind": "evaluate", "dataset_id": dataset_id, "model": {"teacher_id": model_id}},
                            "model")]:
            r = client.post("/v1/jobs", headers=owner, json=body)
            takes = "take" if role.endswith("weights") else "takes"
            assert r.status_code == 422 and r.json() == {"detail": f"The {role} '{model_id}' {takes} {detail}"}
    assert client.get("/v1/jobs", headers=owner).json()["count"] == 0  # nothing half-written
    r = client.post("/v1/jobs", headers=owner, json=distill_body(dataset_id, ready_teacher(client, owner)))
    assert r.status_code == 201, r.text  # a 1×8×8 teacher
    assert client.get("/v1/jobs", headers=owner).json()["count"] == 1


def test_a_dataset_read_in_place_takes_the_job_s_size_but_not_other_channels(client, owner, settings, monkeypatch,
                                                                              tmp_path):
    """A reference is resized to train.img_size, else the teacher's: only the channels (RGB) are fixed,
    and a given train.img_size must be the teacher's (the worker feeds the teacher what it reads)."""
    monkeypatch.setattr(settings, "dataset_roots", [tmp_path.as_uri()])
    monkeypatch.setattr(settings, "max_concurrent_jobs_per_key", 10)
    r = client.post("/v1/datasets/reference", headers=owner, json={"uri": (tmp_path / "imgs").as_uri(),
                                                                  "format": "image_folder"})
    assert r.status_code == 202, r.text
    dataset_id = r.json()["id"]
    info = {"num_classes": 10, "class_names": [str(i) for i in range(10)], "input_shape": [3, 64, 64],
            "train_size": 300, "test_size": 50}
    with client.app.state.sessionmaker() as session:
        assert crud.set_dataset_validated(session, dataset_id, info=info)
    rgb, rgb16 = _validated_teacher(client, owner), _validated_teacher(client, owner, img_size=16)
    gray = ready_teacher(client, owner)  # 1×8×8
    accepted = [distill_body(dataset_id, rgb), distill_body(dataset_id, rgb, train={"epochs": 1, "img_size": 32}),
                {"kind": "evaluate", "dataset_id": dataset_id, "model": {"teacher_id": rgb16}},
                {"kind": "adversarial_train", "dataset_id": dataset_id, "train": {"epochs": 1, "img_size": 16},
                 "student": {"arch": "cnn_tiny", "weights_id": rgb16}}]
    for body in accepted:  # images of 64 pixels, resized to the model's 32 or 16
        r = client.post("/v1/jobs", headers=owner, json=body)
        assert r.status_code == 201, r.text
    refused = {
        "teacher": (distill_body(dataset_id, gray), f"The teacher '{gray}' takes inputs of shape (1, 8, 8) but "
                    f"dataset '{dataset_id}' is read in place as 3-channel images; choose a model that takes 3 "
                    "channels."),
        "size": (distill_body(dataset_id, rgb, train={"epochs": 1, "img_size": 64}), f"The teacher '{rgb}' takes "
                 f"inputs of shape (3, 32, 32) but dataset '{dataset_id}' is read in place at (3, 64, 64) "
                 "(train.img_size); set train.img_size to 32 or leave it out."),
        "weights": ({**distill_body(dataset_id, rgb), "student": {"arch": "cnn_tiny", "weights_id": rgb16}},
                    f"The student's initial weights '{rgb16}' take inputs of shape (3, 16, 16) but dataset "
                    f"'{dataset_id}' is read in place at (3, 32, 32) (the teacher's input size); choose one that "
                    "takes the teacher's inputs."),
        "no size": ({"kind": "adversarial_train", "dataset_id": dataset_id, "student": {"arch": "cnn_tiny"}},
                    f"Dataset '{dataset_id}' is read in place, resized to train.img_size; give train.img_size, "
                    "the input size of the model to train."),
    }
    for what, (body, detail) in refused.items():
        r = client.post("/v1/jobs", headers=owner, json=body)
        assert r.status_code == 422 and r.json() == {"detail": detail}, (what, r.json())
    assert client.get("/v1/jobs", headers=owner).json()["count"] == len(accepted)


# -- normalisation stated ---------------------------------------------------------------------------
def test_teacher_answers_state_the_normalisation_the_model_will_use(client, owner):
    r = upload_teacher(client, owner, meta={"arch": "cnn_tiny", "num_classes": 10, "in_chans": 1})
    assert r.json()["normalization"] == {"mean": [0.5], "std": [0.5], "source": "default"}
    assert r.json()["spec"]["mean"] is None  # the row stores what was sent; validation records the rest
    r = upload_teacher(client, owner, meta={"arch": "cnn_tiny", "num_classes": 10, "in_chans": 1,
                                            "mean": [0.1], "std": [0.3]})
    assert r.json()["normalization"] == {"mean": [0.1], "std": [0.3], "source": "spec"}
    onnx = upload_teacher(client, owner, b"\x08\x07\x12\x07pytorch" + b"\0" * 32, meta={}, filename="m.onnx")
    assert onnx.json()["normalization"] == {"mean": None, "std": None, "source": "model"}
    assert client.get(f"/v1/teachers/{onnx.json()['id']}", headers=owner).json()["normalization"]["source"] == "model"


# -- Idempotency-Key on uploads ---------------------------------------------------------------------
def test_teacher_uploads_honour_idempotency_key(client, owner, redis_client, settings):
    headers = {**owner, "Idempotency-Key": "up-1"}
    meta = {"arch": "cnn_tiny", "num_classes": 10, "name": "t"}
    first = upload_teacher(client, headers, meta=meta)
    files_after_first = _stored_files(client, "teachers")
    again = upload_teacher(client, headers, meta=dict(reversed(list(meta.items()))))
    assert (first.status_code, again.status_code) == (202, 200) and again.json()["id"] == first.json()["id"]
    assert _stored_files(client, "teachers") == files_after_first
    assert client.get("/v1/teachers", headers=owner).json()["count"] == 1
    other_file = upload_teacher(client, headers, data=safetensors_bytes(8), meta=meta)
    assert other_file.status_code == 409
    assert other_file.json() == {"detail": "Idempotency-Key 'up-1' was already used with a different request."}
    assert _stored_files(client, "teachers") == files_after_first


def test_dataset_registrations_and_uploads_honour_idempotency_key(client, owner):
    headers = {**owner, "Idempotency-Key": "ds-1"}
    first = client.post("/v1/datasets/builtin", headers=headers, json={"builtin": "digits"})
    again = client.post("/v1/datasets", headers=headers, json={"builtin": "digits", "name": None})
    assert (first.status_code, again.status_code) == (202, 200) and again.json()["id"] == first.json()["id"]
    r = client.post("/v1/datasets/builtin", headers=headers, json={"builtin": "cifar10"})
    assert r.status_code == 409
    up = {**owner, "Idempotency-Key": "ds-2"}
    one = client.post("/v1/datasets", headers=up, files={"file": ("d.npz", _npz_like())}, data={"metadata": "{}"})
    two = client.post("/v1/datasets", headers=up, files={"file": ("d.npz", _npz_like())}, data={"metadata": "{}"})
    assert (one.status_code, two.status_code) == (202, 200) and one.json()["id"] == two.json()["id"]
    assert client.get("/v1/datasets", headers=owner).json()["count"] == 2


def test_the_deprecated_json_form_of_post_datasets_still_works(client, owner):
    r = client.post("/v1/datasets", headers=owner, json={"builtin": "digits", "name": "d"})
    assert r.status_code == 202 and r.json()["builtin"] == "digits"
    r = client.post("/v1/datasets", headers={**owner, "Content-Type": "text/plain"}, content=b"digits")
    assert r.status_code == 415 and "POST /v1/datasets/builtin" in r.json()["detail"]


def test_many_small_form_fields_cannot_fill_memory(client, owner):
    fields = {f"f{i}": "x" * 60_000 for i in range(35)}  # each under the per-field cap, 2.1 MB together
    r = client.post("/v1/teachers", headers=owner, data=fields, files={"file": ("t.safetensors", safetensors_bytes())})
    assert r.status_code == 413 and r.json() == {"detail": "The form fields add up to more than 2097152 bytes."}


def test_a_vit_with_another_patch_size_can_be_described(client, owner):
    """`student.kwargs` / teacher metadata `kwargs`: timm keywords that shape the network, bounded and checked."""
    dataset_id, teacher_id = ready_dataset(client, owner), ready_teacher(client, owner)
    body = {**distill_body(dataset_id, teacher_id),
            "student": {"arch": "vit_tiny_patch16_224", "kwargs": {"patch_size": 4, "depth": 2}}}
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 201, r.json()
    assert r.json()["spec"]["student"]["kwargs"] == {"patch_size": 4, "depth": 2}
    body["student"]["kwargs"] = {"pretrained": True}
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("Invalid value for 'student.kwargs': kwargs.pretrained is not a keyword a "
                                         "model spec may set; valid names are: ")
    r = upload_teacher(client, owner, meta={"arch": "vit_tiny_patch16_224", "num_classes": 10, "in_chans": 1,
                                            "img_size": 8, "kwargs": {"patch_size": 4}})
    assert r.status_code == 202 and r.json()["spec"]["kwargs"] == {"patch_size": 4}
