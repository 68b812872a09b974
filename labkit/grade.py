"""Grade submitted labs: rebuild each onto the pristine lab, run it in a sandbox, score the checks.

    python -m labkit.grade SUBMISSION.ipynb|FOLDER [...] --lab 01a [--out grading-out] [--workers 2]

For each submission the grader

1. validates the file (JSON, nbformat 4, the right lab); an invalid one scores 0 with a reason;
2. rebuilds it onto the pristine lab: the student's cells are kept in order; a check cell is one with
   the pristine lab's check metadata *and* its source, and every check cell is restored from the lab
   (edited or deleted ones too) and run as the grader's own code: the check's collect, sent as source
   code, with a token that only that cell is given; hidden checks are appended;
3. scans the student's code for ways to tamper with the grading (see :data:`TAMPERING`);
4. writes the inputs of every check, drawn with the run's seed (a fresh random one unless ``--seed``
   is given), and runs the notebook with ``pytest --nbval-lax`` in the sandbox of
   :mod:`labkit.sandbox`: an unprivileged user, no network, a read-only system, private ``/tmp``,
   the verify side of the checks and the hidden checks out of reach, and resource limits;
5. scores each check in a child process with memory and time limits: only a check whose own cell
   recorded outputs with its token counts; the record is loaded with ``weights_only=True``, its
   tensors must be contiguous and of a bounded size, and the check's ``verify`` compares it with the
   reference, on the inputs the grader kept. A record made any other way, or a tampering probe that
   fired, flags the submission (``integrity: ...``) and its flagged checks score 0 pending review.

It writes ``<out>/<submission>/results.json`` (Gradescope's format, with each check's id, points and
message, the seed and any integrity finding), ``<out>/scores.csv`` (one row per submission, one
column per check, the integrity findings and the seed) and prints ``N passed, M failed``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import csv
import inspect
import json
import multiprocessing
import os
import re
import resource
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

from labkit import recording, sandbox
from labkit.checks import kernel
from labkit.checks.core import Check, HiddenCheck, checks_of_lab, hidden_checks
from labkit.sandbox import Limits

ROOT = Path(__file__).resolve().parent.parent
CHECK_CALL = re.compile(r"labkit\.check\(\s*[\"'](?P<id>[\w.]+)[\"']\s*,?(?P<args>[^)]*)\)")
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
# The conftest of a grading folder: once nbval has read the notebook, delete it (the kernel must not read the
# check cells' tokens or the hidden checks from disk), and make this process's memory unreadable to the kernel.
CONFTEST = '''\
import ctypes, os

def pytest_collection_finish(session):
    os.remove("submission.ipynb")
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem for the same user
'''
# The student's code may not touch these: each changes how later cells run or reaches into the grading.
TAMPERING = {
    r"input_transformers|ast_transformers|\.events\.register|register_magic": "changes how IPython runs later cells",
    r"\bsettrace\b|\bsetprofile\b|addaudithook": "installs a trace, profile or audit hook",
    r"LABKIT_|GRADING_DIR": "reads or changes the grading environment",
    r"labkit\.(checks|grade|sandbox|autograder|recording)\b|from labkit\.?\w* import .*\b(record|kernel|checks|recording)\b":
        "reaches into the grading machinery",
    r"DisableTorchFunction|TorchFunctionMode|TorchDispatchMode|_disabled_torch_function":
        "intercepts or disables PyTorch's function handling",
    r"site-packages|dist-packages|/dev/shm|\boutputs/|\binputs/": "writes where the grader keeps its files",
}
READONLY = sorted({ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), ROOT / "labkit"})  # to a kernel
MAX_ELEMENTS = 2**25  # elements in one record, at most: far more than any check's outputs


@dataclass
class CheckResult:
    id: str
    points: float
    passed: bool
    message: str
    hidden: bool = False
    flag: str = ""  # what an integrity probe saw while this check's cell ran


@dataclass
class Submission:
    name: str
    status: str = "graded"        # or the one-line reason the file was not graded
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    sandbox: str = ""
    seed: int | None = None
    integrity: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(c.points for c in self.checks if c.passed)


# ---------------------------------------------------------------- the lab and its checks
def lab_notebooks(labs_dir: Path = ROOT / "labs") -> dict[str, Path]:
    """Lab id -> the pristine lab's path, from each notebook's metadata ``labkit.lab``."""
    found = {}
    for path in sorted(labs_dir.glob("*.ipynb")):
        metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
        if isinstance(metadata.get("labkit"), dict) and "lab" in metadata["labkit"]:
            found[metadata["labkit"]["lab"]] = path
    return found


def resolve_lab(name: str, labs_dir: Path = ROOT / "labs") -> str:
    """The lab id of ``name``: an id (``01a``) or a lab notebook's name (``01a-attention-and-gpt[.ipynb]``)."""
    notebooks = lab_notebooks(labs_dir)
    for lab, path in notebooks.items():
        if name in (lab, path.stem, path.name):
            return lab
    known = ", ".join(f"{lab} ({path.stem})" for lab, path in notebooks.items())
    raise LookupError(f"no lab {name!r} in {labs_dir}; the labs are {known or 'none'}")


