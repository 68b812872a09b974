"""Scaffold a new lab with the course's anatomy.

    python -m labkit.new_lab 06 long-context "Sparse and long-context attention"

writes, and never overwrites:

- ``solutions/06-long-context.ipynb``, the master: title and goals, the solution-only note,
  the set-up cell, imports, one section (explanation, exercise, check), ``## Experiment 1`` and
  ``## Questions``;
- ``labkit/checks/lab06.py``: one working check, a case table against a reference;
- ``hidden_checks/lab06.py``: one hidden check, a variant of it on edge cases;
- ``tests/buggy_lab06.py``: one planted bug, which the check must catch;

and adds the lab and its solution to ``_toc.yml``. Then replace the example by the lab's content,
run the master (``python -m labkit.bench --write solutions/...``) and generate the lab
(``python -m labkit.make_labs``). CONTRIBUTING.md describes each part.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

from labkit.make_labs import setup_source

ROOT = Path(__file__).resolve().parent.parent

GOALS = """# Lab {number}: {title}

**Goals.** By the end of this lab you will have:

1. written `example`, the first part of {title_lower}, and checked it against an independent reference;
2. measured what it changes, in Experiment 1.

Read Chapter {chapter} first. The lab runs in about a minute on a laptop CPU, and on a GPU too."""

SOLUTION_NOTE = ("**Solution notebook.** This is the course's reference solution, with its outputs. "
                 "The lab that students fill in is generated from it.")

IMPORTS = """import math
import time

import matplotlib.pyplot as plt
import torch.nn as nn
import torch.nn.functional as F

import labkit.nn
from labkit.train import train

labkit.seed_everything(0)
LONG_RUN = False  # True: the longer run of Experiment 1 (say what it gives, measured, in the text)"""

SECTION = """## 1. The first part

Explain what the code implements: the motivation in one paragraph, then the equation, with the
symbols that the code uses as variable names, for example $y = x$."""

EXERCISE = '''def example(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): the example's output. Name every argument's shape and dtype here."""
    # BEGIN SOLUTION: return x unchanged
    return x
    # END SOLUTION'''

EXPERIMENT = """## Experiment 1: what it changes

Say what the experiment measures and why, then what it shows, next to the figure."""

EXPERIMENT_CODE = """start = time.perf_counter()
x = torch.randn(4, 8, device=device)
labkit.report("example: max |example(x) - x|", (example(x) - x).abs().max().item())
print(f"done in {time.perf_counter() - start:.2f} s")"""

QUESTIONS = """## Questions

1. What did Experiment 1 measure, and what would change if ...?
2. Which part of your code would you change to ..., and what would you expect to see?"""

CHECKS = '''"""Checks of Lab {number}: {title}.

References: name each independent reference here (a PyTorch built-in, a production
implementation, a closed-form property or a published number), never the course's solution.
"""
from __future__ import annotations

import torch

from labkit.checks import table


def example_cases(g: torch.Generator) -> list[dict]:
    return [{{"what": f"example(x) on x of shape {{shape}}", "args": [torch.randn(*shape, generator=g)]}}
            for shape in ((2, 3), (4, 1, 5))]


example = table("{lab}.example", example_cases, lambda case: case["args"][0].double(), "returns its input",
                hint="return x unchanged")
'''

HIDDEN = '''"""Hidden checks of Lab {number}: the same API on other inputs and edge cases (see README.md)."""
from __future__ import annotations

import torch

from labkit.checks import table_inputs
from labkit.checks.lab{lab} import example


def example_edge_cases(g: torch.Generator) -> list[dict]:
    return [{{"what": "example(x) on a single number", "args": [torch.randn(1, generator=g)]}}]


example_edge = example.variant("{lab}.hidden.example_edge", table_inputs(example_edge_cases), ("example",))
'''

BUGGY = '''"""Plausible wrong implementations of Lab {number}, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations


def example_negates(ns):
    return lambda x: -x  # BUG: negates its input


# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {{
    "{lab}.example": [(example_negates, r"example\\(x\\) on x of shape \\(2, 3\\): max \\|difference\\|")],
}}
'''


