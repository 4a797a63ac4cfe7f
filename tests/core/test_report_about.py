"""A report names what it describes and never flatters (issue 17, item 6), with real tiny jobs on digits.

- ``about``: the job (id, name, kind), each model (arch, parameters, sha256 of the weights measured),
  the dataset, the date (UTC) and the service version, in report.json and the HTML header;
- metric names by role: a distilled ``student``, a model trained from scratch or evaluated alone ``model``;
- the model card's lineage (teacher id, sha256, arch; dataset);
- sanity checks of a student far below its teacher and of a model that has not learned the task;
- a teacher latency reused from an earlier job is never set beside this job's as a ratio.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
import torch

import kdiga_core
from kdiga_core import jobs, provenance

torch.set_num_threads(1)

DIGITS = {"kind": "digits"}
EVAL = {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}], "max_points": 40, "eps_curve": [0.0, 0.1, 0.5],
        "curve_attack_steps": 2, "linearity_steps": 2, "smoothing_points": 0, "latency": True, "batch_size": 40}
KNOWN = {"job": {"id": "job-123", "name": "digits <kdiga> run"}, "teacher": {"id": "teacher-9", "name": "robust cnn"},
         "dataset": {"id": "ds-1", "name": "my digits", "sha256": "ab" * 32, "size_bytes": 12345},
         "service_version": "9.9.9"}


def _files(result: dict) -> dict[str, Path]:
    return {a["name"]: a["path"] for a in result["artifacts"]}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> dict:
    """A teacher that has learned digits: 3 epochs of AdamW on clean data (a few seconds)."""
    spec = {"student": {"arch": "cnn_small"}, "objective": {"method": "ce"}, "evaluation": EVAL,
            "train": {"epochs": 3, "batch_size": 64, "optimizer": "adamw", "lr": 0.01, "device": "cpu"}}
    result = jobs.run_job("adversarial_train", spec, tmp_path_factory.mktemp("teacher"), jobs.JobInputs(DIGITS))
    return result


def _teacher_input(teacher: dict) -> jobs.ModelInput:
    return jobs.ModelInput(_files(teacher)["model.safetensors"], teacher["model_spec"])


def test_a_teacher_job_names_its_model_model_not_student(teacher):
    report = teacher["report"]
    assert set(report["models"]) == {"model"}
    assert teacher["metrics"]["model_clean_accuracy"] == report["models"]["model"]["clean_accuracy"]
    assert not [k for k in teacher["metrics"] if k.startswith("student_")], teacher["metrics"]
    card = json.loads(_files(teacher)["model_card.json"].read_text())
    lineage = card["training"]["lineage"]
    assert "teacher" not in lineage and lineage["dataset"]["name"] == "digits"
    assert lineage["job"]["kind"] == "adversarial_train"
    assert report["about"]["models"]["model"]["sha256"] == provenance.file_sha256(_files(teacher)["model.safetensors"])
    learned = {f["model"]: f for f in report["sanity"] if f["check"] == "clean_accuracy_learned"}
    assert learned["model"]["ok"], (learned, report["models"]["model"]["clean_accuracy"])


def test_distill_report_names_job_models_dataset_date_and_version(teacher, tmp_path):
    spec = {"student": {"arch": "cnn_tiny"}, "objective": {"method": "kd"}, "evaluation": EVAL,
            "train": {"epochs": 1, "batch_size": 256, "lr": 1e-6, "device": "cpu"}}  # a student that learns nothing
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    result = jobs.run_job("distill", spec, tmp_path, jobs.JobInputs(DIGITS, teacher=_teacher_input(teacher),
                                                                    about=KNOWN))
    files = _files(result)
    about = json.loads(files["report.json"].read_text())["about"]
    assert about["job"] == {"kind": "distill", "id": "job-123", "name": "digits <kdiga> run"}
    t, s = about["models"]["teacher"], about["models"]["student"]
    assert t["sha256"] == provenance.file_sha256(files_teacher := _files(teacher)["model.safetensors"])
    assert (t["id"], t["name"], t["arch"]) == ("teacher-9", "robust cnn", "cnn_small") and t["params"] > s["params"]
    assert s["sha256"] == provenance.file_sha256(files["student.safetensors"]) != t["sha256"]
    assert s["arch"] == "cnn_tiny" and s["params"] == result["report"]["models"]["student"]["stats"]["params"]
    assert about["dataset"]["id"] == "ds-1" and about["dataset"]["sha256"] == "ab" * 32
    assert about["dataset"]["num_classes"] == 10 and about["dataset"]["test_size"] > 0
    assert about["service_version"] == "9.9.9"
    made = dt.datetime.fromisoformat(about["generated_at"].replace("Z", "+00:00"))
    assert made.utcoffset() == dt.timedelta(0) and before <= made <= dt.datetime.now(dt.UTC)

    card = json.loads(files["model_card.json"].read_text())
    assert card["training"]["lineage"]["teacher"]["sha256"] == t["sha256"]
    assert card["training"]["lineage"]["teacher"]["id"] == "teacher-9"
    assert card["training"]["lineage"]["dataset"]["sha256"] == "ab" * 32
    assert files_teacher.is_file()

    page = files["report.html"].read_text()
    header = page[: page.index('id="headline"')]
    for text in ("digits &lt;kdiga&gt; run", "job-123", "robust cnn", "cnn_small", "cnn_tiny", t["sha256"],
                 s["sha256"], "my digits", about["generated_at"], "9.9.9"):
        assert text in header, text

    flags = {(f["check"], f["model"]): f for f in result["report"]["sanity"]}
    assert not flags[("near_teacher_clean_accuracy", "student")]["ok"]
    assert "far below the teacher" in flags[("near_teacher_clean_accuracy", "student")]["message"]
    assert not flags[("clean_accuracy_learned", "student")]["ok"]
    assert flags[("clean_accuracy_learned", "teacher")]["ok"]
    assert page.count('class="flag bad"') >= 2
    warning = page[page.index('id="warning"'): page.index('id="headline"')]  # said before any number
    assert "far below the teacher" in warning and "has not learned the task" in warning


def test_an_evaluate_job_calls_its_model_model(teacher, tmp_path):
    known = {"job": {"id": "ev-1", "name": "check"}, "model": {"id": "teacher-9", "name": "robust cnn"}}
    result = jobs.run_job("evaluate", {"evaluation": EVAL}, tmp_path,
                          jobs.JobInputs(DIGITS, teacher=_teacher_input(teacher), about=known))
    report = result["report"]
    assert set(report["models"]) == {"model"} and set(report["about"]["models"]) == {"model"}
    assert report["about"]["models"]["model"]["id"] == "teacher-9"
    assert set(result["metrics"]) >= {"model_clean_accuracy"} and not any(k.startswith("student") for k in
                                                                           result["metrics"])
    page = _files(result)["report.html"].read_text()
    assert not re.search(r"\bstudent\b", page), re.findall(r".{60}\bstudent\b.{60}", page)[:3]


def test_a_reused_teacher_latency_is_not_set_beside_this_jobs(teacher, tmp_path):
    spec = {"student": {"arch": "cnn_tiny"}, "objective": {"method": "kd"}, "evaluation": EVAL,
            "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "device": "cpu"}}
    inputs = jobs.JobInputs(DIGITS, teacher=_teacher_input(teacher), teacher_cache_dir=tmp_path / "cache")
    first = jobs.run_job("distill", spec, tmp_path / "a", inputs)
    second = jobs.run_job("distill", spec, tmp_path / "b", inputs)
    assert not first["report"]["teacher_evaluation"]["cached"] and second["report"]["teacher_evaluation"]["cached"]
    fresh, reused = (_files(r)["report.html"].read_text() for r in (first, second))
    assert ">faster<" in fresh.lower() or ">slower<" in fresh.lower()  # measured together: compared
    assert ">faster<" not in reused.lower() and ">slower<" not in reused.lower()
    assert 'id="latency-earlier-run"' in reused and 'id="latency-earlier-run"' not in fresh


def test_service_version_defaults_to_the_package(tmp_path):
    out = provenance.about("evaluate", None, {}, {"name": "digits"})
    assert out["service_version"] == kdiga_core.__version__ and out["generated_at"].endswith("Z")


@pytest.mark.browser
def test_browser_screenshot_of_a_real_report_shows_names_and_date_in_its_header(teacher, tmp_path):
    """The report of a real job, opened in headless Chromium (Playwright), shows in its header, inside the
    first screen, the job's and the models' names, their sha256, the dataset and the date."""
    import shutil

    chromium = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/install-system-deps.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    spec = {"student": {"arch": "cnn_tiny"}, "objective": {"method": "kdiga", "gamma": 1.0}, "evaluation": EVAL,
            "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "device": "cpu"}}
    result = jobs.run_job("distill", spec, tmp_path, jobs.JobInputs(DIGITS, teacher=_teacher_input(teacher),
                                                                    about=KNOWN))
    about, page_file = result["report"]["about"], _files(result)["report.html"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                     "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(page_file.as_uri())
            page.screenshot(path=str(tmp_path / "report-header.png"))  # the first screen, as a person sees it
            header = page.locator("#about")
            box = header.bounding_box()
            header.screenshot(path=str(tmp_path / "about.png"))
            seen = header.inner_text() + "\n" + page.locator("h1").inner_text() + page.locator("p.sub").inner_text()
        finally:
            browser.close()
    assert box is not None and box["y"] + box["height"] <= 800, box  # within the first screen
    for text in ("digits <kdiga> run", "job-123", "robust cnn", "cnn_small", "cnn_tiny", "my digits",
                 about["models"]["teacher"]["sha256"], about["models"]["student"]["sha256"],
                 about["generated_at"], "9.9.9"):
        assert text in seen, (text, seen)
    for shot in ("report-header.png", "about.png"):
        assert (tmp_path / shot).read_bytes().startswith(b"\x89PNG")


def test_every_evaluation_stage_moves_percent_and_has_an_eta(teacher, tmp_path):
    """An evaluate job with a reference teacher: every stage it reports is one it planned, so percent moves
    through each (alignment included, whose labels follow the measured model's role) and the ETA is given."""
    events: list[dict] = []
    card = _files(teacher)["model_card.json"]
    inputs = jobs.JobInputs(DIGITS, teacher=_teacher_input(teacher), model_dir=card.parent)
    evaluation = {**EVAL, "alignment": True, "linearity_steps": 2}
    jobs.run_job("evaluate", {"evaluation": evaluation}, tmp_path, inputs, jobs.JobHooks(on_step=events.append))
    evaluating = [e for e in events if e["phase"] == "evaluate"]
    stages: dict[str, list[float]] = {}
    for e in evaluating:
        stages.setdefault(e["stage"], []).append(e["percent"])
    assert not [s for s in stages if "student" in s], list(stages)
    assert {"model: input gradients", "model: local linearity", "teacher: local linearity"} <= set(stages)
    order = list(stages)
    for stage, following in zip(order, order[1:], strict=False):
        if any(other.startswith(stage + " (") for other in order):
            continue  # a stage measured in parts (ε-curve radii): the parts weigh, not the heading
        # the stage was planned, so it weighs something: the next one starts further on; except a teacher
        # stage served whole from kept per-batch results (the evaluated model is this very teacher, so its
        # measurement under the same key is reused: one tick, already at the stage's end)
        reused = stage.startswith("teacher: ") and len(stages[stage]) == 1
        assert stages[following][0] > stages[stage][0] or reused, (stage, stages[stage], following, stages[following])
        assert stages[following][0] >= stages[stage][-1], (stage, stages[stage], following, stages[following])
    assert all(e["eta_s"] is not None for e in evaluating[2:]), [e["eta_s"] for e in evaluating]
    assert evaluating[-1]["percent"] == 100.0