def lab_notebook(lab: str, labs_dir: Path = ROOT / "labs") -> nbformat.NotebookNode:
    """The pristine lab whose metadata names ``lab``."""
    return nbformat.read(lab_notebooks(labs_dir)[resolve_lab(lab, labs_dir)], as_version=4)


@dataclass
class Plan:
    """What grading a lab involves: the pristine lab, its visible and hidden checks, and the check cells
    of a rebuilt notebook as (id, points, hidden), in order."""
    lab: str
    pristine: nbformat.NotebookNode
    checks: dict[str, Check]
    hidden: list[HiddenCheck]
    cells: list[tuple[str, float, bool]]


def grading_plan(lab: str, labs_dir: Path = ROOT / "labs", hidden_dir: Path | None = None) -> Plan:
    """The one listing of a lab's checks, for ``grade`` and ``autograder`` alike."""
    lab = resolve_lab(lab, labs_dir)
    pristine = lab_notebook(lab, labs_dir)
    hidden = hidden_checks(lab, hidden_dir)
    cells = graded_checks(rebuild(pristine, pristine, [hidden_cell(h) for h in hidden]))
    return Plan(lab, pristine, checks_of_lab(lab) | {h.id: h for h in hidden}, hidden, cells)


def hidden_cell(hidden: HiddenCheck) -> nbformat.NotebookNode:
    """A hidden check's place in a rebuilt notebook (its source is written by :func:`graded_notebook`)."""
    cell = nbformat.v4.new_code_cell(f"# Hidden check {hidden.id}, added by the grader")
    cell.metadata["check"] = {"id": hidden.id, "points": hidden.points, "hidden": True}
    return cell


def recording_source(spec: Check, args: tuple[str, ...], token: str) -> str:
    """What the kernel runs for a check cell: the check's collect (as source code) on the student's objects."""
    own = spec.collect.__module__ != kernel.__name__  # a case table's collect is in the kernel's module already
    source = textwrap.dedent(inspect.getsource(spec.collect)) if own else ""
    return (f"# Check {spec.id}, run by the grader\nimport labkit.recording\n"
            f"labkit.recording.record({spec.id!r}, {token!r}, {source!r}, {spec.collect.__name__!r}, "
            f"{''.join(a + ', ' for a in args)}forbid={spec.forbid!r})")


# ---------------------------------------------------------------- submissions: finding, reading, rebuilding
@dataclass
class Entry:
    path: Path
    key: str  # the path relative to the argument it was found under, less ".ipynb": the report's unique name


def find_submissions(paths: list[Path]) -> tuple[list[Entry], list[str]]:
    """The notebooks under ``paths`` (folders searched recursively) and notes on the other files skipped.
    A path that does not exist, or no notebook at all, is an error (``LookupError``)."""
    entries, notes = [], []
    for argument in paths:
        if not argument.exists():
            raise LookupError(f"no such file or folder: {argument}")
        files = sorted(p for p in argument.rglob("*") if p.is_file()) if argument.is_dir() else [argument]
        for path in files:
            if path.suffix.lower() != ".ipynb":
                notes.append(f"skipped {path}: not a notebook (.ipynb)")
                continue
            key = (path.relative_to(argument) if argument.is_dir() else Path(path.name)).with_suffix("").as_posix()
            entries.append(Entry(path, key))
    if not entries:
        raise LookupError(f"no notebook (.ipynb) in {', '.join(map(str, paths))}")
    seen: dict[str, int] = {}
    for entry in entries:  # the same name under two arguments: number the later ones
        seen[entry.key] = seen.get(entry.key, 0) + 1
        if seen[entry.key] > 1:
            entry.key = f"{seen[entry.key]}/{entry.key}"
    return entries, notes


def _readable(x):
    """JSON values with any lone surrogate (which cannot be written as UTF-8) replaced by U+FFFD."""
    if isinstance(x, str):
        return x.encode("utf-8", "replace").decode("utf-8")
    if isinstance(x, list):
        return [_readable(y) for y in x]
    return {_readable(k): _readable(v) for k, v in x.items()} if isinstance(x, dict) else x


