"""The HTML report: plots inlined, user strings escaped, optional sections optional; and a real browser."""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdiga_core.report_html import render_report_html

CHROMIUM = "/usr/bin/chromium"


def _model(clean: float, pgd: float, aa: float, params: int, latency: float) -> dict:
    return {
        "clean_accuracy": clean,
        "attacks": {"pgd-20": pgd, "autoattack": aa},
        "autoattack_breakdown": [{"attack": "apgd-ce", "robust_accuracy": pgd},
                                 {"attack": "apgd-t", "robust_accuracy": (pgd + aa) / 2},
                                 {"attack": "square", "robust_accuracy": aa}],
        "eps_curve": [{"eps": e, "accuracy": max(0.0, clean - 2.5 * e)} for e in (0.0, 0.05, 0.1, 0.2, 0.3)],
        "smoothing": {"sigma": 0.25, "n_points": 50, "certified_accuracy": clean - 0.1, "mean_radius": 0.3,
                      "curve": [{"radius": r, "certified_accuracy": max(0.0, clean - 0.1 - r)}
                                for r in (0.0, 0.25, 0.5, 0.75)]},
        "stats": {"params": params, "macs": params * 20, "latency_ms": latency, "latency_batch": 1},
    }


REPORT = {
    "schema": "kdiga.report/1",
    "n_points": 500,
    "threat_model": {"norm": "Linf", "eps": 0.1},
    "models": {"student": _model(0.95, 0.71, 0.69, 20_000, 0.2),
               "teacher": _model(0.98, 0.80, 0.77, 240_000, 0.9)},
    "alignment": {"l1": 1.2, "l2": 0.1, "cosine": 0.9, "linearity_student": 0.01, "linearity_teacher": 0.02,
                  "bound": 0.8, "measured_loss": 0.6, "teacher_measured_loss": 0.55},
    "sanity": [{"check": "accuracy_falls_with_eps", "model": "student", "ok": True, "message": "fine"},
               {"check": "black_box_weaker", "model": "student", "ok": False,
                "message": "Square beat PGD <b>by 5%</b>"}],
}


def _images(page: str) -> dict[str, bytes]:
    found = re.findall(r'<img id="([^"]+)" class="plot" alt="[^"]+" src="data:image/png;base64,([^"]+)">', page)
    return {img_id: base64.b64decode(data) for img_id, data in found}


def test_full_report_has_every_section_and_inline_pngs():
    page = render_report_html(REPORT, "digits: KDIGA student", {"method": "kdiga", "gamma": 10, "epochs": 5})
    images = _images(page)
    assert set(images) == {"plot-eps-curve", "plot-bound", "plot-smoothing"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000 for png in images.values())
    for section in ("headline", "eps-curve", "attacks", "alignment", "smoothing", "size", "sanity", "settings"):
        assert f'<section id="{section}">' in page
    assert "robustness kept (autoattack)" in page
    assert "90%" in page  # 0.69 / 0.77 of the teacher's AutoAttack accuracy
    assert "apgd-t" in page and "240.00K" in page and "12.0×" in page
    assert 'class="flag bad">FAIL' in page and 'class="flag ok">PASS' in page
    assert "<td>method</td><td class=\"num\">" not in page  # settings values are text cells
    assert "<td>gamma</td><td>10</td>" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "<script" not in page  # self-contained


def test_user_strings_are_escaped():
    report = copy.deepcopy(REPORT)
    report["models"]["student"]["attacks"]["<img src=x onerror=alert(1)>"] = 0.5
    page = render_report_html(report, "<script>alert('t')</script>", {"dataset": "<b>digits</b>", "$x$": "$y"})
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;t&#x27;)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<b>by 5%</b>" not in page and "&lt;b&gt;by 5%&lt;/b&gt;" in page
    assert "<b>digits</b>" not in page and "&lt;b&gt;digits&lt;/b&gt;" in page


def test_student_only_report_skips_teacher_parts():
    report = {"schema": "kdiga.report/1", "n_points": 100, "threat_model": {"norm": "L2", "eps": 0.5},
              "models": {"student": {"clean_accuracy": 0.9, "attacks": {"pgd-20": 0.5},
                                     "eps_curve": [{"eps": 0.0, "accuracy": 0.9}, {"eps": 0.5, "accuracy": 0.5}]}}}
    page = render_report_html(report, "student only")
    assert set(_images(page)) == {"plot-eps-curve"}
    assert "no teacher given" in page and "robustness kept" not in page
    assert 'id="alignment"' not in page and 'id="smoothing"' not in page and 'id="size"' not in page


@pytest.mark.parametrize("report", [{}, {"models": {}}, {"models": {"student": {}}},
                                    {"models": {"student": {"clean_accuracy": "n/a", "eps_curve": [{"eps": None}],
                                                            "smoothing": {"sigma": 0}, "stats": {"params": 0}}},
                                     "alignment": {"cosine": float("nan")}, "sanity": ["junk", {"ok": True}]}])
