"""Grade submitted labs: rebuild each onto the pristine lab, run it with nbval, score the checks.

    python -m labkit.grade SUBMISSION.ipynb|FOLDER [...] --lab 01a [--out grading-out] [--workers 2]

For each submission the grader

1. validates the file (JSON, nbformat 4, the right lab); an invalid one scores 0 with a reason;
2. rebuilds it onto the pristine lab: the student's cells are kept in order, every check cell
   is restored from the lab (edited or deleted ones too), hidden checks are appended, and the
   kernel spec is forced;
3. writes the inputs of every check, drawn with the run's seed (a fresh random one unless
   ``--seed`` is given), and runs the notebook with ``pytest --nbval-lax`` in a fresh temporary
   folder, in the sandbox of :mod:`labkit.sandbox` (per-cell timeout, wall-clock limit, memory,
   CPU-time and file-size limits, no network, private paths hidden);
4. scores each check in this process: the kernel only saved the student's outputs on the
   inputs; the check's ``verify`` compares them with the reference here, against the inputs the
   grader kept, where nothing the notebook monkeypatched can reach.

It writes ``<out>/<submission>/results.json`` (Gradescope's format, with each check's id,
points and message, and the seed), ``<out>/scores.csv`` (one row per submission, one column per
check, and the seed) and prints ``N passed, M failed`` over all checks graded.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import csv
import inspect
import json
import os
import re
import secrets
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
import torch

from labkit import sandbox
from labkit.checks import GRADING_ENV, Check, HiddenCheck, checks_of_lab, hidden_checks
from labkit.checks import kernel
from labkit.checks.references import IMPORT_LOCK
from labkit.sandbox import Limits

ROOT = Path(__file__).resolve().parent.parent
CHECK_CALL = re.compile(r"labkit\.check\(\s*[\"'](?P<id>[\w.]+)[\"']")
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
# The conftest of a grading folder: once nbval has read the notebook, delete it, so the
# kernel cannot read the hidden checks' cells from disk.
CONFTEST = '''\
import os

def pytest_collection_finish(session):
    os.remove("submission.ipynb")
'''


@dataclass
class CheckResult:
    id: str
    points: float
    passed: bool
    message: str
    hidden: bool = False


@dataclass
class Submission:
    name: str
    status: str = "graded"        # or the one-line reason the file was not graded
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    sandbox: str = ""
    seed: int | None = None

    @property
    def score(self) -> float:
        return sum(c.points for c in self.checks if c.passed)


# ---------------------------------------------------------------- the pristine lab and its checks
def lab_notebook(lab: str, labs_dir: Path = ROOT / "labs") -> nbformat.NotebookNode:
    """The pristine lab whose metadata names ``lab``."""
    for path in sorted(labs_dir.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        if notebook.metadata.get("labkit", {}).get("lab") == lab:
            return notebook
    raise LookupError(f"no lab {lab!r} in {labs_dir} (no notebook whose metadata labkit.lab is {lab!r})")


KERNEL_HELPERS = ", ".join(kernel.__all__)  # what a hidden check's collect may use, besides torch


def hidden_cell(hidden: HiddenCheck) -> nbformat.NotebookNode:
    """The cell that runs a hidden check's ``collect`` (sent as source) on the student's objects."""
    own = hidden.collect.__module__ != kernel.__name__  # a case table's collect is already in the kernel
    source = textwrap.dedent(inspect.getsource(hidden.collect)) if own else ""
    call = (f"labkit.checks.record({hidden.id!r}, {hidden.collect.__name__}, {', '.join(hidden.args)}, "
            f"forbid={hidden.forbid!r})")
    cell = nbformat.v4.new_code_cell(f"# Hidden check, added by the grader\nimport torch\n"
                                     f"from labkit.checks.kernel import {KERNEL_HELPERS}\n\n{source}\n{call}")
    cell.metadata["check"] = {"id": hidden.id, "points": hidden.points, "hidden": True}
    return cell


@dataclass
class Plan:
    """What grading a lab involves: the pristine lab, its visible and hidden checks, and the check
    cells of a rebuilt notebook as (id, points, hidden), in order."""
    pristine: nbformat.NotebookNode
    checks: dict[str, Check]
    hidden: list[HiddenCheck]
    cells: list[tuple[str, float, bool]]


def grading_plan(lab: str, labs_dir: Path = ROOT / "labs", hidden_dir: Path | None = None) -> Plan:
    """The one listing of a lab's checks, for ``grade`` and ``autograder`` alike."""
    pristine = lab_notebook(lab, labs_dir)
    hidden = hidden_checks(lab, hidden_dir)
    cells = graded_checks(rebuild(pristine, pristine, [hidden_cell(h) for h in hidden]))
    return Plan(pristine, checks_of_lab(lab) | {h.id: h for h in hidden}, hidden, cells)