def read_submission(path: Path, lab: str) -> tuple[nbformat.NotebookNode | None, str]:
    """The submission as a notebook, or None and a one-line reason."""
    try:
        raw = _readable(json.loads(path.read_bytes().decode("utf-8", errors="replace")))
    except (OSError, ValueError, RecursionError) as error:
        return None, f"not a readable JSON notebook ({type(error).__name__}: {str(error)[:120]})"
    if not isinstance(raw, dict) or raw.get("nbformat") != 4 or not isinstance(raw.get("cells"), list):
        return None, f"not an nbformat 4 notebook (nbformat={raw.get('nbformat') if isinstance(raw, dict) else None})"
    try:
        notebook = nbformat.reads(json.dumps(raw), as_version=4)
    except Exception as error:  # nbformat raises several kinds of errors on malformed cells
        return None, f"malformed notebook ({type(error).__name__}: {str(error)[:120]})"
    labkit_meta = notebook.metadata.get("labkit")
    declared = labkit_meta.get("lab") if isinstance(labkit_meta, dict) else None
    called = {m["id"].split(".")[0] for cell in notebook.cells if cell.cell_type == "code"
              for m in CHECK_CALL.finditer(cell.source if isinstance(cell.source, str) else "")}
    if declared not in (None, lab) or (declared is None and called and lab not in called):
        return None, f"this is a notebook of lab {declared or ', '.join(sorted(called))}, not of lab {lab}"
    return notebook, ""


def _check_id(cell: nbformat.NotebookNode) -> str | None:
    meta = cell.metadata.get("check")
    return meta.get("id") if isinstance(meta, dict) and isinstance(meta.get("id"), str) else None


def rebuild(submission: nbformat.NotebookNode, lab: nbformat.NotebookNode,
            extra_cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    """The pristine lab's check cells, with the student's other cells in place of the lab's.

    A student cell is a check cell only if it has a lab check cell's metadata and exactly its source;
    any other cell, one that calls a check or carries copied check metadata included, is the student's
    and keeps its code. Student cells are matched to lab cells by cell id, or markdown cells by
    identical text; a cell with no match stays where it was, after the matched cell before it. Check
    cells always come from the lab, deleted ones too; other deleted cells stay deleted (restoring an
    exercise's stub after the student's own version would undo their work). Nothing after the lab's last
    check cell is kept: the experiments there earn no points, so the grader does not spend time running them.
    """
    pristine = {_check_id(c): c.source for c in lab.cells if _check_id(c)}
    ids = {cell.get("id"): i for i, cell in enumerate(lab.cells)}
    texts = {cell.source: i for i, cell in enumerate(lab.cells) if cell.cell_type == "markdown"}
    kept: dict[int, nbformat.NotebookNode] = {}  # lab index -> the student's version
    after: dict[int, list[nbformat.NotebookNode]] = {-1: []}  # lab index -> student cells following it
    anchor = -1
    for cell in submission.cells:
        if _check_id(cell) in pristine and cell.source == pristine[_check_id(cell)]:
            continue  # an untouched check cell: restored from the lab below
        match = ids.get(cell.get("id"))
        if match is None and cell.cell_type == "markdown":
            match = texts.get(cell.source)
        if match is not None and not _check_id(lab.cells[match]) and match not in kept:
            kept[match], anchor = cell, match
            after.setdefault(match, [])
        else:
            after[anchor].append(cell)
    last_check = max((i for i, cell in enumerate(lab.cells) if _check_id(cell)), default=len(lab.cells) - 1)
    cells = [_clean(c) for c in after[-1]]
    for i, lab_cell in enumerate(lab.cells[:last_check + 1]):
        if _check_id(lab_cell):
            cells.append(_clean(lab_cell, check=True))
        elif i in kept:
            cells.append(_clean(kept[i]))
        if i < last_check:
            cells.extend(_clean(c) for c in after.get(i, []))
    rebuilt = nbformat.v4.new_notebook(cells=cells + [_clean(c, check=True) for c in extra_cells])
    rebuilt.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"},
                        "labkit": dict(lab.metadata.get("labkit", {}))}
    return rebuilt


def _clean(cell: nbformat.NotebookNode, check: bool = False) -> nbformat.NotebookNode:
    """A fresh cell with the same type and source (no outputs, no stray fields); a check cell of the grader's
    keeps its check metadata, a student's cell never does."""
    make = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}.get(
        cell.cell_type, nbformat.v4.new_raw_cell)
    clean = make(cell.source if isinstance(cell.source, str) else "".join(cell.source))
    if check:
        clean.metadata["check"] = cell.metadata["check"]
    return clean


