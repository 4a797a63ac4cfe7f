"""The reproduction builds its jobs from the recipe files of examples/digits (issue 10).

The unit tests read the settings the script derives from the recipes and check them against the
files and against the API's own job schema; the slow one runs the script for one epoch and reads
its JSON. No timing or accuracy assertions: one epoch proves the pipeline, not the claim.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import reproduce_digits as repro
from kdiga_launcher.demo import load_recipe

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("ce", "kd", "kdiga")


def test_settings_come_from_the_recipes() -> None:
    args = repro.parse_args([])
    cfg = repro.settings(args)
    teacher = load_recipe("robust_teacher")
    assert repro.TEACHER_ARCH == teacher["student"]["arch"]
    assert cfg["eps"] == teacher["objective"]["attack_eps"]
    assert cfg["teacher_obj"].method == teacher["objective"]["method"]
    assert cfg["teacher_obj"].attack_steps == teacher["objective"]["attack_steps"]
    for key in ("optimizer", "lr", "weight_decay", "batch_size", "schedule"):
        assert getattr(cfg["teacher_train"], key) == teacher["train"][key], key
    # the reproduction's own schedule, not the demo's shorter one
    assert (cfg["teacher_train"].epochs, cfg["student_train"].epochs) == (15, 100)
    kdiga = load_recipe("student_kdiga")["objective"]
    obj = repro.student_objective("kdiga", args, cfg)
    assert (obj.gamma, obj.gamma_warmup, obj.iga_noise_eps) == (kdiga["gamma"], kdiga["gamma_warmup"],
                                                                kdiga["iga_noise_eps"])
    assert repro.student_objective("ce", args, cfg).method == "ce"


def test_eps_rescales_the_attack_and_the_noise_and_kdiga_overrides_win() -> None:
    args = repro.parse_args(["--eps", "0.2", "--kdiga", '{"gamma": 1.5}', "--quick"])
    cfg = repro.settings(args)
    teacher = load_recipe("robust_teacher")["objective"]
    assert cfg["teacher_obj"].attack_eps == 0.2
    assert cfg["teacher_obj"].attack_step == pytest.approx(teacher["attack_step"] * 0.2 / teacher["attack_eps"])
    obj = repro.student_objective("kdiga", args, cfg)
    assert (obj.gamma, obj.iga_noise_eps) == (1.5, 0.2)
    assert cfg["student_train"].epochs == repro.QUICK_EPOCHS


def test_a_method_without_a_recipe_is_refused_in_one_sentence() -> None:
    args = repro.parse_args([])
    with pytest.raises(SystemExit, match="No recipe examples/digits/student_rslad.json"):
        repro.student_objective("rslad", args, repro.settings(args))


def test_the_recipes_it_trains_are_valid_job_bodies_for_the_api() -> None:
    from api.schemas import JobCreate

    for name in ("robust_teacher", *(f"student_{m}" for m in METHODS)):
        recipe = load_recipe(name)
        ids = {"dataset_id": "d", "teacher_id": "t" if recipe["kind"] == "distill" else None}
        assert JobCreate.model_validate({**recipe, **ids}).kind == recipe["kind"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_epoch_run_trains_every_recipe_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    cmd = [sys.executable, "benchmarks/reproduce_digits.py", "--quick", "--skip-aa", "--teacher-epochs", "1",
           "--student-epochs", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"pgd_at", *METHODS}
    assert rows["kdiga"]["objective"]["gamma"] == load_recipe("student_kdiga")["objective"]["gamma"]
    assert result["settings"]["recipes"] == "examples/digits"
    assert "| student | cnn_small |" in proc.stdout
    assert out.with_suffix(".teacher.safetensors").exists()