# ---------------------------------------------------------------- validation and rebuild
def read_submission(path: Path, lab: str) -> tuple[nbformat.NotebookNode | None, str]:
    """The submission as a notebook, or None and a one-line reason."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError) as error:
        return None, f"not a readable JSON notebook ({type(error).__name__}: {str(error)[:120]})"
    if not isinstance(raw, dict) or raw.get("nbformat") != 4 or not isinstance(raw.get("cells"), list):
        return None, f"not an nbformat 4 notebook (nbformat={raw.get('nbformat') if isinstance(raw, dict) else None})"
    try:
        notebook = nbformat.reads(json.dumps(raw), as_version=4)
    except Exception as error:  # nbformat raises several kinds of errors on malformed cells
        return None, f"malformed notebook ({type(error).__name__}: {str(error)[:120]})"
    declared = notebook.metadata.get("labkit", {}).get("lab") if isinstance(notebook.metadata.get("labkit"), dict) else None
    called = {m["id"].split(".")[0] for cell in notebook.cells if cell.cell_type == "code"
              for m in CHECK_CALL.finditer(cell.source if isinstance(cell.source, str) else "")}
    if declared not in (None, lab) or (declared is None and called and lab not in called):
        return None, f"this is a notebook of lab {declared or ', '.join(sorted(called))}, not of lab {lab}"
    return notebook, ""


def is_check_cell(cell: nbformat.NotebookNode) -> bool:
    return "check" in cell.metadata or bool(cell.cell_type == "code" and CHECK_CALL.search(cell.source))


def rebuild(submission: nbformat.NotebookNode, lab: nbformat.NotebookNode,
            extra_cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    """The pristine lab's check cells, with the student's other cells in place of the lab's.

    Student cells are matched to lab cells by cell id, or markdown cells by identical text.
    A student cell with no match stays where it was, after the matched cell before it.
    Check cells always come from the lab, deleted ones too; other deleted cells stay deleted
    (restoring an exercise's stub after the student's own version would undo their work).
    """
    ids = {cell.get("id"): i for i, cell in enumerate(lab.cells)}
    texts = {cell.source: i for i, cell in enumerate(lab.cells) if cell.cell_type == "markdown"}
    kept: dict[int, nbformat.NotebookNode] = {}  # lab index -> the student's version
    after: dict[int, list[nbformat.NotebookNode]] = {-1: []}  # lab index -> student cells following it
    anchor = -1
    for cell in submission.cells:
        if is_check_cell(cell):
            continue
        match = ids.get(cell.get("id"))
        if match is None and cell.cell_type == "markdown":
            match = texts.get(cell.source)
        if match is not None and not is_check_cell(lab.cells[match]) and match not in kept:
            kept[match], anchor = cell, match
            after.setdefault(match, [])
        else:
            after[anchor].append(cell)
    cells = list(after[-1])
    for i, lab_cell in enumerate(lab.cells):
        if is_check_cell(lab_cell):
            cells.append(copy.deepcopy(lab_cell))
        elif i in kept:
            cells.append(kept[i])
        cells.extend(after.get(i, []))
    rebuilt = nbformat.v4.new_notebook(cells=[_clean(c) for c in cells + extra_cells])
    rebuilt.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"},
                        "labkit": dict(lab.metadata.get("labkit", {}))}
    return rebuilt


def _clean(cell: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A fresh cell with the same type, source and check metadata (no outputs, no stray fields)."""
    make = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}.get(
        cell.cell_type, nbformat.v4.new_raw_cell)
    clean = make(cell.source if isinstance(cell.source, str) else "".join(cell.source))
    if "check" in cell.metadata:
        clean.metadata["check"] = cell.metadata["check"]
    return clean


def graded_checks(notebook: nbformat.NotebookNode) -> list[tuple[str, float, bool]]:
    """(id, points, hidden) of every check cell of a rebuilt notebook, in order."""
    return [(c.metadata["check"]["id"], float(c.metadata["check"]["points"]), bool(c.metadata["check"].get("hidden")))
            for c in notebook.cells if "check" in c.metadata]


