"""Load the code of a solution notebook into a namespace, for tests that call it directly."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import nbformat

ROOT = Path(__file__).resolve().parent.parent


def solution_namespace(name: str) -> dict:
    """Run the solution's code cells up to its first experiment (check cells excluded)."""
    matplotlib.use("Agg")
    notebook = nbformat.read(ROOT / "solutions" / f"{name}.ipynb", as_version=4)
    namespace: dict = {"__name__": f"solution_{name.replace('-', '_')}"}
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## Experiment"):
            break
        if cell.cell_type == "code" and "check" not in cell.metadata:
            exec(compile(cell.source, f"<{name}>", "exec"), namespace)
    return namespace
