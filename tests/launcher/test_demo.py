"""The demo (README command 1) without starting anything: its table and its --help."""

from __future__ import annotations

import subprocess
import sys

from rich.console import Console

from kdiga_launcher import demo


def test_results_table_has_teacher_and_both_students():
    report = {"models": {"teacher": {"clean_accuracy": 0.98, "attacks": {"pgd-20": 0.8, "autoattack": 0.78},
                                     "stats": {"params": 100000, "latency_ms": 0.5}},
                         "student": {"clean_accuracy": 0.95, "attacks": {"pgd-20": 0.7, "autoattack": 0.69},
                                     "stats": {"params": 20000, "latency_ms": 0.1}}}}
    console = Console(record=True, width=140)
    console.print(demo.results_table({"kd": report, "kdiga": report}))
    text = console.export_text()
    assert "teacher" in text and "cnn_medium" in text and "KD student" in text and "KDIGA student" in text
    assert "78.0%" in text and "69.0%" in text and "100,000" in text


def test_demo_help_runs_without_starting_anything():
    out = subprocess.run([sys.executable, "-m", "kdiga_launcher.demo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--url" in out and "--quick" in out


def test_every_recipe_is_a_valid_job_body_for_the_api():
    """The recipes go to POST /v1/jobs as they are: the API's own schema must accept each one."""
    from api.schemas import JobCreate

    for name in ("robust_teacher", "student_kd", "student_kdiga", "student_kdiga_auto", "student_kdiga_two_devices"):
        recipe = demo.load_recipe(name)
        body = JobCreate.model_validate({**recipe, "dataset_id": "d", "teacher_id": "t" if recipe["kind"] == "distill" else None})
        assert body.kind == recipe["kind"]