# ---------------------------------------------------------------- running, sandboxed
def run_nbval(folder: Path, limits: Limits, masked: list[Path]) -> tuple[str, str]:
    """Run ``pytest --nbval-lax`` on ``folder/submission.ipynb``, sandboxed; return its log tail and the sandbox used."""
    command = [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
               f"--nbval-cell-timeout={limits.cell_timeout}", "--junitxml=junit.xml", "-o", "junit_logging=no",
               "submission.ipynb"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABKIT_", "JUPYTER", "PYTEST"))}
    env |= {GRADING_ENV: str(folder), "LABKIT_MAX_STEPS": str(limits.max_steps),
            "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(folder / "home"),
            "JUPYTER_RUNTIME_DIR": str(folder / "home" / "runtime")}
    (folder / "home").mkdir()
    return sandbox.run(command, folder, env, limits, masked, folder / "log.txt")


def cell_errors(folder: Path, notebook: nbformat.NotebookNode) -> dict[str, str]:
    """Check id -> nbval's failure message for the check cells that failed or were skipped."""
    try:
        tree = ElementTree.parse(folder / "junit.xml")
    except (OSError, ElementTree.ParseError):
        return {}
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    errors = {}
    for case in tree.iter("testcase"):
        match = re.search(r"Cell (\d+)$", case.get("name", ""))
        problem = next((e for e in case if e.tag in ("failure", "error", "skipped")), None)
        if not match or problem is None or int(match[1]) >= len(code_cells):
            continue
        cell = code_cells[int(match[1])]
        if "check" in cell.metadata:
            text = (problem.get("message", "") + "\n" + (problem.text or "")).strip()
            errors[cell.metadata["check"]["id"]] = _last_error_line(text, problem.tag)
    return errors


def _last_error_line(text: str, kind: str) -> str:
    if kind == "skipped":
        return "not run: an earlier cell timed out"
    text = re.sub(r"(\x1b|#x1B)\[[0-9;]*m", "", text)
    lines = [line.strip() for line in text.splitlines() if re.match(r"\s*\w*(Error|Exception|Interrupt)\b", line)]
    if "Timeout" in text and not lines:
        return "the cell timed out"
    return (lines[-1] if lines else text.splitlines()[-1] if text else "failed")[:500]


# ---------------------------------------------------------------- scoring
def write_inputs(folder: Path, checks: dict[str, Check], seed: int) -> dict[str, dict]:
    """Draw every check's inputs (seed + the check's rank by id), save them for the kernel, and return
    them: the grader verifies against these, never against a copy the kernel could have touched."""
    (folder / "inputs").mkdir()
    (folder / "outputs").mkdir()
    inputs = {}
    for offset, (check_id, spec) in enumerate(sorted(checks.items())):
        inputs[check_id] = spec.make_inputs(seed + offset)
        torch.save(inputs[check_id], folder / "inputs" / f"{check_id}.pt")
    return inputs


def score_check(spec: Check, inputs: dict, folder: Path, error: str) -> tuple[bool, str]:
    """Verify the outputs the kernel saved for one check, in this process."""
    outputs_path = folder / "outputs" / f"{spec.id}.pt"
    if not outputs_path.exists():
        return False, error or "the check cell did not record outputs (it failed, or an earlier cell stopped the run)"
    try:
        outputs = torch.load(outputs_path, weights_only=True)
        if not isinstance(outputs, dict):
            raise AssertionError("the recorded outputs are not a dict")
        # Verification imports reference libraries lazily, and transformers' lazy modules are not
        # thread-safe: the batch's threads verify one at a time (it is quick).
        with IMPORT_LOCK:
            return True, spec.verdict(inputs, outputs)
    except AssertionError as failure:
        return False, str(failure)[:1000]
    except Exception as error:  # a malformed or tampered outputs file, or outputs of the wrong kind
        return False, f"outputs could not be verified ({type(error).__name__}: {str(error)[:300]})"


def grade_one(path: Path, name: str, plan: Plan, out_dir: Path, limits: Limits, seed: int,
              private: list[Path]) -> Submission:
    """Grade one submission; write ``<out_dir>/<name>/results.json`` and the log of its run."""
    result = Submission(name=name, seed=seed)
    start = time.perf_counter()
    notebook, reason = read_submission(path, plan.pristine.metadata["labkit"]["lab"])
    if notebook is None:
        result.status = reason
        result.checks = [CheckResult(i, p, False, f"not graded: {reason}", h) for i, p, h in plan.cells]
    else:
        rebuilt = rebuild(notebook, plan.pristine, [hidden_cell(h) for h in plan.hidden])
        with tempfile.TemporaryDirectory(prefix="labkit-grade-", dir=sandbox.scratch_root()) as tmp:
            folder = Path(tmp)
            os.chmod(folder, 0o755)
            nbformat.write(rebuilt, folder / "submission.ipynb")
            (folder / "conftest.py").write_text(CONFTEST)
            inputs = write_inputs(folder, plan.checks, seed)
            import labkit
            keep = [folder, Path(sys.prefix), Path(sys.base_prefix), Path(labkit.__file__).parent]
            log, result.sandbox = run_nbval(folder, limits, sandbox.private_paths(keep, private))
            errors = cell_errors(folder, rebuilt)
            for check_id, points, is_hidden in graded_checks(rebuilt):
                passed, message = score_check(plan.checks[check_id], inputs[check_id], folder, errors.get(check_id, ""))
                result.checks.append(CheckResult(check_id, points, passed, message, is_hidden))
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            (out_dir / name / "log.txt").write_text(log)
    result.seconds = time.perf_counter() - start
    write_results(result, out_dir / name / "results.json")
    return result


# ---------------------------------------------------------------- reports
def write_results(result: Submission, path: Path) -> None:
    """Gradescope's results.json, with each check's id and message, and the seed of the run's inputs."""
    tests = [{"name": c.id, "score": c.points if c.passed else 0.0, "max_score": c.points,
              "output": ("" if c.passed else "FAILED: ") + c.message,
              "visibility": "after_published" if c.hidden else "visible",
              "status": "passed" if c.passed else "failed"} for c in result.checks]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "score": result.score, "execution_time": round(result.seconds, 1),
        "output": result.status if result.status != "graded" else f"sandbox: {result.sandbox}",
        "tests": tests,
        "labkit": {"submission": result.name, "status": result.status, "sandbox": result.sandbox,
                   "seed": result.seed, "checks": [asdict(c) for c in result.checks]},
    }, indent=2))


