"""The grader on Lab 1a: full marks for the solution, 0 for the blank lab, and no false pass
or grader crash on broken, looping or tampered submissions (all graded in one batch)."""
from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "01a-attention-and-gpt.ipynb"
LAB = ROOT / "labs" / "01a-attention-and-gpt.ipynb"
FULL = 17  # 14 visible points + 3 hidden


def solution() -> nbformat.NotebookNode:
    return nbformat.read(SOLUTION, as_version=4)


def code_cell(notebook, text: str) -> nbformat.NotebookNode:
    return next(c for c in notebook.cells if c.cell_type == "code" and text in c.source)


def check_cell(notebook, check_id: str) -> nbformat.NotebookNode:
    return next(c for c in notebook.cells if c.metadata.get("check", {}).get("id") == check_id)


def unscaled(notebook):
    """A wrong solution: attention without the 1/sqrt(d)."""
    cell = code_cell(notebook, "def scaled_dot_product_attention")
    cell.source = cell.source.replace(" / math.sqrt(d)", "")
    return notebook


def insert_after_setup(notebook, source: str):
    index = next(i for i, c in enumerate(notebook.cells) if "setup" in c.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return notebook


def append(notebook, source: str):
    notebook.cells.append(nbformat.v4.new_code_cell(source))
    return notebook


def edited_to_pass(notebook, check_id="01a.sdpa"):
    check_cell(notebook, check_id).source = "pass"
    return notebook


def deleted_check(notebook, check_id="01a.sdpa"):
    notebook.cells.remove(check_cell(notebook, check_id))
    return notebook


def fresh_ids_no_metadata(notebook):
    """As a notebook tool that drops metadata and renumbers cells might save it."""
    for cell in notebook.cells:
        cell.id = uuid.uuid4().hex[:8]
        cell.metadata = {}
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    return notebook


MONKEYPATCH = """
import numpy, torch
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
numpy.allclose = lambda *a, **k: True
numpy.testing.assert_allclose = lambda *a, **k: None
import labkit.checks
labkit.checks.compare = labkit.checks.core.compare = lambda *a, **k: None
"""

SNOOP = """
import glob, os, pathlib, labkit
repo = pathlib.Path(labkit.__file__).resolve().parent.parent
seen = {}
for pattern in ("*.ipynb", "**/*.ipynb", "/tmp/**/*.ipynb", "/dev/shm/**/*.ipynb", str(repo / "**" / "*.ipynb"),
                str(repo / "hidden_checks" / "*"), str(repo / "solutions" / "*")):
    for path in glob.glob(pattern, recursive=True):
        try:
            seen[path] = pathlib.Path(path).read_text(errors="replace")
        except OSError:
            pass
hidden = [p for p, text in seen.items() if "sdpa_shapes_verify" in text or "Hidden check" in text]
solutions = [p for p, text in seen.items() if "# BEGIN SOLUTION" in text]
raise RuntimeError(f"SNOOP hidden={len(hidden)} solutions={len(solutions)} files={len(seen)}")
"""

# The grading test listens on this port on the host's loopback; a sandboxed kernel must not reach it.
LISTENER = socket.create_server(("127.0.0.1", 0))
NETWORK = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {LISTENER.getsockname()[1]}), timeout=3).close()
    reached = True
except OSError:
    reached = False
