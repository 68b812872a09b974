"""The scaffold writes a lab with the course's anatomy whose example check, hidden check and planted bug work."""
from __future__ import annotations

import importlib.util
import shutil
import sys

import nbformat
import pytest
import yaml

from labkit import make_labs, new_lab
from labkit.checks import hidden_checks
from notebook_code import ROOT


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def root(tmp_path, monkeypatch):
    for name in ("_toc.yml", "_config.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("solutions", "labkit/checks", "hidden_checks", "tests"):
        (tmp_path / folder).mkdir(parents=True)
    assert new_lab.main(["99", "an-example-lab", "An Example Lab", "--root", str(tmp_path)]) == 0
    yield tmp_path
    for name in ("labkit.checks.lab99", "buggy_lab99"):
        sys.modules.pop(name, None)


def test_master_has_the_course_anatomy(root):
    master = nbformat.read(root / "solutions" / "99-an-example-lab.ipynb", as_version=4)
    assert master.metadata["labkit"] == {"lab": "99"}
    sources = [c.source for c in master.cells]
    assert sources[0].startswith("# Lab 99: An Example Lab\n\n**Goals.**")
    assert "solution-only" in master.cells[1].metadata["tags"] and "setup" in master.cells[2].metadata["tags"]
    assert any(s.startswith("## 1. ") for s in sources) and any(s.startswith("## Experiment 1") for s in sources)
    assert sources[-1].startswith("## Questions")
    checks = [c.metadata["check"] for c in master.cells if "check" in c.metadata]
    assert checks == [{"id": "99.example", "points": 1}]
    lab = make_labs.make_lab(master)
    assert any('raise NotImplementedError' in c.source for c in lab.cells) and len(lab.cells) == len(master.cells) - 1


def test_toc_lists_the_lab_and_its_solution(root):
    parts = {p["caption"]: [c["file"] for c in p["chapters"]] for p in yaml.safe_load((root / "_toc.yml").read_text())["parts"]}
    assert parts["Labs"][-1] == "labs/99-an-example-lab" and parts["Solutions"][-1] == "solutions/99-an-example-lab"


def test_example_check_hidden_check_and_planted_bug_work(root, capsys):
    checks = load(root / "labkit" / "checks" / "lab99.py", "labkit.checks.lab99")
    buggy = load(root / "tests" / "buggy_lab99.py", "buggy_lab99")
    namespace = {"torch": __import__("torch")}
    exec(new_lab.EXERCISE, namespace)
    inputs = checks.example.make_inputs(0)
    assert checks.example.verdict(inputs, checks.example.run_collect(inputs, namespace["example"])) == \
        "✔ 99.example: returns its input"
    for bug, message in buggy.BUGS["99.example"]:
        with pytest.raises(AssertionError, match=message):
            checks.example.verify(inputs, checks.example.run_collect(inputs, bug(namespace)))
    (hidden,) = hidden_checks("99", root / "hidden_checks")
    inputs = hidden.make_inputs(1)
    assert hidden.verdict(inputs, hidden.run_collect(inputs, namespace["example"])).startswith("✔ 99.hidden.example_edge")


def test_never_overwrites(root):
    with pytest.raises(FileExistsError):
        new_lab.scaffold("99", "an-example-lab", "An Example Lab", root)