def write_scores(results: list[Submission], path: Path) -> None:
    """One row per submission, one column per check, the total, the status and the seed (``--seed`` regrades)."""
    check_ids = list(dict.fromkeys(c.id for r in results for c in r.checks))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", *check_ids, "total", "max", "status", "seed"])
        for r in sorted(results, key=lambda r: r.name):
            by_id = {c.id: (c.points if c.passed else 0) for c in r.checks}
            writer.writerow([r.name, *(by_id.get(i, 0) for i in check_ids), r.score,
                             sum(c.points for c in r.checks), r.status, r.seed])


def find_submissions(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        found += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("submissions", nargs="+", type=Path, help="notebooks, or folders of notebooks")
    parser.add_argument("--lab", required=True, help="the lab id, e.g. 01a")
    parser.add_argument("--out", type=Path, default=Path("grading-out"), help="where the reports go")
    parser.add_argument("--hidden", type=Path, default=None, help="a private folder of hidden checks")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the check inputs (default: a fresh random one, recorded in the reports)")
    parser.add_argument("--cell-timeout", type=int, default=Limits.cell_timeout)
    parser.add_argument("--timeout", type=int, default=Limits.timeout, help="wall-clock seconds per submission")
    parser.add_argument("--memory-gb", type=float, default=Limits.memory_gb)
    parser.add_argument("--labs-dir", type=Path, default=ROOT / "labs")
    args = parser.parse_args(argv)
    limits = Limits(args.cell_timeout, args.timeout, args.memory_gb)
    # The seed is secret by default: a submission cannot carry answers for inputs it cannot know.
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    try:
        plan = grading_plan(args.lab, args.labs_dir, args.hidden)
    except (LookupError, OSError) as error:
        print(f"labkit.grade: {error}", file=sys.stderr)
        return 2
    paths = find_submissions(args.submissions)
    private = [ROOT / "hidden_checks", ROOT / "solutions", *{p.resolve().parent for p in paths}, args.out.resolve()]
    if args.hidden:
        private.append(args.hidden.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {pool.submit(grade_one, p, p.stem, plan, args.out, limits, seed, private): p for p in paths}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            path = futures[future]
            try:
                result = future.result()
            except Exception as error:  # a grader bug must not stop the batch
                result = Submission(name=path.stem, status=f"grader error: {type(error).__name__}: {error}", seed=seed)
                write_results(result, args.out / path.stem / "results.json")
            results.append(result)
            total = sum(c.points for c in result.checks)
            print(f"[{done}/{len(paths)}] {result.name}: {result.score:g}/{total:g} "
                  f"({result.seconds:.0f} s){'' if result.status == 'graded' else ' - ' + result.status}", flush=True)
    write_scores(results, args.out / "scores.csv")
    passed = sum(c.passed for r in results for c in r.checks)
    failed = sum(not c.passed for r in results for c in r.checks)
    print(f"reports in {args.out}/ (results.json per submission, scores.csv); seed {seed}")
    print(f"{passed} passed, {failed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