def graded_checks(notebook: nbformat.NotebookNode) -> list[tuple[str, float, bool]]:
    """(id, points, hidden) of every check cell of a rebuilt notebook, in order."""
    return [(c.metadata["check"]["id"], float(c.metadata["check"]["points"]), bool(c.metadata["check"].get("hidden")))
            for c in notebook.cells if "check" in c.metadata]


def graded_notebook(rebuilt: nbformat.NotebookNode, plan: Plan, tokens: dict[str, str]) -> nbformat.NotebookNode:
    """The notebook the kernel runs: a first cell that snapshots the kernel's hooks, the student's cells, and
    every check cell replaced by the grader's recording code (the pristine cell names the student's objects)."""
    graded = copy.deepcopy(rebuilt)
    for cell in graded.cells:
        if "check" in cell.metadata:
            spec = plan.checks[cell.metadata["check"]["id"]]
            call = CHECK_CALL.search(cell.source)
            args = spec.args if isinstance(spec, HiddenCheck) else tuple(
                a.strip() for a in call["args"].split(",") if a.strip())
            cell.source = recording_source(spec, args, tokens[spec.id])
    graded.cells.insert(0, nbformat.v4.new_code_cell("import labkit.recording\nlabkit.recording.snapshot()"))
    return graded


def tampering(notebook: nbformat.NotebookNode) -> list[str]:
    """What the student's code cells (the grader's check cells excluded) use that :data:`TAMPERING` forbids."""
    found = []
    for number, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
        if "check" not in cell.metadata:
            for pattern, why in TAMPERING.items():
                match = re.search(pattern, cell.source)
                if match and f"{why}" not in " ".join(found):
                    found.append(f"code cell {number + 1} uses {match[0]!r}: it {why}")
    return found


