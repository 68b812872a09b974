"""Run solution notebooks, time them and tabulate the key figures they report.

    python -m labkit.bench solutions                 # run every solution, print a table, write _build/bench.md
    python -m labkit.bench --write solutions/X.ipynb # also store the fresh outputs in the notebook (authors)

Notebooks report their key figures with :func:`labkit.report`; this command collects them
through the ``LABKIT_REPORT`` file. It is a benchmark, not a test: nothing here fails on a time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(path: Path, write: bool = False, timeout: int = 600) -> tuple[float, list[dict]]:
    """Execute a notebook in its own folder; return the wall seconds and the reported figures."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as report:
        report_path = report.name
    os.environ["LABKIT_REPORT"] = report_path
    try:
        client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
        figures = [json.loads(line) for line in Path(report_path).read_text().splitlines()]
    finally:
        os.environ.pop("LABKIT_REPORT", None)
        os.unlink(report_path)
    if write:
        nbformat.write(notebook, path)
    return seconds, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="notebooks or folders of notebooks")
    parser.add_argument("--write", action="store_true", help="store the fresh outputs in the notebooks")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "bench.md")
    args = parser.parse_args(argv)
    notebooks = [n for p in args.paths for n in (sorted(p.glob("*.ipynb")) if p.is_dir() else [p])]
    rows = ["| notebook | wall seconds | key figures |", "|---|---:|---|"]
    for path in notebooks:
        seconds, figures = run_notebook(path, write=args.write)
        shown = "; ".join(f"{f['name']} = {f['value']:.4g} {f['unit']}".strip() for f in figures)
        rows.append(f"| {path.name} | {seconds:.1f} | {shown} |")
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    print("\n".join(rows))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
