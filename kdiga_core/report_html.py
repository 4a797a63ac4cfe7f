"""Render a robustness report (the `evaluate` dict, docs/contracts.md) as one self-contained HTML page.

The page leads with the answer a person wants (how much of the teacher's robustness the student
kept), then the evidence: the robust-accuracy-vs-eps curves, the attack table with the AutoAttack
breakdown, gradient alignment and the local-linearity bound, randomized smoothing, model size and
latency, the sanity checks and the settings used.

Plots are drawn with matplotlib's Agg canvas (no pyplot state, no display) and inlined as base64
PNG, so the page needs no network and no JavaScript. Every string that came from a user (names,
settings, messages) is escaped. Optional sections are skipped when absent; a report without a
teacher shows the student alone.

No torch import here: API-side tools render reports too.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable
from typing import Any

TEACHER_COLOR = "#4c72b0"
STUDENT_COLOR = "#dd8452"
_ROLE_ORDER = ("teacher", "student", "model")
_SUBJECTS = ("student", "model")  # the measured model's role: a distilled student, or a model on its own

_CSS = """
:root { --ok:#1a7f37; --bad:#cf222e; --muted:#57606a; --line:#d0d7de; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color:#1f2328;
       max-width: 1080px; margin: 0 auto; padding: 24px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 10px;
     border-bottom: 1px solid var(--line); padding-bottom: 4px; }