# ---------------------------------------------------------------- running, sandboxed
def run_nbval(folder: Path, limits: Limits, hidden: list[Path]) -> tuple[str, str]:
    """Run ``pytest --nbval-lax`` on the grading folder's notebook, sandboxed; return its log tail and the
    sandbox's description."""
    command = [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
               f"--nbval-cell-timeout={limits.cell_timeout}", "--junitxml=junit.xml", "-o", "junit_logging=no",
               "submission.ipynb"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABKIT_", "JUPYTER", "PYTEST", "PYTHON"))}
    inside = sandbox.GRADING_FOLDER  # where the folder appears in the sandbox
    threads = str(limits.threads)  # more threads than cores, and PyTorch's OpenMP workers spin: 4x slower
    env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env |= {recording.GRADING_ENV: inside, "LABKIT_MAX_STEPS": str(limits.max_steps), "MPLBACKEND": "Agg",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONSAFEPATH": "1", "HOME": f"{inside}/home",
            "JUPYTER_RUNTIME_DIR": f"{inside}/home/runtime", "TMPDIR": "/tmp"}
    return sandbox.run(command, folder, env, limits, hidden, READONLY, folder.parent / f"{folder.name}.log")


def cell_outcomes(folder: Path, notebook: nbformat.NotebookNode) -> dict[str, str]:
    """Check id -> "" for the check cells nbval saw pass, or its failure message (missing: not run)."""
    try:
        tree = ElementTree.parse(folder / "junit.xml")
    except (OSError, ElementTree.ParseError):
        return {}
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    outcomes = {}
    for case in tree.iter("testcase"):
        match = re.search(r"Cell (\d+)$", case.get("name", ""))
        if not match or int(match[1]) >= len(code_cells) or "check" not in code_cells[int(match[1])].metadata:
            continue
        problem = next((e for e in case if e.tag in ("failure", "error", "skipped")), None)
        text = "" if problem is None else (problem.get("message", "") + "\n" + (problem.text or "")).strip()
        outcomes[code_cells[int(match[1])].metadata["check"]["id"]] = "" if problem is None else \
            _last_error_line(text, problem.tag)
    return outcomes


def _last_error_line(text: str, kind: str) -> str:
    if kind == "skipped":
        return "not run: an earlier cell timed out"
    text = re.sub(r"(\x1b|#x1B)\[[0-9;]*m", "", text)
    lines = [line.strip() for line in text.splitlines() if re.match(r"\s*\w*(Error|Exception|Interrupt)\b", line)]
    if "Timeout" in text and not lines:
        return "the cell timed out"
    return (lines[-1] if lines else text.splitlines()[-1] if text else "failed")[:500]


# ---------------------------------------------------------------- verifying, in a child process
def draw_inputs(checks: dict[str, Check], seed: int) -> dict[str, dict]:
    """Every check's inputs, drawn once per batch with seed + the check's rank by id, before any kernel runs.
    The grader verifies against these, never against the copies that the kernel reads."""
    return {check_id: spec.make_inputs(seed + offset) for offset, (check_id, spec) in enumerate(sorted(checks.items()))}


def write_inputs(folder: Path, inputs: dict[str, dict]) -> None:
    (folder / "inputs").mkdir()
    for check_id, value in inputs.items():
        torch.save(value, folder / "inputs" / f"{check_id}.pt")


def envelope(x, depth: int = 0) -> tuple[int, str]:
    """(elements, problem) of a record's outputs: only plain data, dense CPU tensors contiguous in storages of
    their own size, and no deeper than 8 levels (a tampered record could otherwise exhaust the grader's memory)."""
    if depth > 8:
        return 0, "nested too deep"
    if isinstance(x, torch.Tensor):
        size = x.numel() * x.element_size()
        ok = (x.layout == torch.strided and x.device.type == "cpu" and x.is_contiguous() and x.storage_offset() == 0
              and x.untyped_storage().nbytes() == size)
        return x.numel(), "" if ok else f"a tensor of shape {tuple(x.shape)} is not laid out as its own storage"
    if isinstance(x, (list, tuple, dict)):
        total, items = 0, (list(x.items()) if isinstance(x, dict) else list(enumerate(x)))
        for key, value in items:
            if isinstance(x, dict) and not isinstance(key, (str, int)):
                return 0, f"a key of type {type(key).__name__}"
            count, problem = envelope(value, depth + 1)
            total += count + 1
            if problem or total > MAX_ELEMENTS:
                return total, problem or f"more than {MAX_ELEMENTS} elements"
        return total, ""
    return 1, "" if x is None or isinstance(x, (bool, int, float, str)) else f"a value of type {type(x).__name__}"


# ---------------------------------------------------------------- what each check's collect returns
# A check's schema is the structure of its collect's outputs on the solution, written by --write-schema: the
# keys of every dict, the length of every list, and each tensor's number of axes, kind of dtype and size.
DTYPE_KINDS = {"b": "integer", "i": "integer", "u": "integer", "f": "floating", "c": "complex"}


def describe(x):
    """The schema of one output: JSON data with the structure, kinds and sizes of ``x``."""
    if isinstance(x, torch.Tensor):
        return {"tensor": DTYPE_KINDS.get(str(x.dtype).removeprefix("torch.")[0], "other"), "ndim": x.dim(),
                "numel": x.numel()}
    if isinstance(x, dict):
        return {"dict": {str(k): describe(v) for k, v in x.items()}}
    if isinstance(x, (list, tuple)):
        return {"list": [describe(v) for v in x]}
    return {"value": type(x).__name__}


def widen(a, b):
    """A schema that admits everything ``a`` and ``b`` admit (the solution's outputs for two seeds)."""
    if "tensor" in a and "tensor" in b and a["ndim"] == b["ndim"]:
        return a | {"numel": max(a["numel"], b["numel"])}
    if "dict" in a and "dict" in b and a["dict"].keys() == b["dict"].keys():
        return {"dict": {k: widen(v, b["dict"][k]) for k, v in a["dict"].items()}}
    if "list" in a and "list" in b:
        longer, shorter = (a, b) if len(a["list"]) >= len(b["list"]) else (b, a)
        return {"list": [widen(v, shorter["list"][min(i, len(shorter["list"]) - 1)]) if shorter["list"] else v
                         for i, v in enumerate(longer["list"])]}
    if a == b:
        return a
    raise ValueError(f"the solution's outputs differ in structure between seeds: {a} and {b}")


def misfit(x, schema, where: str = "outputs") -> str:
    """How ``x`` departs from ``schema`` ("" if it fits). Any output may instead be None or an attempt
    that raised, and a number stands for a one-element tensor, so that verify can report a wrong answer;
    sizes may reach 4 times the solution's, plus some slack."""
    if x is None or (isinstance(x, dict) and set(x) == {kernel.RAISED}):
        return ""  # verify says what is missing, or what raised
    if "value" in schema:
        plain = not isinstance(x, (list, tuple, dict, torch.Tensor)) or (isinstance(x, torch.Tensor) and x.numel() == 1)
        return "" if plain else f"{where}: a {type(x).__name__}, where collect returns a {schema['value']}"
    if "tensor" in schema:
        if isinstance(x, (bool, int, float)):
            return ""
        if not isinstance(x, torch.Tensor):
            return f"{where}: a {type(x).__name__}, where collect returns a tensor"
        kind = DTYPE_KINDS.get(str(x.dtype).removeprefix("torch.")[0], "other")
        problems = []
        if x.dim() != schema["ndim"]:
            problems.append(f"{x.dim()} axes, not {schema['ndim']}")
        if kind != schema["tensor"]:
            problems.append(f"a {kind} dtype, not {schema['tensor']}")
        if x.numel() > 4 * schema["numel"] + 4096:
            problems.append(f"{x.numel()} elements, far more than {schema['numel']}")
        return f"{where}: " + ", ".join(problems) if problems else ""
    if "dict" in schema:
        if not isinstance(x, dict) or set(map(str, x)) != set(schema["dict"]):
            keys = sorted(map(str, x)) if isinstance(x, dict) else type(x).__name__
            return f"{where}: keys {keys}, where collect returns keys {sorted(schema['dict'])}"
        return next((p for k, v in x.items() if (p := misfit(v, schema["dict"][str(k)], f"{where}[{k!r}]"))), "")
    items = schema["list"]
    if not isinstance(x, (list, tuple)) or len(x) > 4 * len(items) + 64:
        return f"{where}: {type(x).__name__} of {len(x) if isinstance(x, (list, tuple)) else 1}, where collect " \
               f"returns a list of {len(items)}"
    return next((p for i, v in enumerate(x) if items and (p := misfit(v, items[min(i, len(items) - 1)],
                                                                       f"{where}[{i}]"))), "")


_VERIFIER: dict = {}  # in the verifier process: the checks by id, their schemas, and where to learn them


def schema_file(lab: str) -> Path:
    return ROOT / "labkit" / "checks" / "schemas" / f"{lab}.json"


def _start_verifier(lab: str, hidden_dir: str | None, memory_gb: float, learn: str | None) -> None:
    """The verifier process: capped, and with every check and reference imported before any kernel runs."""
    memory = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    _VERIFIER["checks"] = checks_of_lab(lab) | {h.id: h for h in hidden_checks(lab, Path(hidden_dir) if hidden_dir else None)}
    _VERIFIER["schemas"] = json.loads(schema_file(lab).read_text()) if schema_file(lab).exists() and not learn else {}
    _VERIFIER["learn"] = learn
    from labkit.checks import references
    references.preload()


def _learn(check_id: str, outputs: dict) -> None:
    """--write-schema: widen the check's schema in the file being written by the solution's outputs."""
    path = Path(_VERIFIER["learn"])
    schemas = json.loads(path.read_text()) if path.exists() else {}
    schemas[check_id] = widen(schemas[check_id], describe(outputs)) if check_id in schemas else describe(outputs)
    path.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(schemas.items())) + "\n}\n")


