"""The README's digits flow with every setting defaulted (`kdiga_core.defaults`), seed by seed.

A PGD-AT `cnn_medium` teacher (`adversarial_train`, nothing but the architecture given), then a
KDIGA `cnn_small` student of it (`distill`, γ "auto"), both through `kdiga_core.jobs.run_job`, the
service's own job function; prints clean and PGD accuracy and wall seconds (REPRODUCTION.md,
"Defaults sized to the data"; tests/e2e/test_readme_examples.py takes its floors from them).

    python -m benchmarks.defaults_digits --seeds 0,1,2 --out runs/defaults.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from kdiga_core.jobs import JobInputs, ModelInput, run_job

DATASET = {"kind": "digits", "path": None, "meta": {}}


def one_seed(seed: int, root: Path, norm: str | None = None) -> dict:
    threat = {"norm": norm} if norm else {}
    started = time.monotonic()
    teacher = run_job("adversarial_train", {"student": {"arch": "cnn_medium"}, "train": {"seed": seed},
                                            "threat_model": threat},
                      root / f"t{seed}", JobInputs(dataset=DATASET))
    t_s = time.monotonic() - started
    weights = next(a["path"] for a in teacher["artifacts"] if a["kind"] == "model_weights")
    started = time.monotonic()
    student = run_job("distill", {"student": {"arch": "cnn_small"}, "train": {"seed": seed}, "threat_model": threat},
                      root / f"s{seed}", JobInputs(dataset=DATASET, teacher=ModelInput(Path(weights),
                                                                                      teacher["model_spec"])))
    s_s = time.monotonic() - started
    tm, sm = teacher["metrics"], student["metrics"]
    key = next(k for k in sm if k.startswith("student_pgd") and k.endswith("_accuracy"))
    tkey = next(k for k in tm if k.startswith("student_pgd") and k.endswith("_accuracy"))
    return {"seed": seed, "norm": norm or "Linf", "teacher_clean": tm["student_clean_accuracy"], "teacher_pgd": tm[tkey],
            "student_clean": sm["student_clean_accuracy"], "student_pgd": sm[key],
            "gamma": student["report"].get("gamma_sweep", {}).get("chosen", {}).get("gamma"),
            "skipped": [s["attack"] for s in student["report"].get("skipped_attacks", [])],
            "teacher_s": round(t_s, 1), "student_s": round(s_s, 1), "load": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--norm", default=None, help="Linf (default) or L2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(one_seed(seed, Path(tmp), args.norm))
            print(json.dumps(rows[-1]), flush=True)
    summary = {k: (statistics.mean(r[k] for r in rows), statistics.pstdev(r[k] for r in rows))
               for k in ("teacher_clean", "teacher_pgd", "student_clean", "student_pgd", "teacher_s", "student_s")}
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "mean_std": summary}, indent=2))


if __name__ == "__main__":
    main()