.sub { color: var(--muted); margin: 0 0 18px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { flex: 1 1 180px; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: var(--bg); }
.card .label { color: var(--muted); font-size: 13px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 24px; font-weight: 600; }
.card .pair { font-size: 13px; color: var(--muted); }
.card.hero { flex-basis: 100%; background: #fff8f0; border-color: #f0c8a0; }
.card.hero .value { font-size: 30px; }
table { border-collapse: collapse; margin: 6px 0 12px; min-width: 50%; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 12px; text-align: left; }
th { background: var(--bg); font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
.flag { display: inline-block; min-width: 46px; text-align: center; border-radius: 10px; padding: 0 8px;
        color: #fff; font-size: 12px; font-weight: 600; }
.flag.ok { background: var(--ok); } .flag.bad { background: var(--bad); }
.sanity.bad td { background: #ffebe9; }
.warning { border: 1px solid var(--bad); background: #ffebe9; border-radius: 8px; padding: 8px 14px; margin: 0 0 14px; }
.note { color: var(--muted); font-size: 13px; }
table.about { margin: 0 0 14px; font-size: 13px; } table.about th { width: 90px; }
table.about code { font-size: 11px; word-break: break-all; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.row img.plot { flex: 0 1 620px; } .row table { min-width: 0; }
code { background: var(--bg); padding: 1px 4px; border-radius: 4px; }
"""


# --------------------------------------------------------------------------- small helpers


def _e(value: Any) -> str:
    """Escape anything for HTML text and attribute context."""
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A finite float, or None for missing/invalid values (reports come from outside)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _pct(value: Any, digits: int = 1) -> str:
    v = _num(value)
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def _pct_pm(value: Any, error: Any) -> str:
    """A percentage with its sampling error, ``97.0% ± 1.2``, when the report has one."""
    e = _num(error)
    return _pct(value) if e is None or _num(value) is None else f"{_pct(value)} ± {100 * e:.1f}"


def _fmt(value: Any, digits: int = 3) -> str:
    v = _num(value)
    if v is None:
        return "—" if value is None else _e(value)
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}"


def _g(value: Any) -> str:
    """Short general format for radii and other small settings (0.05, 8/255 -> 0.0314)."""
    v = _num(value)
    return "—" if v is None else f"{v:.3g}"


def _count(value: Any) -> str:
    """Human-sized counts: 1.23M, 45.6K."""
    v = _num(value)
    if v is None:
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{int(v):,}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list | tuple) else []


def _mpl_text(text: Any) -> str:
    """Plot labels: keep matplotlib from reading `$...$` in user strings as mathtext."""
    return str(text).replace("$", r"\$")


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], *, numeric_from: int = 1,
           row_classes: Iterable[str] | None = None, table_id: str | None = None) -> str:
    """An HTML table; cells are already-escaped HTML, headers are escaped here."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    classes = list(row_classes) if row_classes is not None else None
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="num">{c}</td>' if j >= numeric_from else f"<td>{c}</td>"
                        for j, c in enumerate(row))
        cls = f' class="{_e(classes[i])}"' if classes and i < len(classes) and classes[i] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    tid = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --------------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _png_img(fig: Any, *, img_id: str, alt: str) -> str:
    """Render a Figure with the Agg canvas and return an <img> with the PNG inlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img id="{_e(img_id)}" class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _curve_points(points: Any, x_key: str, y_key: str) -> list[tuple[float, float]]:
    out = []
    for p in _list(points):
        x, y = _num(_dict(p).get(x_key)), _num(_dict(p).get(y_key))
        if x is not None and y is not None:
            out.append((x, y))
    return sorted(out)


def _line_plot(series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str, title: str,
               img_id: str, alt: str, vline: float | None = None, vline_label: str = "") -> str:
    fig, ax = _figure()
    colors = {"teacher": TEACHER_COLOR, "student": STUDENT_COLOR, "model": STUDENT_COLOR}
    for role, pts in series.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, [100 * y for y in ys], marker="o", lw=2, ms=4, label=_mpl_text(role),
                color=colors.get(role))
    if vline is not None:
        ax.axvline(vline, color="#888", ls="--", lw=1, label=_mpl_text(vline_label))
    ax.set_xlabel(_mpl_text(xlabel))
    ax.set_ylabel(_mpl_text(ylabel))
    ax.set_title(_mpl_text(title))
    ax.set_ylim(0, 102)
    ax.legend(frameon=False)
    return _png_img(fig, img_id=img_id, alt=alt)


def _bound_plot(alignment: dict[str, Any]) -> str | None:
    bars = [(label, _num(alignment.get(key))) for label, key in
            (("student loss (measured)", "measured_loss"), ("local-linearity bound", "bound"),
             ("teacher loss (measured)", "teacher_measured_loss"))]
    bars = [(label, v) for label, v in bars if v is not None]
    if not bars:
        return None
    fig, ax = _figure(6.4, 2.8)
    colors = [STUDENT_COLOR if "student" in b[0] else TEACHER_COLOR if "teacher" in b[0] else "#8c8c8c"
              for b in bars]
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=colors)
    for i, (_, v) in enumerate(bars):
        ax.text(v, i, f" {v:.3g}", va="center")
    ax.set_xlabel("adversarial cross-entropy loss")
    ax.set_title("Robust loss: bound vs measured")
    ax.invert_yaxis()
    return _png_img(fig, img_id="plot-bound", alt="Bar chart of the student's measured adversarial loss, "
                    "the local-linearity bound, and the teacher's measured loss")


# --------------------------------------------------------------------------- sections


def _roles(models: dict[str, Any]) -> list[str]:
    """Model roles in display order: teacher first, student second, then anything else."""
    known = [r for r in _ROLE_ORDER if isinstance(models.get(r), dict)]
    return known + sorted(r for r in models if r not in _ROLE_ORDER and isinstance(models[r], dict))


def _attack_names(models: dict[str, Any], roles: list[str]) -> list[str]:
    names: list[str] = []
    for role in roles:
        for name in _dict(models[role].get("attacks")):
            if name not in names:
                names.append(name)
    return names


def _headline_attack(names: list[str]) -> str | None:
    """The strongest evaluation we have: AutoAttack if run, else the last attack listed."""
    for name in names:
        if "autoattack" in name.lower().replace("-", "").replace("_", ""):
            return name
    return names[-1] if names else None


def _kept(student: Any, teacher: Any) -> float | None:
    s, t = _num(student), _num(teacher)
    if s is None or t is None or t <= 0:
        return None
    return s / t


def _card(label: str, value: str, pair: str = "", css: str = "card") -> str:
    pair_html = f'<div class="pair">{pair}</div>' if pair else ""
    return f'<div class="{css}"><div class="label">{_e(label)}</div><div class="value">{value}</div>{pair_html}</div>'


def _subject(models: dict[str, Any]) -> str | None:
    """The measured model's role (student or model), or None when the report holds the teacher alone."""
    return next((r for r in _SUBJECTS if isinstance(models.get(r), dict)), None)


def _headline(models: dict[str, Any], roles: list[str], names: list[str], same_run: bool) -> str:
    subject = _subject(models)
    teacher, student = _dict(models.get("teacher")), _dict(models.get(subject or ""))
    main = student or _dict(models.get(roles[0]))
    cards = []
    hero = _headline_attack(names)
    if teacher and student and hero:
        kept = _kept(_dict(student.get("attacks")).get(hero), _dict(teacher.get("attacks")).get(hero))
        if kept is not None:
            s_acc, t_acc = _dict(student.get("attacks")).get(hero), _dict(teacher.get("attacks")).get(hero)
            cards.append(_card(f"robustness kept ({hero})", _e(f"{100 * kept:.0f}%"),
                               _e(f"the {subject} keeps {_pct(s_acc)} robust accuracy where the teacher has "
                                  f"{_pct(t_acc)}"), "card hero"))
    for metric, getter in [("clean", lambda m: m.get("clean_accuracy"))] + [
            (name, lambda m, n=name: _dict(m.get("attacks")).get(n)) for name in names]:
        pair = ""
        if teacher and student:
            kept = _kept(getter(student), getter(teacher))
            pair = _e(f"teacher {_pct(getter(teacher))}" + (f" · kept {100 * kept:.0f}%" if kept is not None else ""))
        cards.append(_card(f"{metric} accuracy", _e(_pct(getter(main))), pair))
    stats_s, stats_t = _dict(student.get("stats")), _dict(teacher.get("stats"))
    cards.append(_ratio_card(("smaller", "larger"), stats_s.get("params"), stats_t.get("params"),
                             lambda v: _count(v), "params"))
    if same_run:  # latencies of two runs (a teacher's reused from an earlier job) are never set side by side
        cards.append(_ratio_card(("faster", "slower"), stats_s.get("latency_ms"), stats_t.get("latency_ms"),
                                 lambda v: _fmt(v), "ms"))
    return f'<section id="headline"><div class="cards">{"".join(cards)}</div></section>'


def _ratio_card(words: tuple[str, str], mine: Any, theirs: Any, fmt: Any, unit: str) -> str:
    """"3.2× smaller" when the measured model's number is below the teacher's, "1.5× larger" when above;
    nothing when either is missing or a ratio would round to 0.0× (it would say nothing true)."""
    m, t = _num(mine), _num(theirs)
    if not m or not t or m <= 0 or t <= 0:
        return ""
    word, ratio = (words[0], t / m) if m <= t else (words[1], m / t)
    return _card(word, _e(f"{ratio:.1f}×"), _e(f"{fmt(m)} vs {fmt(t)} {unit} (teacher)"))


def _eps_section(models: dict[str, Any], roles: list[str], threat: dict[str, Any]) -> str:
    series = {r: pts for r in roles if (pts := _curve_points(models[r].get("eps_curve"), "eps", "accuracy"))}
    if not series:
        return ""
    norm = threat.get("norm", "")
    img = _line_plot(series, xlabel=f"ε ({norm})" if norm else "ε", ylabel="robust accuracy (%)",
                     title="Robust accuracy vs attack radius", img_id="plot-eps-curve",
                     alt="Robust accuracy versus epsilon for " + " and ".join(series),
                     vline=_num(threat.get("eps")), vline_label="evaluated ε")
    all_eps = sorted({x for pts in series.values() for x, _ in pts})
    rows = [[_e(_g(eps))] + [_e(_pct(dict(series[r]).get(eps))) for r in series] for eps in all_eps]
    return ('<section id="eps-curve"><h2>Robustness vs ε</h2><div class="row">' + img
            + _table(["ε"] + list(series), rows, table_id="table-eps-curve") + "</div></section>")


def _attack_section(models: dict[str, Any], roles: list[str], names: list[str]) -> str:
    subject = _subject(models)
    both = "teacher" in roles and subject is not None
    headers = ["attack"] + roles + (["kept"] if both else [])
    rows = []
    for label, getter in [("clean", lambda m: m.get("clean_accuracy"))] + [
            (n, lambda m, n=n: _dict(m.get("attacks")).get(n)) for n in names]:
        row = [_e(label)] + [_e(_pct_pm(getter(models[r]), _dict(models[r].get("sampling_error")).get(label)))
                             for r in roles]
        if both:
            kept = _kept(getter(models[subject]), getter(models["teacher"]))
            row.append("—" if kept is None else _e(f"{100 * kept:.0f}%"))
        rows.append(row)
    out = '<section id="attacks"><h2>Accuracy under attack</h2>' + _table(headers, rows, table_id="table-attacks")
    if any(_dict(models[r].get("sampling_error")) for r in roles):
        out += ('<p class="note">± is the sampling error of the evaluated points (95%: '
                "1.96·√(p(1−p)/n)): another sample of as many test points would land within it.</p>")
    breakdown_roles = [r for r in roles if _list(models[r].get("autoattack_breakdown"))]
    if breakdown_roles:
        steps: list[str] = []
        values: dict[tuple[str, str], Any] = {}
        for r in breakdown_roles:
            for item in _list(models[r]["autoattack_breakdown"]):
                name = str(_dict(item).get("attack", "?"))
                if name not in steps:
                    steps.append(name)
                values[(r, name)] = _dict(item).get("robust_accuracy")
        rows = [[_e(s)] + [_e(_pct(values.get((r, s)))) for r in breakdown_roles] for s in steps]
        out += ('<h3>AutoAttack breakdown</h3><p class="note">Robust accuracy after each attack; later '
                'attacks run only on the points that survived the earlier ones.</p>'
                + _table(["after attack"] + breakdown_roles, rows, table_id="table-autoattack"))
    return out + "</section>"


def _alignment_section(alignment: dict[str, Any]) -> str:
    if not alignment:
        return ""
    labels = {"cosine": "cosine similarity of input gradients (student vs teacher)",
              "l1": "mean L1 distance of input gradients", "l2": "mean L2 distance of input gradients",
              "linearity_student": "local linearity γ, student", "linearity_teacher": "local linearity γ, teacher",
              "bound": "local-linearity bound on the student's adversarial loss",
              "measured_loss": "student's measured adversarial loss",
              "teacher_measured_loss": "teacher's measured adversarial loss"}
    rows = [[_e(labels.get(k, k)), _e(_fmt(v, 4))] for k, v in alignment.items()
            if not isinstance(v, dict | list)]
    bound, measured = _num(alignment.get("bound")), _num(alignment.get("measured_loss"))
    note = ""
    if bound is not None and measured is not None:
        holds = measured <= bound + 1e-9
        note = (f'<p class="note">The measured loss is <b>{"within" if holds else "above"}</b> the bound '
                f"({_e(_fmt(measured, 4))} vs {_e(_fmt(bound, 4))}).</p>")
    plot = _bound_plot(alignment) or ""
    return ('<section id="alignment"><h2>Gradient alignment and the local-linearity bound</h2>'
            '<p class="note">KDIGA aligns the student\'s input gradients with the teacher\'s; with a locally '
            "linear student this bounds its adversarial loss by the teacher's.</p>" + note
            + '<div class="row">' + plot + _table(["measure", "value"], rows, table_id="table-alignment")
            + "</div></section>")


def _smoothing_section(models: dict[str, Any], roles: list[str]) -> str:
    smooth = {r: _dict(models[r].get("smoothing")) for r in roles if _dict(models[r].get("smoothing"))}
    if not smooth:
        return ""
    series = {r: pts for r, s in smooth.items()
              if (pts := _curve_points(s.get("curve"), "radius", "certified_accuracy"))}
    sigma = next((s.get("sigma") for s in smooth.values() if s.get("sigma") is not None), None)
    img = ""
    if series:
        img = _line_plot(series, xlabel="L2 radius", ylabel="certified accuracy (%)",
                         title=f"Randomized smoothing (σ = {_g(sigma)})", img_id="plot-smoothing",
                         alt="Certified accuracy versus L2 radius under randomized smoothing for "
                             + " and ".join(series))
    rows = [[_e(r), _e(_pct(s.get("certified_accuracy"))), _e(_fmt(s.get("mean_radius"), 3)),
             _e(_g(s.get("sigma"))), _e(_fmt(s.get("n_points")))] for r, s in smooth.items()]
    return ('<section id="smoothing"><h2>Randomized smoothing (certified L2 robustness)</h2><div class="row">'
            + img + _table(["model", "certified accuracy", "mean radius", "σ", "points"], rows,
                           table_id="table-smoothing") + "</div></section>")


def _stats_section(models: dict[str, Any], roles: list[str], same_run: bool) -> str:
    stats = {r: _dict(models[r].get("stats")) for r in roles if _dict(models[r].get("stats"))}
    if not stats:
        return ""
    earlier = "" if same_run or "teacher" not in stats else (
        '<p class="note" id="latency-earlier-run">The teacher\'s latency was measured by an earlier job (its '
        "evaluation was reused), on a machine and load that may differ: it is not compared with this job's.</p>")
    batch = next((s.get("latency_batch") for s in stats.values() if s.get("latency_batch")), None)
    rows = [[_e(r), _e(_count(s.get("params"))), _e(_count(s.get("macs"))), _e(_fmt(s.get("latency_ms"), 3))]
            for r, s in stats.items()]
    note = f'<p class="note">Latency measured on the exported model, batch size {_e(batch)}.</p>' if batch else ""
    return ('<section id="size"><h2>Model size and latency</h2>'
            + _table(["model", "parameters", "MACs", "latency (ms)"], rows, table_id="table-size")
            + note + earlier + "</section>")


def _sanity_section(sanity: list[Any]) -> str:
    checks = [_dict(c) for c in sanity if isinstance(c, dict)]
    if not checks:
        return ""
    rows, classes = [], []
    for c in checks:
        ok = bool(c.get("ok"))
        flag = f'<span class="flag {"ok" if ok else "bad"}">{"PASS" if ok else "FAIL"}</span>'
        rows.append([flag, _e(c.get("check", "")), _e(c.get("model", "")), _e(c.get("message", ""))])
        classes.append("sanity ok" if ok else "sanity bad")
    failed = sum(1 for c in checks if not c.get("ok"))
    summary = ("All sanity checks passed." if not failed
               else f"{failed} sanity check{'s' if failed > 1 else ''} failed: treat the robust accuracies "
                    "with care (masked gradients make attacks look weaker than they are).")
    return ('<section id="sanity"><h2>Sanity checks</h2>'
            f'<p class="note">{_e(summary)}</p>'
            + _table(["", "check", "model", "message"], rows, numeric_from=99, row_classes=classes,
                     table_id="table-sanity") + "</section>")


def _flatten(prefix: str, value: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _flatten(f"{prefix}.{k}" if prefix else str(k), v)
    else:
        yield prefix, value


def _points_text(points: dict[str, Any]) -> str:
    """``stratified sample of the test split (seed 0): 0 ×10, 1 ×10, ...``."""
    per_class = ", ".join(f"{name} ×{count}" for name, count in _dict(points.get("per_class")).items())
    return f"{points.get('method', '?')} sample of the test split (seed {points.get('seed', '?')}): {per_class}"


def _settings_section(context: dict[str, Any] | None, report: dict[str, Any]) -> str:
    items = list(_flatten("", context or {}))
    threat = _dict(report.get("threat_model"))
    for key in ("norm", "eps"):
        if key in threat:
            items.append((f"threat_model.{key}", threat[key]))
    if report.get("n_points") is not None:
        items.append(("evaluated points", report["n_points"]))
    points = _dict(report.get("points"))
    if points:
        items.append(("how the points were drawn", _points_text(points)))
    models = _dict(report.get("models"))
    if any(str(k).startswith("pgd") for m in models.values() for k in _dict(_dict(m).get("attacks"))):
        items.append(("PGD robust accuracy", "a point counts as broken at the first PGD iterate that the "
                      "model misclassifies"))
    cache = _dict(report.get("teacher_evaluation"))
    if "cached" in cache:
        items.append(("teacher numbers", "reused from an earlier job's evaluation (same weights, points and "
                      "settings)" if cache["cached"] else "measured in this job"))
    if not items:
        return ""
    rows = [[_e(k), _e(v if isinstance(v, str) else json.dumps(v, default=str))] for k, v in items]
    return ('<section id="settings"><h2>Settings used</h2>'
            + _table(["setting", "value"], rows, numeric_from=99, table_id="table-settings") + "</section>")


# --------------------------------------------------------------------------- γ sweep (objective.gamma "auto")

_STATE_LABEL = {"complete": "trained to the end", "pruned": "stopped early (successive halving)",
                "stopped": "stopped: budget or time", "not_run": "not run: budget or time"}


def _sweep_plot(trials: list[dict[str, Any]], pareto: list[float], chosen: float | None) -> str | None:
    """Clean vs robust validation accuracy of every trial, the Pareto front joined, the choice ringed."""
    points = [(t, _num(t.get("clean")), _num(t.get("robust"))) for t in trials]
    points = [(t, c, r) for t, c, r in points if c is not None and r is not None]
    if not points:
        return None
    fig, ax = _figure(6.4, 4.0)
    for state, marker, color in (("complete", "o", STUDENT_COLOR), ("pruned", "x", "#8c8c8c"),
                                 ("stopped", "s", "#8c8c8c")):
        sel = [(c, r, t) for t, c, r in points if t.get("state") == state]
        if sel:
            ax.scatter([100 * c for c, _, _ in sel], [100 * r for _, r, _ in sel], marker=marker, color=color,
                       label=_STATE_LABEL[state], zorder=3)
        for c, r, t in sel:
            ax.annotate(_mpl_text(f" γ={_g(t.get('gamma'))}"), (100 * c, 100 * r), fontsize=8)
    front = sorted((c, r) for t, c, r in points if t.get("state") == "complete" and _num(t.get("gamma")) in pareto)
    if front:
        ax.plot([100 * c for c, _ in front], [100 * r for _, r in front], color=STUDENT_COLOR, lw=1, ls="--",
                label="Pareto front")
    pick = [(c, r) for t, c, r in points if chosen is not None and _num(t.get("gamma")) == chosen
            and t.get("state") == "complete"]
    if pick:
        ax.scatter([100 * pick[0][0]], [100 * pick[0][1]], s=220, facecolors="none", edgecolors=TEACHER_COLOR,
                   lw=2, label="chosen", zorder=4)
    ax.set_xlabel("clean validation accuracy (%)")
    ax.set_ylabel("robust validation accuracy (%)")
    ax.set_title("γ sweep: the clean/robust trade-off")
    ax.legend(frameon=False, fontsize=8)
    return _png_img(fig, img_id="plot-gamma-sweep", alt="Clean versus robust validation accuracy of each γ tried, "
                    "with the Pareto front and the chosen γ")


def _verdict_note(verdict: dict[str, Any]) -> str:
    reasons = "".join(f"<li>{_e(r)}</li>" for r in _list(verdict.get("reasons")) if r)
    css = "flag ok" if verdict.get("transfers") else "flag bad"
    label = "TRANSFERS" if verdict.get("transfers") else "WILL NOT TRANSFER"
    return (f'<p id="transfer-verdict"><span class="{css}">{label}</span> {_e(verdict.get("summary", ""))}</p>'
            + (f"<ul>{reasons}</ul>" if reasons else ""))


def _sweep_section(sweep: dict[str, Any]) -> str:
    if not sweep:
        return ""
    trials = [_dict(t) for t in _list(sweep.get("trials"))]
    chosen, rule, cost = _dict(sweep.get("chosen")), _dict(sweep.get("rule")), _dict(sweep.get("cost"))
    transfer = _dict(sweep.get("transfer"))
    pareto = [v for v in (_num(g) for g in _list(sweep.get("pareto_gammas"))) if v is not None]
    rows = [[_e(_g(t.get("gamma"))) + (" (KD)" if _num(t.get("gamma")) == 0 else ""),
             _e(f"stopped: {t['stopped_by']}" if t.get("state") == "stopped" and str(t.get("stopped_by") or "")
                .startswith("training failed") else _STATE_LABEL.get(str(t.get("state")), t.get("state"))),
             "yes" if _num(t.get("gamma")) in pareto else "", _e(_pct(t.get("clean"))), _e(_pct(t.get("robust"))),
             _e(_fmt(t.get("epochs")))] for t in trials]
    plot = _sweep_plot(trials, pareto, _num(chosen.get("gamma"))) or ""
    val = _dict(sweep.get("validation"))
    plan = _dict(sweep.get("plan"))
    note = (f"Each γ trains the same initial student for up to {_e(plan.get('trial_epochs'))} epochs on the training "
            f"split less a held-out validation split ({_e(val.get('n'))} images, seeded and class-stratified, never the "
            f"test points); successive halving scores trials at epochs {_e(plan.get('rungs'))} with clean and "
            f"{_e(val.get('attack'))} accuracy at ε = {_e(_g(val.get('eps')))} and stops the weak ones. "
            f"Rule: {_e(rule.get('text', ''))}. The whole job cost {_e(_fmt(cost.get('job_runs'), 3))} training runs "
            f"(budget {_e(_fmt(cost.get('budget_runs'), 3))}).")
    stopped = cost.get("stopped_by")
    if stopped:
        note += f" The sweep stopped early: its {_e(stopped)} ran out."
    final = _dict(sweep.get("final_check"))
    final_note = ""
    if final.get("kd_reference_clean_accuracy") is not None:
        final_note = (f'<p class="note">On the test points: student {_e(_pct(final.get("student_clean_accuracy")))} '
                      f'clean, KD reference {_e(_pct(final.get("kd_reference_clean_accuracy")))}.</p>')
    return ('<section id="gamma-sweep"><h2>Choosing γ (gamma: "auto")</h2>'
            + _verdict_note(_dict(transfer.get("verdict")))
            + f'<p><b>Chosen: γ = {_e(_g(chosen.get("gamma")))}</b>. {_e(chosen.get("reason", ""))}</p>'
            + f'<p class="note">{note}</p>' + final_note + '<div class="row">' + plot
            + _table(["γ", "state", "Pareto", "clean (val)", "robust (val)", "epochs"], rows, numeric_from=3,
                     table_id="table-gamma-sweep") + "</div>" + _transfer_table(transfer) + "</section>")


def _transfer_table(transfer: dict[str, Any]) -> str:
    teacher = _dict(transfer.get("teacher"))
    capacity = _dict(_dict(transfer.get("verdict")).get("capacity"))
    if not teacher:
        return ""
    rows = [["teacher clean / robust accuracy (validation)",
             _e(f"{_pct(teacher.get('clean_accuracy'))} / {_pct(teacher.get('robust_accuracy'))}")],
            ["teacher local linearity γ_t(ε) (method.md §4)",
             _e(f"{_fmt(teacher.get('linearity'), 3)} (ln K = {_fmt(teacher.get('uniform_guess_loss'), 3)})")],
            ["teacher first-order term ε‖∇ℓ‖", _e(_fmt(teacher.get("first_order_term"), 3))],
            ["parameters: student / teacher",
             _e(f"{_count(capacity.get('student_params'))} / {_count(capacity.get('teacher_params'))}")],
            ["clean accuracy: KD student / teacher (validation)",
             _e(f"{_pct(capacity.get('kd_clean_accuracy'))} / {_pct(capacity.get('teacher_clean_accuracy'))}")]]
    return ("<h3>Will robustness transfer?</h3>"
            + _table(["measure", "value"], rows, table_id="table-transfer"))


# --------------------------------------------------------------------------- what the report describes


def _sha(value: Any) -> str:
    return f"<code>sha256 {_e(value)}</code>" if value else ""


def _about_rows(about: dict[str, Any]) -> list[list[str]]:
    job, dataset = _dict(about.get("job")), _dict(about.get("dataset"))
    rows = []
    if job:
        rows.append(["job", _e(" · ".join(str(x) for x in (job.get("name") or "(no name)", job.get("kind"),
                                                             job.get("id")) if x))])
    for role, m in _dict(about.get("models")).items():
        m = _dict(m)
        said = " · ".join(str(x) for x in (m.get("name"), m.get("arch"), f"{_count(m.get('params'))} parameters",
                                           m.get("id")) if x)
        rows.append([_e(role), _e(said) + (" " + _sha(m.get("sha256")) if m.get("sha256") else "")])
    if dataset:
        shape = "×".join(str(d) for d in _list(dataset.get("input_shape")))
        said = " · ".join(str(x) for x in (dataset.get("name"), f"{dataset.get('num_classes')} classes"
                                           if dataset.get("num_classes") else None, shape or None,
                                           f"{_fmt(dataset.get('size_bytes'))} bytes"
                                           if dataset.get("size_bytes") else None, dataset.get("id")) if x)
        rows.append(["dataset", _e(said) + (" " + _sha(dataset.get("sha256")) if dataset.get("sha256") else "")])
    rows.append(["made", _e(f"{about.get('generated_at', '?')} (UTC) by kdiga {about.get('service_version', '?')}")])
    return rows


def _about_section(about: dict[str, Any]) -> str:
    """Who and what: the job, each model (arch, parameters, sha256), the dataset, the date and version."""
    if not about:
        return ""
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in _about_rows(about))
    return f'<table class="about" id="about"><tbody>{rows}</tbody></table>'


_LEARNING_CHECKS = ("clean_accuracy_learned", "near_teacher_clean_accuracy", "near_kd_clean_accuracy")


def _warning(sanity: list[Any]) -> str:
    """Above the headline: the checks that say a model has not learned, so no number below flatters it."""
    failed = [_dict(c) for c in sanity if _dict(c).get("check") in _LEARNING_CHECKS and not _dict(c).get("ok")]
    if not failed:
        return ""
    items = "".join(f"<li>{_e(c.get('message', ''))}</li>" for c in failed)
    return (f'<div class="warning" id="warning"><b>Read the numbers below with care:</b><ul>{items}</ul>'
            "</div>")


# --------------------------------------------------------------------------- page


def render_report_html(report: dict[str, Any], title: str, context: dict[str, Any] | None = None) -> str:
    """A self-contained HTML page for a `kdiga.report/1` dict.

    Args:
        report: the `evaluate` output (docs/contracts.md); missing optional parts are skipped.
        title: the page title (escaped).
        context: settings to show (method, gamma, epochs, dataset, ...); nested dicts are flattened.

    Returns:
        The HTML document as a string; plots are inline base64 PNGs with ids `plot-eps-curve`,
        `plot-bound`, `plot-smoothing` and `plot-gamma-sweep` (each present only when its data is).
    """
    report = _dict(report)
    about = _dict(report.get("about"))
    if _dict(about.get("job")).get("name"):
        title = f"{title}: {about['job']['name']}"
    models = _dict(report.get("models"))
    roles = _roles(models)
    threat = _dict(report.get("threat_model"))
    sub_parts = []
    if threat:
        sub_parts.append(f"threat model {threat.get('norm', '?')}, ε = {_g(threat.get('eps'))}")
    if report.get("n_points") is not None:
        how = "stratified by class" if _dict(report.get("points")).get("method") == "stratified" else ""
        sub_parts.append(f"{report['n_points']} test points" + (f" ({how})" if how else ""))
    if roles and "teacher" not in roles:
        sub_parts.append(f"no teacher given: {roles[0]} only")
    if about.get("generated_at"):
        sub_parts.append(f"{about['generated_at']} UTC")
    body = [f"<h1>{_e(title)}</h1>", f'<p class="sub">{_e(" · ".join(sub_parts))}</p>', _about_section(about)]
    same_run = not _dict(report.get("teacher_evaluation")).get("cached")
    if not roles:
        body.append('<p class="note" id="empty">This report has no model results.</p>')
    else:
        names = _attack_names(models, roles)
        # the γ sweep's verdict right after the headline: whether robustness transferred, and why not
        body += [_warning(_list(report.get("sanity"))), _headline(models, roles, names, same_run), _sweep_section(_dict(report.get("gamma_sweep"))),
                 _eps_section(models, roles, threat),
                 _attack_section(models, roles, names), _alignment_section(_dict(report.get("alignment"))),
                 _smoothing_section(models, roles), _stats_section(models, roles, same_run)]
    body += [_sanity_section(_list(report.get("sanity"))), _settings_section(context, report)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
            f'<body><main>{"".join(b for b in body if b)}</main>'
            f'<footer class="note"><p>Schema {_e(report.get("schema", "unknown"))} · generated by kdiga</p></footer>'
            "</body></html>\n")