def _verify(check_id: str, inputs: dict, record_path: str, token: str) -> tuple[bool, str, str]:
    """In the verifier process: (passed, message, integrity flag) of one record."""
    try:
        record = torch.load(record_path, weights_only=True)
    except Exception as error:
        return False, f"the record could not be read ({type(error).__name__})", "a malformed record"
    if not isinstance(record, dict) or set(record) != {"token", "outputs", "integrity"} or record["token"] != token:
        return False, "not recorded by its check cell", "a record that its check cell did not make"
    found, outputs = record["integrity"], record["outputs"]
    flag = "; ".join(found) if isinstance(found, list) and all(isinstance(f, str) for f in found) else "a malformed record"
    _, problem = envelope(outputs)
    if problem or not isinstance(outputs, dict):
        return False, f"malformed outputs: {problem or 'not a dict'}", flag or "malformed outputs"
    if check_id in _VERIFIER["schemas"] and (problem := misfit(outputs, _VERIFIER["schemas"][check_id])):
        return False, f"outputs unlike what the check's collect returns: {problem}"[:1000], flag
    try:
        verdict = _VERIFIER["checks"][check_id].verdict(inputs, outputs)
    except AssertionError as failure:
        return False, str(failure)[:1000], flag
    except Exception as error:  # outputs of the wrong kind
        return False, f"outputs could not be verified ({type(error).__name__}: {str(error)[:300]})", flag
    if _VERIFIER["learn"]:
        _learn(check_id, outputs)
    return True, verdict, flag


