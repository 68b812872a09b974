"""Every lab is gradable: its solution earns full marks and its blank lab earns 0, without a crash.
(Lab 1a, the pattern, is graded against the whole adversarial suite in test_grade.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit.grade import hidden_checks

ROOT = Path(__file__).resolve().parent.parent
LABS = {nbformat.read(p, as_version=4).metadata["labkit"]["lab"]: p for p in sorted((ROOT / "labs").glob("*.ipynb"))}


@pytest.mark.parametrize("lab", sorted(set(LABS) - {"01a"}))
def test_solution_full_marks_and_blank_lab_zero(lab, tmp_path):
    lab_path = LABS[lab]
    full = sum(c.metadata["check"]["points"] for c in nbformat.read(lab_path, as_version=4).cells
               if "check" in c.metadata) + sum(h.points for h in hidden_checks(lab, None))
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "solution.ipynb").write_text((ROOT / "solutions" / lab_path.name).read_text())
    (submissions / "blank.ipynb").write_text(lab_path.read_text())
    run = subprocess.run([sys.executable, "-m", "labkit.grade", str(submissions), "--lab", lab,
                          "--out", str(tmp_path / "out"), "--workers", "2"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    scores = {name: json.loads((tmp_path / "out" / name / "results.json").read_text()) for name in ("solution", "blank")}
    failed = [(t["name"], t["output"][:200]) for t in scores["solution"]["tests"] if t["score"] < t["max_score"]]
    assert scores["solution"]["score"] == full, failed
    assert scores["blank"]["score"] == 0