raise RuntimeError(f"NET reached={{reached}}")
"""

HIDDEN_EDGE = "d = v.shape[-1]"  # scales by the values' width: right when d_v = d_k, as in every visible check

# name -> (a notebook or raw text, the expected score: a number, a set of allowed numbers, or "<" for
# "less than full"). A scratch cell that loops, allocates or prints too much costs nothing by itself:
# the checks after it still run (nbval interrupts the loop), so a correct solution keeps its marks.
CASES = {
    "01_blank_lab": (lambda: nbformat.read(LAB, as_version=4), 0),
    "02_correct": (solution, FULL),
    "03_correct_check_edited_to_pass": (lambda: edited_to_pass(solution()), FULL),
    "04_wrong_check_edited_to_pass": (lambda: edited_to_pass(unscaled(solution())), "<"),
    "05_wrong_check_deleted": (lambda: deleted_check(unscaled(solution())), "<"),
    "06_wrong_with_monkeypatched_comparisons": (lambda: insert_after_setup(unscaled(solution()), MONKEYPATCH), "<"),
    "07_snoops_for_hidden_checks": (lambda: insert_after_setup(solution(), SNOOP), FULL),
    "08_infinite_loop": (lambda: insert_after_setup(solution(), "while True:\n    pass"), FULL),
    "09_loop_ignoring_sigint": (lambda: insert_after_setup(
        solution(), "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"), 0),
    # In the sandbox the parent is PID 1 of its namespace and survives; unsandboxed, the run stops
    # there and the hidden checks after it score 0. Both are honest results.
    "10_kills_its_parent": (lambda: append(solution(), "import os\nos.kill(os.getppid(), 9)"), {FULL, FULL - 3}),
    "11_allocates_50GB": (lambda: insert_after_setup(
        solution(), "import torch\nx = torch.empty(50 * 2**30, dtype=torch.uint8)\nx.fill_(1)"), FULL),
    "12_prints_100MB": (lambda: insert_after_setup(solution(), "print('x' * 100_000_000)"), FULL),
    "13_invalid_json": (lambda: '{"cells": [', 0),
    "14_notebook_of_another_lab": (lambda: _other_lab(), 0),
    "15_fails_a_hidden_edge_case": (lambda: _hidden_edge(), FULL - 1),
    "16_fresh_ids_no_metadata": (lambda: fresh_ids_no_metadata(solution()), FULL),
    "17_reaches_for_the_network": (lambda: insert_after_setup(solution(), NETWORK), FULL),
}


def _other_lab():
    notebook = solution()
    notebook.metadata["labkit"] = {"lab": "02"}
    return notebook


def _hidden_edge():
    notebook = solution()
    cell = code_cell(notebook, "def scaled_dot_product_attention")
    cell.source = cell.source.replace("d = q.shape[-1]", HIDDEN_EDGE)
    return notebook


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    for name, (make, _) in CASES.items():
        made = make()
        text = made if isinstance(made, str) else nbformat.writes(made)
        (folder / f"{name}.ipynb").write_text(text)
    out = tmp_path_factory.mktemp("reports")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "labkit.grade", str(folder), "--lab", "01a", "--out", str(out),
                          "--workers", "2", "--cell-timeout", "40", "--timeout", "240", "--memory-gb", "6"],
                         capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - start
    results = {name: json.loads((out / name / "results.json").read_text()) for name in CASES}
    return run, results, out, seconds


def test_grader_finishes_and_prints_the_summary(graded):
    run, _, _, seconds = graded
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.endswith("failed") and " passed, " in last
    print(f"graded {len(CASES)} submissions in {seconds:.0f} s")


@pytest.mark.parametrize("name", CASES)
def test_expected_score(graded, name):
    _, results, _, _ = graded
    result, expected = results[name], CASES[name][1]
    assert sum(t["max_score"] for t in result["tests"]) == FULL
    summary = {t["name"]: t["output"][:100] for t in result["tests"] if t["score"] < t["max_score"]}
    if expected == "<":
        assert result["score"] < FULL, f"false pass: {name} scored {result['score']}"
        assert result["score"] < FULL - 1
    elif isinstance(expected, set):
        assert result["score"] in expected, f"{name}: {result['score']} not in {expected}; failed: {summary}"
    else:
        assert result["score"] == expected, f"{name}: {result['score']} != {expected}; failed: {summary}"


def test_gradescope_format(graded):
    _, results, _, _ = graded
    for result in results.values():
        assert set(result) >= {"score", "tests", "output"}
        for test in result["tests"]:
            assert set(test) >= {"name", "score", "max_score", "output", "visibility"}
            assert test["visibility"] in ("visible", "after_published")


def test_reasons_are_clear(graded):
    _, results, _, _ = graded
    assert "not a readable JSON notebook" in results["13_invalid_json"]["output"]
    assert "notebook of lab 02, not of lab 01a" in results["14_notebook_of_another_lab"]["output"]
    blank = {t["name"]: t["output"] for t in results["01_blank_lab"]["tests"]}
    assert "NotImplementedError" in blank["01a.sdpa"]
    looping = {t["name"]: t["output"] for t in results["09_loop_ignoring_sigint"]["tests"]}
    assert "timed out" in looping["01a.sdpa"]
    wrong = {t["name"]: t["output"] for t in results["06_wrong_with_monkeypatched_comparisons"]["tests"]}
    assert "NO 1/sqrt(d) scaling" in wrong["01a.sdpa"]
    hidden = {t["name"]: t for t in results["15_fails_a_hidden_edge_case"]["tests"]}
    assert hidden["01a.hidden.sdpa_shapes"]["score"] == 0 and hidden["01a.hidden.sdpa_shapes"]["visibility"] == "after_published"


def test_a_timed_out_cell_is_reported(graded):
    _, _, out, _ = graded
    assert "Timeout of 40 seconds exceeded" in (out / "08_infinite_loop" / "log.txt").read_text()


def test_no_network_in_the_sandbox(graded):
    _, _, out, _ = graded
    log = (out / "17_reaches_for_the_network" / "log.txt").read_text()
    assert "NET reached=False" in log, log[-2000:]


def test_memory_is_capped(graded):
    _, _, out, _ = graded
    assert "can't allocate memory" in (out / "11_allocates_50GB" / "log.txt").read_text()


def test_snooping_finds_neither_hidden_checks_nor_solutions(graded):
    _, results, out, _ = graded
    log = (out / "07_snoops_for_hidden_checks" / "log.txt").read_text()
    assert "SNOOP hidden=0 solutions=0" in log, log[-2000:]
    assert results["07_snoops_for_hidden_checks"]["labkit"]["sandbox"].startswith("unshare")


def test_scores_csv(graded):
    _, _, out, _ = graded
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert {r["submission"] for r in rows} == set(CASES)
    correct = next(r for r in rows if r["submission"] == "02_correct")
    assert float(correct["total"]) == FULL and float(correct["01a.sdpa"]) == 2
