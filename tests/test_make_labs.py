"""Labs are generated from the solutions: in sync, with stubs, and with nothing of the solutions left."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest

from labkit import make_labs

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_committed_labs_are_up_to_date():
    assert make_labs.main(["--check"]) == 0, "run `python -m labkit.make_labs` and commit the labs"


def test_check_mode_detects_a_stale_lab(tmp_path):
    for name in ("_config.yml", "solutions", "labs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    solution = next((tmp_path / "solutions").glob("*.ipynb"))
    notebook = nbformat.read(solution, as_version=4)
    notebook.cells[0].source += "\n\nA new sentence."
    nbformat.write(notebook, solution)
    assert make_labs.main(["--check", "--root", str(tmp_path)]) == 1
    assert make_labs.main(["--root", str(tmp_path)]) == 0
    assert make_labs.main(["--check", "--root", str(tmp_path)]) == 0


def test_stub_keeps_indentation_and_hint():
    source = "def f(x):\n    # BEGIN SOLUTION: square it\n    return x * x\n    # END SOLUTION\n"
    assert make_labs.strip_solutions(source) == "def f(x):\n    raise NotImplementedError('square it')"


def test_a_long_hint_becomes_comments_above_a_short_raise():
    hint = "scores = q @ k^T / sqrt(d); " * 8
    lines = make_labs.strip_solutions(f"def f(x):\n    # BEGIN SOLUTION: {hint}\n    return x\n    # END SOLUTION").splitlines()
    assert lines[1].startswith("    # Hint: scores") and lines[-1] == '    raise NotImplementedError("see the hint above")'
    assert all(len(line) <= make_labs.MAX_LINE for line in lines)
    assert " ".join(line.strip(" #") for line in lines[1:-1]).removeprefix("Hint: ") == hint.strip()


@pytest.mark.parametrize("solution_path", SOLUTIONS, ids=lambda p: p.stem)
def test_no_line_of_a_lab_is_too_long(solution_path):
    lab = nbformat.read(ROOT / "labs" / solution_path.name, as_version=4)
    long = [line for c in lab.cells if c.cell_type == "code" for line in c.source.splitlines()
            if len(line) > make_labs.MAX_LINE]
    assert not long, f"{len(long)} code lines longer than {make_labs.MAX_LINE} characters, e.g. {long[:3]}"


@pytest.mark.parametrize("source", ["# BEGIN SOLUTION\nx = 1", "x = 1\n# END SOLUTION",
                                    "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION"])
def test_unbalanced_markers_are_errors(source):
    with pytest.raises(ValueError):
        make_labs.strip_solutions(source)


@pytest.mark.parametrize("solution_path", SOLUTIONS, ids=lambda p: p.stem)
def test_lab_keeps_no_outputs_and_no_solution_code(solution_path):
    solution = nbformat.read(solution_path, as_version=4)
    lab = nbformat.read(ROOT / "labs" / solution_path.name, as_version=4)
    lab_code = "\n".join(c.source for c in lab.cells if c.cell_type == "code")
    lab_code_without_hints = "\n".join(line for line in lab_code.splitlines()
                                       if "NotImplementedError" not in line and not line.strip().startswith("#"))
    assert all(not c.outputs and c.execution_count is None for c in lab.cells if c.cell_type == "code")
    assert "widgets" not in lab.metadata
    regions = re.findall(r"# BEGIN SOLUTION.*?\n(.*?)# END SOLUTION", "\n".join(
        c.source for c in solution.cells if c.cell_type == "code"), flags=re.S)
    assert regions, "a solution notebook without solution regions"
    for region in regions:
        for line in region.splitlines():
            if len(line.strip()) > 25 and not line.strip().startswith("#"):
                assert line.strip() not in lab_code_without_hints, f"solution line leaked into the lab: {line.strip()}"
    assert lab_code.count("raise NotImplementedError") == len(regions)


@pytest.mark.parametrize("solution_path", SOLUTIONS, ids=lambda p: p.stem)
def test_check_cells_keep_ids_and_metadata(solution_path):
    solution = nbformat.read(solution_path, as_version=4)
    lab = nbformat.read(ROOT / "labs" / solution_path.name, as_version=4)
    solution_checks = [(c.id, c.source, c.metadata["check"]) for c in solution.cells if "check" in c.metadata]
    lab_checks = [(c.id, c.source, c.metadata["check"]) for c in lab.cells if "check" in c.metadata]
    assert solution_checks and solution_checks == lab_checks
    for _, source, meta in lab_checks:
        assert source.startswith("# NBVAL_CHECK_OUTPUT\n") and f'labkit.check("{meta["id"]}"' in source
        assert meta["points"] > 0


@pytest.mark.parametrize("solution_path", SOLUTIONS, ids=lambda p: p.stem)
def test_setup_cell_installs_from_the_configured_repository(solution_path):
    url, ref = make_labs.course_repository()
    for path in (solution_path, ROOT / "labs" / solution_path.name):
        notebook = nbformat.read(path, as_version=4)
        setup = [c for c in notebook.cells if "setup" in c.metadata.get("tags", [])]
        assert len(setup) == 1 and notebook.cells.index(setup[0]) <= 2, f"{path.name}: one set-up cell, at the top"
        source = setup[0].source
        assert f'COURSE_REPO = "{url}"\nCOURSE_REF = "{ref}"' in source
        assert "check_call" in source and "google.colab" in source
        assert "torch" not in source.split("import torch")[0].replace("(never torch)", ""), "never installs torch"