class Verifier:
    """Verifies records in a child process, with an address-space limit and a time limit per record; a
    record that breaks either fails its check, and the process is started anew."""

    def __init__(self, lab: str, hidden_dir: Path | None, memory_gb: float, learn: Path | None = None,
                 seconds: float = 120):
        self.args = (lab, str(hidden_dir) if hidden_dir else None, memory_gb, str(learn) if learn else None)
        self.seconds = seconds
        self.pool = self._start("fork")  # before the grader starts threads: a copy of it, with torch imported

    def _start(self, method: str = "spawn") -> concurrent.futures.ProcessPoolExecutor:
        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method),
                                                      initializer=_start_verifier, initargs=self.args)
        self.started = pool.submit(int)  # done once the checks and references are imported
        return pool

    def wait_started(self) -> None:
        """Before any kernel runs: the verifier must have imported everything it will use."""
        self.started.result()

    def verify(self, check_id: str, inputs: dict, record_path: Path, token: str) -> tuple[bool, str, str]:
        future = self.pool.submit(_verify, check_id, inputs, str(record_path), token)
        try:
            return future.result(timeout=self.seconds)
        except (concurrent.futures.TimeoutError, concurrent.futures.process.BrokenProcessPool):
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.kill()
            self.pool.shutdown(cancel_futures=True)
            self.pool = self._start()
            return False, "verifying the record exceeded its memory or time limit", "an oversized record"

    def close(self) -> None:
        self.pool.shutdown()


# ---------------------------------------------------------------- grading one submission
def grade_one(entry: Entry, plan: Plan, out_dir: Path, limits: Limits, seed: int, inputs: dict[str, dict],
              private: list[Path], verifier: Verifier) -> Submission:
    """Grade one submission; write ``<out_dir>/<key>/results.json`` and the log of its run."""
    result = Submission(name=entry.key, seed=seed)
    start = time.perf_counter()
    notebook, reason = read_submission(entry.path, plan.lab)
    if notebook is None:
        result.status = reason
        result.checks = [CheckResult(i, p, False, f"not graded: {reason}", h) for i, p, h in plan.cells]
    else:
        rebuilt = rebuild(notebook, plan.pristine, [hidden_cell(h) for h in plan.hidden])
        result.integrity = tampering(rebuilt)
        tokens = {check_id: secrets.token_hex(16) for check_id in plan.checks}
        graded = graded_notebook(rebuilt, plan, tokens)
        with tempfile.TemporaryDirectory(prefix="labkit-grade-", dir=sandbox.scratch_root()) as tmp:
            folder = Path(tmp) / "run"
            folder.mkdir()
            nbformat.write(graded, folder / "submission.ipynb")
            (folder / "conftest.py").write_text(CONFTEST)
            write_inputs(folder, inputs)
            sandbox.prepare(folder, writable=["outputs", "home"])
            keep = [Path(tmp), Path(sys.prefix), Path(sys.base_prefix), ROOT / "labkit"]
            verifier.wait_started()
            log, result.sandbox = run_nbval(folder, limits, sandbox.private_paths(keep, private))
            result.checks = score(folder, graded, plan, inputs, tokens, verifier)
            stray = sorted(p.name for p in (folder / "outputs").iterdir() if p.stem not in plan.checks)
            result.integrity += [f"files in the outputs folder that no check cell wrote: {', '.join(stray[:5])}"] * bool(stray)
            (out_dir / entry.key).mkdir(parents=True, exist_ok=True)
            (out_dir / entry.key / "log.txt").write_text(log)
    result.integrity += [f"{c.id}: {c.flag}" for c in result.checks if c.flag]
    if result.integrity:  # flagged checks score 0, pending review: one check's probe flags it, any other finding all
        everything = len(result.integrity) > sum(bool(c.flag) for c in result.checks)
        result.checks = [CheckResult(c.id, c.points, False, f"integrity: pending review ({c.message})", c.hidden, c.flag)
                         if c.passed and (c.flag or everything) else c for c in result.checks]
    result.seconds = time.perf_counter() - start
    write_results(result, out_dir / entry.key / "results.json")
    return result


def score(folder: Path, graded: nbformat.NotebookNode, plan: Plan, inputs: dict[str, dict], tokens: dict[str, str],
          verifier: Verifier) -> list[CheckResult]:
    """Each check: its cell must have run without error and recorded outputs with its token; then verify."""
    outcomes, results = cell_outcomes(folder, graded), []
    for check_id, points, is_hidden in graded_checks(graded):
        record, error = folder / "outputs" / f"{check_id}.pt", outcomes.get(check_id)
        if not record.exists():
            message = error or "the check cell did not record outputs (it failed, or an earlier cell stopped the run)"
            results.append(CheckResult(check_id, points, False, message, is_hidden))
            continue
        passed, message, flag = verifier.verify(check_id, inputs[check_id], record, tokens[check_id])
        if error:  # a record, but its cell did not finish cleanly
            passed, message = False, error
        results.append(CheckResult(check_id, points, passed, message, is_hidden, flag))
    return results