def test_partial_or_malformed_reports_still_render(report):
    page = render_report_html(report, "partial")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_module_does_not_import_torch():
    code = ("import sys; import kdiga_core.report_html as r; r.render_report_html({}, 't'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.browser
def test_chromium_renders_every_plot(tmp_path: Path):
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    page = render_report_html({**REPORT, "gamma_sweep": SWEEP}, "browser check", {"method": "kdiga"})
    # A probe the test adds (the report itself has no script): once loaded, write each image's decoded
    # width into the DOM so --dump-dom shows whether the browser could decode the inline PNGs.
    probe = ("<script>window.addEventListener('load', () => { const out = document.createElement('pre');"
             "out.id = 'probe'; out.textContent = Array.from(document.images).map("
             "i => i.id + '=' + i.naturalWidth + 'x' + i.naturalHeight).join(';');"
             "document.body.appendChild(out); });</script>")
    html_file = tmp_path / "report.html"
    html_file.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", html_file.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    probe_text = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert probe_text, f"the probe did not run; DOM starts with: {dom[:300]!r}"
    sizes = dict(item.split("=") for item in probe_text.group(1).split(";") if item)
    assert set(sizes) == {"plot-eps-curve", "plot-bound", "plot-smoothing", "plot-gamma-sweep"}
    for img_id, size in sizes.items():
        width, height = (int(v) for v in size.split("x"))
        assert width > 100 and height > 100, f"{img_id} did not decode: {size}"
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1200,2400", f"--screenshot={shot}", html_file.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000


def test_report_says_when_teacher_numbers_were_reused():
    reused = render_report_html({**REPORT, "teacher_evaluation": {"cached": True, "key": "k"}}, "t", {})
    measured = render_report_html({**REPORT, "teacher_evaluation": {"cached": False, "key": "k"}}, "t", {})
    assert "reused from an earlier job" in reused and "reused from an earlier job" not in measured
    assert "measured in this job" in measured


def test_report_states_how_pgd_robust_accuracy_counts():
    page = render_report_html(REPORT, "t", {})
    assert "first PGD iterate that the model misclassifies" in page


def test_page_shows_the_sampling_error_and_how_the_points_were_drawn():
    errors = {"clean": 0.0191, "pgd-20": 0.0397, "autoattack": 0.0405}
    report = {**REPORT, "points": {"method": "stratified", "seed": 3, "n": 500,
                                   "per_class": {"cat": 250, "dog": 250}},
              "models": {role: {**m, "sampling_error": errors} for role, m in REPORT["models"].items()}}
    page = render_report_html(report, "t", {})
    student_aa = report["models"]["student"]["attacks"]["autoattack"]
    assert f"{100 * student_aa:.1f}% ± {100 * errors['autoattack']:.1f}" in page
    assert "1.96·√(p(1−p)/n)" in page and "500 test points (stratified by class)" in page
    assert "stratified sample of the test split (seed 3): cat ×250, dog ×250" in page
    assert "±" not in render_report_html(REPORT, "t", {})  # older reports: no error, no ±


SWEEP = {
    "rule": {"name": "robust_within_clean_drop", "max_clean_drop": 0.02,
             "text": "the most robust student whose clean validation accuracy is within 2.0 points of the KD student's"},
    "chosen": {"gamma": 3.0, "clean": 0.98, "robust": 0.72, "reason": "γ = 3 is <the most robust>"},
    "trials": [{"gamma": 0.0, "state": "complete", "clean": 0.97, "robust": 0.5, "epochs": 26},
               {"gamma": 3.0, "state": "complete", "clean": 0.98, "robust": 0.72, "epochs": 26},
               {"gamma": 30.0, "state": "pruned", "clean": 0.2, "robust": 0.2, "epochs": 3},
               {"gamma": 0.3, "state": "not_run", "clean": None, "robust": None, "epochs": 0}],
    "pareto_gammas": [3.0],
    "validation": {"n": 269, "attack": "pgd-10", "eps": 0.1},
    "plan": {"trial_epochs": 26, "rungs": [3, 9, 26]},
    "cost": {"budget_runs": 3.0, "job_runs": 2.4, "stopped_by": None},
    "transfer": {"teacher": {"clean_accuracy": 0.99, "robust_accuracy": 0.85, "linearity": 0.1,
                             "uniform_guess_loss": 2.3, "first_order_term": 0.4},
                 "verdict": {"transfers": False, "summary": "robustness will not transfer: <b>reason</b>",
                             "reasons": ["the student is small"],
                             "capacity": {"student_params": 1400, "teacher_params": 99000}}},
    "final_check": {"student_clean_accuracy": 0.97, "kd_reference_clean_accuracy": 0.975},
}


def test_gamma_sweep_section_shows_trials_pareto_plot_and_verdict():
    page = render_report_html({**REPORT, "gamma_sweep": SWEEP}, "auto")
    assert 'id="gamma-sweep"' in page and "plot-gamma-sweep" in _images(page)
    assert "WILL NOT TRANSFER" in page and "&lt;b&gt;reason&lt;/b&gt;" in page and "<b>reason</b>" not in page
    table = page[page.index('id="table-gamma-sweep"'):]
    assert "stopped early (successive halving)" in table and "not run: budget or time" in table
    assert "Chosen: γ = 3</b>" in page and 'id="table-transfer"' in page
    assert 'id="gamma-sweep"' not in render_report_html(REPORT, "fixed γ")


@pytest.mark.parametrize("sweep", [{"trials": "junk"}, {"trials": [{"gamma": "x"}], "transfer": {"verdict": 3}}])
def test_malformed_gamma_sweep_still_renders(sweep):
    assert render_report_html({**REPORT, "gamma_sweep": sweep}, "t").rstrip().endswith("</html>")