def lab_number(lab: str) -> str:
    """"05" -> "5", "01a" -> "1a": how the book names a lab."""
    return lab.lstrip("0") or "0"


def master_notebook(lab: str, title: str) -> nbformat.NotebookNode:
    number = lab_number(lab)
    cells = [nbformat.v4.new_markdown_cell(GOALS.format(number=number, title=title, title_lower=title.lower(),
                                                        chapter=re.sub(r"\D", "", number))),
             nbformat.v4.new_markdown_cell(SOLUTION_NOTE, metadata={"tags": ["solution-only"]}),
             nbformat.v4.new_code_cell(setup_source(), metadata={"tags": ["setup"]}),
             nbformat.v4.new_code_cell(IMPORTS),
             nbformat.v4.new_markdown_cell(SECTION),
             nbformat.v4.new_code_cell(EXERCISE),
             nbformat.v4.new_code_cell(f'# NBVAL_CHECK_OUTPUT\nlabkit.check("{lab}.example", example)',
                                       metadata={"tags": ["check"], "check": {"id": f"{lab}.example", "points": 1}}),
             nbformat.v4.new_markdown_cell(EXPERIMENT),
             nbformat.v4.new_code_cell(EXPERIMENT_CODE),
             nbformat.v4.new_markdown_cell(QUESTIONS)]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}, "labkit": {"lab": lab}}
    return notebook


def add_to_toc(toc: str, lab: str, slug: str, title: str) -> str:
    """The table of contents with the lab and its solution appended to the Labs and Solutions parts."""
    number = lab_number(lab)
    for caption, folder, name in (("Labs", "labs", "Lab"), ("Solutions", "solutions", "Solution")):
        entry = f'      - file: {folder}/{lab}-{slug}\n        title: "{name} {number}: {title}"\n'
        part = re.search(rf"  - caption: {caption}\n    chapters:\n(?:      .*\n)*", toc)
        if part is None:
            raise ValueError(f"_toc.yml has no part with caption {caption!r}")
        toc = toc[:part.end()] + entry + toc[part.end():]
    return toc


def scaffold(lab: str, slug: str, title: str, root: Path = ROOT) -> list[Path]:
    """Write the lab's files under ``root`` and add it to ``_toc.yml``; return the paths written."""
    if not re.fullmatch(r"\d\d[a-z]?", lab) or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug):
        raise ValueError(f"a lab id is two digits and an optional letter (05, 01a), a slug is kebab-case: {lab!r}, {slug!r}")
    number = lab_number(lab)
    files = {root / "solutions" / f"{lab}-{slug}.ipynb": nbformat.writes(master_notebook(lab, title)) + "\n",
             root / "labkit" / "checks" / f"lab{lab}.py": CHECKS.format(lab=lab, number=number, title=title),
             root / "hidden_checks" / f"lab{lab}.py": HIDDEN.format(lab=lab, number=number),
             root / "tests" / f"buggy_lab{lab}.py": BUGGY.format(lab=lab, number=number)}
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise FileExistsError(f"already there, not overwritten: {', '.join(existing)}")
    toc = root / "_toc.yml"
    new_toc = add_to_toc(toc.read_text(encoding="utf-8"), lab, slug, title)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    toc.write_text(new_toc, encoding="utf-8")
    return [*files, toc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lab", help="the lab id, e.g. 05")
    parser.add_argument("slug", help="the file name's part after the id, e.g. mixture-of-experts")
    parser.add_argument("title", help='the title, e.g. "Mixture of Experts"')
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    try:
        written = scaffold(args.lab, args.slug, args.title, args.root)
    except (ValueError, FileExistsError) as error:
        print(f"labkit.new_lab: {error}", file=sys.stderr)
        return 2
    print("Wrote:\n  " + "\n  ".join(str(p.relative_to(args.root)) for p in written))
    print(f"Next: write the lab, then run it and generate the student's version:\n"
          f"  python -m labkit.bench --write solutions/{args.lab}-{args.slug}.ipynb\n  python -m labkit.make_labs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