# ---------------------------------------------------------------- reports
def write_results(result: Submission, path: Path) -> None:
    """Gradescope's results.json: each check's id and message, the seed and any integrity finding."""
    tests = [{"name": c.id, "score": c.points if c.passed else 0.0, "max_score": c.points,
              "output": ("" if c.passed else "FAILED: ") + c.message,
              "visibility": "after_published" if c.hidden else "visible",
              "status": "passed" if c.passed else "failed"} for c in result.checks]
    output = result.status if result.status != "graded" else f"sandbox: {result.sandbox}"
    if result.integrity:
        output += "\nintegrity: " + "; ".join(result.integrity)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "score": result.score, "execution_time": round(result.seconds, 1), "output": output, "tests": tests,
        "labkit": {"submission": result.name, "status": result.status, "sandbox": result.sandbox, "seed": result.seed,
                   "integrity": result.integrity, "checks": [asdict(c) for c in result.checks]},
    }, indent=2))


def write_scores(results: list[Submission], path: Path) -> None:
    """One row per submission, one column per check, the total, the status, integrity findings and the seed."""
    check_ids = list(dict.fromkeys(c.id for r in results for c in r.checks))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", *check_ids, "total", "max", "status", "integrity", "seed"])
        for r in sorted(results, key=lambda r: r.name):
            by_id = {c.id: (c.points if c.passed else 0) for c in r.checks}
            writer.writerow([r.name, *(by_id.get(i, 0) for i in check_ids), r.score,
                             sum(c.points for c in r.checks), r.status, "; ".join(r.integrity), r.seed])


def main(argv: list[str] | None = None) -> int:
    # The grader imports nothing from the folder it runs in: a file planted there cannot shadow a module.
    sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("submissions", nargs="+", type=Path, help="notebooks, or folders searched for notebooks")
    parser.add_argument("--lab", required=True, help="the lab: its id (01a) or its notebook's name")
    parser.add_argument("--out", type=Path, default=Path("grading-out"), help="where the reports go")
    parser.add_argument("--hidden", type=Path, default=None, help="a private folder of hidden checks")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the check inputs (default: a fresh random one, recorded in the reports)")
    parser.add_argument("--cell-timeout", type=int, default=Limits.cell_timeout)
    parser.add_argument("--timeout", type=int, default=Limits.timeout, help="wall-clock seconds per submission")
    parser.add_argument("--memory-gb", type=float, default=Limits.memory_gb)
    parser.add_argument("--labs-dir", type=Path, default=ROOT / "labs")
    parser.add_argument("--write-schema", action="store_true",
                        help="maintainers: widen the schemas of the checks' outputs by these (solution) notebooks' outputs")
    args = parser.parse_args(argv)
    workers = max(1, args.workers)
    limits = Limits(args.cell_timeout, args.timeout, args.memory_gb, threads=max(1, (os.cpu_count() or 1) // workers))
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed  # secret: no answers can be precomputed
    try:
        plan = grading_plan(args.lab, args.labs_dir, args.hidden)
        entries, notes = find_submissions(args.submissions)
    except (LookupError, OSError, ValueError) as error:
        print(f"labkit.grade: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", flush=True)
    private = [ROOT / "hidden_checks", ROOT / "solutions", *sandbox.verify_side(), *map(Path.resolve, args.submissions),
               args.out.resolve()] + ([args.hidden.resolve()] if args.hidden else [])
    args.out.mkdir(parents=True, exist_ok=True)
    learn = schema_file(plan.lab) if args.write_schema else None
    verifier = Verifier(plan.lab, args.hidden, args.memory_gb, learn)  # starts while the inputs are drawn
    inputs = draw_inputs(plan.checks, seed)
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(grade_one, e, plan, args.out, limits, seed, inputs, private, verifier): e
                   for e in entries}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            entry = futures[future]
            try:
                result = future.result()
            except Exception as error:  # a grader bug must not stop the batch, and every check is listed
                message = f"grader error: {type(error).__name__}: {error}"
                result = Submission(name=entry.key, status=message, seed=seed,
                                    checks=[CheckResult(i, p, False, message, h) for i, p, h in plan.cells])
                write_results(result, args.out / entry.key / "results.json")
            results.append(result)
            total = sum(c.points for c in result.checks)
            print(f"[{done}/{len(entries)}] {result.name}: {result.score:g}/{total:g} ({result.seconds:.0f} s)"
                  + ("" if result.status == "graded" else f" - {result.status}")
                  + (f" - integrity: {'; '.join(result.integrity)}" if result.integrity else ""), flush=True)
    verifier.close()
    write_scores(results, args.out / "scores.csv")
    passed = sum(c.passed for r in results for c in r.checks)
    failed = sum(not c.passed for r in results for c in r.checks)
    print(f"reports in {args.out}/ (results.json per submission, scores.csv); seed {seed}")
    print(f"{passed} passed, {failed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
