"""The OpenAPI document: one error model everywhere, bounded integers, one body per operation,
real examples per job kind; /docs and /redoc use only assets the app serves itself."""

from __future__ import annotations

import json
import re

from api.routes.datasets import NPZ_KEYS
from api.schemas import JOB_EXAMPLES

ERROR_CODES = {"400", "401", "404", "409", "413", "415", "422", "429", "503"}


def _operations(doc):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def test_every_error_answer_uses_the_one_error_model(client):
    doc = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["schemas"]["ErrorPublic"]["properties"]["detail"]["type"] == "string"
    seen = set()
    for path, method, op in _operations(doc):
        for code, answer in op["responses"].items():
            if code in ERROR_CODES:
                seen.add(code)
                schema = answer["content"]["application/json"]["schema"]["$ref"]
                assert schema.endswith(("/ErrorPublic", "/NotReadyPublic")), (path, method, code)
        assert {"400", "422"} <= set(op["responses"]), (path, method)
        if op.get("security"):
            assert {"401", "503"} <= set(op["responses"]), (path, method)
    assert seen == ERROR_CODES
    for path, method, op in _operations(doc):
        for code in ("429", "503"):
            if code in op["responses"]:
                assert "Retry-After" in op["responses"][code]["headers"], (path, method, code)


def test_every_integer_parameter_has_a_maximum(client):
    doc = client.get("/openapi.json").json()
    for path, method, op in _operations(doc):
        for param in op.get("parameters", []):
            if param["schema"].get("type") == "integer":
                assert param["schema"]["maximum"] < 2**63, (path, method, param["name"])


def test_one_request_body_per_operation(client):
    for path, method, op in _operations(client.get("/openapi.json").json()):
        assert len(op.get("requestBody", {}).get("content", {"x": 1})) == 1, (path, method)


def test_job_creation_has_a_real_example_per_kind(client):
    body = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    examples = body["application/json"]["examples"]
    assert set(examples) == {"distill", "adversarial_train", "evaluate"}
    for kind, example in examples.items():
        assert example["value"]["kind"] == kind and "string" not in str(example["value"])
    assert examples == {k: {"summary": v["summary"], "value": v["value"]} for k, v in JOB_EXAMPLES.items()}


def test_uploads_document_npz_keys_and_normalisation_defaults(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert NPZ_KEYS in paths["/v1/datasets"]["post"]["description"]
    teacher = paths["/v1/teachers"]["post"]["description"]
    assert "**0.5 per channel**" in teacher and "**none**" in teacher


def test_operation_ids_are_the_route_names(client):
    ids = {op["operationId"] for _, _, op in _operations(client.get("/openapi.json").json())}
    assert {"create_job", "read_job", "create_dataset", "create_builtin_dataset", "download_artifact"} <= ids


def test_docs_pages_load_their_assets_from_the_app_itself(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?['"]([^'"]+)['"]""", html)
        urls = [u for pair in urls for u in pair if u]
        assert urls, page
        for url in urls:
            assert url.startswith("/"), (page, url)  # no CDN
            assert client.get(url).status_code == 200, (page, url)
    assert client.get("/docs-assets/swagger-ui-bundle.js").headers["content-type"].startswith(
        ("application/javascript", "text/javascript"))


def _example_of(doc: dict, content: dict) -> list:
    """The examples /docs shows for a request body: its own, or its schema's (followed through $ref)."""
    if "examples" in content:
        return [e["value"] for e in content["examples"].values()]
    schema = content["schema"]
    schema = next((s for s in schema.get("anyOf", []) if "$ref" in s), schema)  # an optional body
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "properties" in schema and "metadata" in schema["properties"]:  # multipart: the JSON metadata part
        return [json.loads(schema["properties"]["metadata"]["example"])]
    return list(schema.get("examples") or [])


def test_every_request_body_has_a_real_example(client):
    """/docs shows a real body for every operation that takes one: never Swagger's placeholder "string", and
    no body that fills both `student` and `model` (a job has one or the other)."""
    from api.schemas import (
        DatasetBuiltinCreate,
        DatasetReferenceCreate,
        DatasetUploadMetadata,
        JobCreate,
        ResumeRequest,
        TeacherMetadata,
    )
    from api.schemas_mlops import PipelineCreate

    doc = client.get("/openapi.json").json()
    models = {"/v1/jobs": JobCreate, "/v1/teachers": TeacherMetadata, "/v1/datasets": DatasetUploadMetadata,
              "/v1/datasets/builtin": DatasetBuiltinCreate, "/v1/datasets/reference": DatasetReferenceCreate,
              "/v1/pipelines": PipelineCreate, "/v1/jobs/{job_id}/resume": ResumeRequest}
    seen = set()
    for path, method, op in _operations(doc):
        for content in op.get("requestBody", {}).get("content", {}).values():
            examples = _example_of(doc, content)
            assert examples, (path, method)
            for value in examples:
                assert '"string"' not in json.dumps(value), (path, value)
                models[path].model_validate(value)  # each example is a body the API accepts
                for body in [value, *value.get("steps", [])]:
                    assert not (body.get("student") and body.get("model")), (path, body)
            seen.add(path)
    assert seen == set(models)
