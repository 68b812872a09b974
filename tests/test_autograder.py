"""The Gradescope autograder bundle of Lab 1a: its files, and run_autograder in a simulated
/autograder layout (setup.sh is only checked, not run: the venv already has everything)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from labkit import autograder

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "01a-attention-and-gpt.ipynb"
LAB_NAME = "01a-attention-and-gpt.ipynb"
FULL, VISIBLE, HIDDEN = 17, 14, 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("autograder")
    assert autograder.main(["--lab", "01a", "--out", str(out)]) == 0
    return out / "01a", out / "autograder-01a.zip"


def run_autograder(bundle: Path, root: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the bundle's run_autograder on ``root`` (submission/ already filled) as Gradescope would."""
    (root / "results").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": sys.executable}
    env.pop("AUTOGRADER_BUNDLE", None)
    run = subprocess.run([str(bundle / "run_autograder")], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    results = root / "results" / "results.json"
    assert results.exists(), f"no results.json\nstdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
    return run, json.loads(results.read_text())


def gradescope_root(tmp_path_factory, name: str, notebooks: dict[str, str]) -> Path:
    root = tmp_path_factory.mktemp(name)
    (root / "submission").mkdir()
    for filename, text in notebooks.items():
        (root / "submission" / filename).write_text(text)
    return root


# ---------------------------------------------------------------- the bundle's files
def test_bundle_files(built):
    bundle, archive = built
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert {"setup.sh", "run_autograder", "README.md", "requirements-grading.txt", "requirements-nodeps.txt",
            f"labs/{LAB_NAME}", "hidden_checks/lab01a.py", "hidden_checks/README.md", "fallback-results.json",
            "source/pyproject.toml", "source/README.md", "source/labkit/grade.py",
            "source/labkit/checks/lab01a.py", "source/labkit/autograder.py"} <= files
    assert [p.name for p in (bundle / "labs").iterdir()] == [LAB_NAME]  # only this lab's notebook
    assert not any("solutions" in f or "__pycache__" in f for f in files)
    assert (bundle / f"labs/{LAB_NAME}").read_bytes() == (ROOT / "labs" / LAB_NAME).read_bytes()
    for script in ("setup.sh", "run_autograder"):
        assert (bundle / script).stat().st_mode & stat.S_IXUSR

    # The zip has setup.sh and run_autograder at its root, executable, and the same files.
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        assert names == files
        for script in ("setup.sh", "run_autograder"):
            assert (zf.getinfo(script).external_attr >> 16) & stat.S_IXUSR

    # The pinned requirements come from requirements.txt; torch is not among them.
    pinned = (bundle / "requirements-grading.txt").read_text()
    course = (ROOT / "requirements.txt").read_text().splitlines()
    for package in ("nbval", "pytest", "pytest-timeout", "nbformat", "nbclient", "ipykernel", "numpy",
                    "matplotlib", "tqdm", "ipywidgets"):
        line = next(line for line in course if line.startswith(f"{package}=="))
        assert line in pinned.splitlines(), line
    assert "pyyaml" in pinned
    assert "torch" not in [line.split("==")[0] for line in pinned.splitlines()]


def test_setup_sh(built):
    bundle, _ = built
    assert subprocess.run(["bash", "-n", str(bundle / "setup.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(bundle / "run_autograder")]).returncode == 0
    setup = (bundle / "setup.sh").read_text()
    assert 'PIP=("$VENV/bin/python" -m pip install' in setup
    torch_lines = [line for line in setup.splitlines() if "torch==" in line and not line.lstrip().startswith("#")]
    assert torch_lines == ['"${PIP[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'], torch_lines
    for needed in ("requirements-grading.txt", "--no-deps -r \"$BUNDLE/requirements-nodeps.txt\"",
                   "--no-deps \"$BUNDLE/source\"", "apt-get install", "util-linux", "iproute2", "sandbox: none"):
        assert needed in setup, needed


def test_bundled_source_installs_every_labkit_package(built, tmp_path):
    """pip install --no-deps of source/ (as setup.sh does) installs labkit.checks too."""
    pytest.importorskip("setuptools")
    bundle, _ = built
    source, target = tmp_path / "source", tmp_path / "site"
    shutil.copytree(bundle / "source", source)  # the build writes into its source folder: not the bundle's
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--disable-pip-version-check", "-q", "--target", str(target), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for module in ("__init__.py", "grade.py", "autograder.py", "checks/__init__.py", "checks/lab01a.py"):
        assert (target / "labkit" / module).exists(), module


# ---------------------------------------------------------------- run_autograder, as on Gradescope
def test_solution_scores_full_marks(built, tmp_path_factory):
    bundle, _ = built
    root = gradescope_root(tmp_path_factory, "gs-solution", {"my lab.ipynb": SOLUTION.read_text()})
    run, results = run_autograder(bundle, root)
    assert run.returncode == 0, run.stderr[-3000:]
    failed = {t["name"]: t["output"][:200] for t in results["tests"] if t["score"] < t["max_score"]}
    assert results["score"] == FULL, f"{results['score']} != {FULL}: {failed}\n{run.stdout[-3000:]}"
    assert sum(t["max_score"] for t in results["tests"] if t["visibility"] == "visible") == VISIBLE
    assert sum(t["max_score"] for t in results["tests"] if t["visibility"] == "after_published") == HIDDEN
    assert results["output"].startswith("sandbox: ")
    assert results["labkit"]["submission"] == "my lab"


def test_hidden_checks_and_submission_are_masked_from_the_kernel(built, tmp_path_factory):
    """The blank lab plus a cell, before the causal-mask check, whose causal_mask is right only if
    the kernel cannot list the bundle's hidden_checks/, the submission folder or the repository's
    hidden_checks/. (The blank lab is fast to grade: its other cells fail at once.)"""
    bundle, _ = built
    root = tmp_path_factory.mktemp("gs-snoop")
    (root / "submission").mkdir()
    watched = [str(bundle / "hidden_checks"), str(root / "submission"), str(ROOT / "hidden_checks")]
    notebook = nbformat.read(ROOT / "labs" / LAB_NAME, as_version=4)
    at = next(i for i, c in enumerate(notebook.cells) if c.metadata.get("check", {}).get("id") == "01a.causal_mask")
    notebook.cells.insert(at, nbformat.v4.new_code_cell(
        "import os\n"
        f"_seen = [p for p in {watched!r} if os.path.isdir(p) and os.listdir(p)]\n"
        "def causal_mask(T):\n"
        "    if _seen:\n"
        "        raise RuntimeError(f'the kernel could read {_seen}')\n"
        "    return torch.ones(T, T, dtype=torch.bool).tril()"))
    nbformat.write(notebook, root / "submission" / "snoop.ipynb")
    run, results = run_autograder(bundle, root)
    if not results["labkit"]["sandbox"].startswith("unshare"):
        pytest.skip(f"no sandbox here ({results['labkit']['sandbox']}): the folders cannot be masked")
    scores = {t["name"]: t for t in results["tests"]}
    mask = scores["01a.causal_mask"]
    assert mask["score"] == mask["max_score"], f"{mask['output']}\n{run.stdout[-3000:]}"
    assert results["score"] == mask["score"]  # the blank lab's other checks fail, as they should


@pytest.mark.parametrize("files, message", [
    ({}, "No notebook was submitted"),
    ({"notes.txt": "hello"}, "No notebook (.ipynb) at the top of the submission (found: notes.txt)"),
    ({"a.ipynb": "{}", "b.ipynb": "{}"}, "2 notebooks were submitted (a.ipynb, b.ipynb)"),
])
def test_no_single_notebook_scores_zero_with_a_message(built, tmp_path_factory, files, message):
    bundle, _ = built
    root = gradescope_root(tmp_path_factory, "gs-bad", files)
    run, results = run_autograder(bundle, root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert results["score"] == 0
    assert message in results["output"], results["output"]
    # Every check is listed with its points, failed, so Gradescope shows the assignment's total.
    assert sum(t["max_score"] for t in results["tests"]) == FULL
    assert all(t["score"] == 0 and message in t["output"] for t in results["tests"])


def test_results_json_even_if_python_is_broken(built, tmp_path_factory):
    bundle, _ = built
    root = gradescope_root(tmp_path_factory, "gs-nopython", {"lab.ipynb": SOLUTION.read_text()})
    (root / "results").mkdir()
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": "/nonexistent/python3"}
    run = subprocess.run([str(bundle / "run_autograder")], env=env, capture_output=True, text=True, timeout=60)
    results = json.loads((root / "results" / "results.json").read_text())
    assert results["score"] == 0 and "tell the course staff" in results["output"], run.stderr[-2000:]
    assert results == json.loads((bundle / "fallback-results.json").read_text())


def test_make_target_is_declared():
    makefile = (ROOT / "Makefile").read_text()
    assert "\nautograder:" in makefile and "labkit.autograder" in makefile
    phony = next(line for line in makefile.splitlines() if line.startswith(".PHONY"))
    assert "autograder" in phony.split()


def test_unknown_lab_is_refused(tmp_path, capsys):
    assert autograder.main(["--lab", "99z", "--out", str(tmp_path)]) == 2
    assert "no lab '99z'" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
