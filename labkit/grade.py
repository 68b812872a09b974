"""Grade submitted labs: rebuild each onto the pristine lab, run it with nbval, score the checks.

    python -m labkit.grade SUBMISSION.ipynb|FOLDER [...] --lab 01a [--out grading-out] [--workers 2]

For each submission the grader

1. validates the file (JSON, nbformat 4, the right lab); an invalid one scores 0 with a reason;
2. rebuilds it onto the pristine lab: the student's cells are kept in order, every check cell
   is restored from the lab (edited or deleted ones too), hidden checks are appended, and the
   kernel spec is forced;
3. writes the inputs of every check, drawn with the grader's seed, and runs the notebook with
   ``pytest --nbval-lax`` in a fresh temporary folder, in a sandbox (see :func:`sandbox_prefix`)
   with a per-cell timeout, a wall-clock limit, and memory, CPU-time and file-size limits;
4. scores each check in this process: the kernel only saved the student's outputs on the
   inputs; :func:`labkit.checks` ``verify`` compares them with the reference here, where
   nothing the notebook monkeypatched can reach.

It writes ``<out>/<submission>/results.json`` (Gradescope's format, with each check's id,
points and message), ``<out>/scores.csv`` (one row per submission, one column per check)
and prints ``N passed, M failed`` over all checks graded.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import csv
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
import torch

from labkit.checks import Check, checks_of_lab

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
class Limits:
    cell_timeout: int = 120       # seconds per cell (nbval)
    timeout: int = 600            # wall-clock seconds per submission
    memory_gb: float = 8.0        # address space per process
    max_steps: int = 20           # LABKIT_MAX_STEPS: training loops are capped while grading


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

    @property
    def score(self) -> float:
        return sum(c.points for c in self.checks if c.passed)


# ---------------------------------------------------------------- the pristine lab and hidden checks
def lab_notebook(lab: str, labs_dir: Path = ROOT / "labs") -> nbformat.NotebookNode:
    """The pristine lab whose metadata names ``lab``."""
    for path in sorted(labs_dir.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        if notebook.metadata.get("labkit", {}).get("lab") == lab:
            return notebook
    raise SystemExit(f"no lab {lab!r} in {labs_dir}")


@dataclass
class HiddenCheck:
    """A check the students never see. Its ``collect`` is sent to the kernel as source code,
    so it must be self-contained (it may use ``torch`` and the names in ``args``)."""
    check: Check
    args: tuple[str, ...]
    points: float


def hidden_checks(lab: str, hidden_dir: Path | None) -> list[HiddenCheck]:
    """The hidden checks of ``lab`` from ``<hidden_dir>/lab<lab>.py`` (none if there is no such file)."""
    path = (hidden_dir or ROOT / "hidden_checks") / f"lab{lab}.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location(f"hidden_checks_lab{lab}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.HIDDEN)


def hidden_cell(hidden: HiddenCheck) -> nbformat.NotebookNode:
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(hidden.check.collect))
    name = hidden.check.collect.__name__
    call = f"labkit.checks.record_with({hidden.check.id!r}, {name}, {', '.join(hidden.args)})"
    cell = nbformat.v4.new_code_cell(f"# Hidden check, added by the grader\nimport torch\n\n{source}\n{call}")
    cell.metadata["check"] = {"id": hidden.check.id, "points": hidden.points, "hidden": True}
    return cell


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
# Where people and programs keep files: everything under these is hidden from a graded run,
# except the paths the run needs (see private_paths).
SCAN_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/root", "/home", "/srv", "/mnt", "/media", "/autograder")


def private_paths(keep: list[Path], extra: list[Path]) -> list[Path]:
    """The folders and files to hide from a graded run: all of :data:`SCAN_ROOTS`, the
    repository's folder and ``extra`` (the hidden checks, the submissions, the reports), except
    the paths in ``keep`` (the grading folder, Python, labkit) and the folders leading to them."""
    keep = [k.resolve() for k in keep]
    hidden: list[Path] = []

    def visit(path: Path) -> None:
        if any(k == path for k in keep) or path.is_symlink():
            return
        if any(k.is_relative_to(path) for k in keep):
            try:
                children = sorted(path.iterdir())
            except OSError:
                return
            for child in children:
                visit(child)
        elif path.is_dir() or path.is_file():
            hidden.append(path)

    roots = [Path(r) for r in SCAN_ROOTS] + [ROOT.parent, Path.home()] + extra
    for root in sorted({r.resolve() for r in roots if r.exists()}):
        visit(root)
    # A path inside another hidden folder is gone already (and mounting over it would fail).
    unique = sorted(set(hidden))
    return [p for p in unique if not any(p != q and p.is_relative_to(q) for q in unique)]


def sandbox_prefix(hidden: list[Path]) -> tuple[list[str], str]:
    """The command prefix that isolates a run, and its description.

    With ``unshare`` (util-linux): a new network namespace (no network; only its own loopback,
    which the kernel needs to talk to nbval), a new PID namespace (when the run ends, or its
    first process dies, every process it started is killed, even ones that detached), and a new
    mount namespace where every ``hidden`` folder is covered by an empty tmpfs and every hidden
    file by /dev/null. Without root, a user namespace (``-r``) grants the same where the kernel
    allows it. If none of this is available, the run is not isolated, and the report says so.
    """
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    # A path that vanished since it was listed (another run's temporary file) needs no hiding.
    steps = [f"{ip} link set lo up"] + [
        f"{{ mount {'-t tmpfs -o size=4k none' if p.is_dir() else '--bind /dev/null'} {shlex.quote(str(p))}"
        f" 2>/dev/null || ! test -e {shlex.quote(str(p))}; }}" for p in hidden]
    script = " && ".join(steps)
    for extra in ([], ["-r"]):
        if unshare and ip:
            base = [unshare, *extra, "--net", "--pid", "--mount", "--fork", "--kill-child"]
            probe = subprocess.run([*base, "sh", "-c", script], capture_output=True, timeout=30)
            if probe.returncode == 0:
                return [*base, "sh", "-c", script + ' && exec "$@"', "sandbox"], \
                    f"unshare: no network, own PID namespace, {len(hidden)} private paths hidden"
    return [], "none (unshare or ip unavailable): no network isolation; files readable"


def grading_tmp() -> str | None:
    """/dev/shm when it is writable (it is hidden from graded runs, all but their own folder)."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def limits_prefix(limits: Limits) -> list[str]:
    """``prlimit`` (util-linux) caps every process of the run: address space, CPU time, file size."""
    prlimit = shutil.which("prlimit")
    if not prlimit:
        return []
    memory = int(limits.memory_gb * 2**30)
    return [prlimit, f"--as={memory}", f"--cpu={2 * limits.timeout}", f"--fsize={200 * 2**20}", "--core=0", "--"]


def run_nbval(folder: Path, limits: Limits, masked: list[Path]) -> tuple[str, str]:
    """Run ``pytest --nbval-lax`` on ``folder/submission.ipynb``; return its log tail and the sandbox used."""
    prefix, sandbox = sandbox_prefix(masked)
    command = [*limits_prefix(limits), *prefix, sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
               f"--nbval-cell-timeout={limits.cell_timeout}", "--junitxml=junit.xml", "-o", "junit_logging=no",
               "submission.ipynb"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABKIT_", "JUPYTER", "PYTEST"))}
    env |= {"LABKIT_GRADING_DIR": str(folder), "LABKIT_MAX_STEPS": str(limits.max_steps),
            "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(folder / "home"),
            "JUPYTER_RUNTIME_DIR": str(folder / "home" / "runtime")}
    (folder / "home").mkdir()
    with open(folder / "log.txt", "wb") as log:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            process.wait(timeout=limits.timeout)
            note = ""
        except subprocess.TimeoutExpired:
            note = f"\n[grader] wall-clock limit of {limits.timeout} s reached: run stopped"
        finally:
            _kill_group(process)
    with open(folder / "log.txt", "rb") as log:
        log.seek(max(0, (folder / "log.txt").stat().st_size - 20_000))
        return log.read().decode(errors="replace") + note, sandbox


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


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
def write_inputs(folder: Path, checks: dict[str, Check], seed: int) -> None:
    (folder / "inputs").mkdir()
    (folder / "outputs").mkdir()
    for offset, (check_id, spec) in enumerate(sorted(checks.items())):
        torch.save(spec.make_inputs(seed + offset), folder / "inputs" / f"{check_id}.pt")


# Batches grade submissions in threads; verification imports reference libraries lazily
# (transformers' lazy modules are not thread-safe), and is quick, so it runs one at a time.
VERIFY_LOCK = threading.Lock()


def score_check(check_id: str, spec: Check, folder: Path, seed_offset: int, seed: int, error: str) -> tuple[bool, str]:
    """Verify the outputs the kernel saved for one check, in this process."""
    outputs_path = folder / "outputs" / f"{check_id}.pt"
    if not outputs_path.exists():
        return False, error or "the check cell did not record outputs (it failed, or an earlier cell stopped the run)"
    try:
        outputs = torch.load(outputs_path, weights_only=True)
        if not isinstance(outputs, dict):
            raise AssertionError("the recorded outputs are not a dict")
        with VERIFY_LOCK:
            return True, spec.verify(spec.make_inputs(seed + seed_offset), outputs)
    except AssertionError as failure:
        return False, str(failure)[:1000]
    except Exception as error:  # a malformed or tampered outputs file, or outputs of the wrong kind
        return False, f"outputs could not be verified ({type(error).__name__}: {str(error)[:300]})"


def grade_one(path: Path, lab: str, out_dir: Path, limits: Limits, hidden_dir: Path | None,
              seed: int, labs_dir: Path = ROOT / "labs") -> Submission:
    name = path.stem
    result = Submission(name=name)
    start = time.perf_counter()
    notebook, reason = read_submission(path, lab)
    visible = checks_of_lab(lab)
    hidden = hidden_checks(lab, hidden_dir)
    pristine = lab_notebook(lab, labs_dir)
    all_checks = visible | {h.check.id: h.check for h in hidden}
    if notebook is None:
        result.status = reason
        result.checks = [CheckResult(i, p, False, f"not graded: {reason}", h)
                         for i, p, h in graded_checks(rebuild(pristine, pristine, [hidden_cell(h) for h in hidden]))]
    else:
        rebuilt = rebuild(notebook, pristine, [hidden_cell(h) for h in hidden])
        with tempfile.TemporaryDirectory(prefix="labkit-grade-", dir=grading_tmp()) as tmp:
            folder = Path(tmp)
            os.chmod(folder, 0o755)
            nbformat.write(rebuilt, folder / "submission.ipynb")
            (folder / "conftest.py").write_text(CONFTEST)
            write_inputs(folder, all_checks, seed)
            private = [ROOT / "hidden_checks", ROOT / "solutions", path.resolve().parent, out_dir.resolve()]
            if hidden_dir:
                private.append(hidden_dir.resolve())
            import labkit
            keep = [folder, Path(sys.prefix), Path(sys.base_prefix), Path(labkit.__file__).parent]
            masked = private_paths(keep, private)
            log, result.sandbox = run_nbval(folder, limits, masked)
            errors = cell_errors(folder, rebuilt)
            order = {check_id: i for i, check_id in enumerate(sorted(all_checks))}
            for check_id, points, is_hidden in graded_checks(rebuilt):
                passed, message = score_check(check_id, all_checks[check_id], folder, order[check_id], seed,
                                              errors.get(check_id, ""))
                result.checks.append(CheckResult(check_id, points, passed, message, is_hidden))
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            (out_dir / name / "log.txt").write_text(log)
    result.seconds = time.perf_counter() - start
    write_results(result, out_dir / name / "results.json")
    return result


# ---------------------------------------------------------------- reports
def write_results(result: Submission, path: Path) -> None:
    """Gradescope's results.json, with each check's id and message."""
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
                   "checks": [asdict(c) for c in result.checks]},
    }, indent=2))


def write_scores(results: list[Submission], path: Path) -> None:
    check_ids = list(dict.fromkeys(c.id for r in results for c in r.checks))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", *check_ids, "total", "max", "status"])
        for r in sorted(results, key=lambda r: r.name):
            by_id = {c.id: (c.points if c.passed else 0) for c in r.checks}
            writer.writerow([r.name, *(by_id.get(i, 0) for i in check_ids), r.score,
                             sum(c.points for c in r.checks), r.status])


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
    parser.add_argument("--seed", type=int, default=2026, help="seed of the check inputs")
    parser.add_argument("--cell-timeout", type=int, default=Limits.cell_timeout)
    parser.add_argument("--timeout", type=int, default=Limits.timeout, help="wall-clock seconds per submission")
    parser.add_argument("--memory-gb", type=float, default=Limits.memory_gb)
    parser.add_argument("--labs-dir", type=Path, default=ROOT / "labs")
    args = parser.parse_args(argv)
    limits = Limits(args.cell_timeout, args.timeout, args.memory_gb)
    paths = find_submissions(args.submissions)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {pool.submit(grade_one, p, args.lab, args.out, limits, args.hidden, args.seed, args.labs_dir): p
                   for p in paths}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            path = futures[future]
            try:
                result = future.result()
            except Exception as error:  # a grader bug must not stop the batch
                result = Submission(name=path.stem, status=f"grader error: {type(error).__name__}: {error}")
                write_results(result, args.out / path.stem / "results.json")
            results.append(result)
            total = sum(c.points for c in result.checks)
            print(f"[{done}/{len(paths)}] {result.name}: {result.score:g}/{total:g} "
                  f"({result.seconds:.0f} s){'' if result.status == 'graded' else ' - ' + result.status}", flush=True)
    write_scores(results, args.out / "scores.csv")
    passed = sum(c.passed for r in results for c in r.checks)
    failed = sum(not c.passed for r in results for c in r.checks)
    print(f"reports in {args.out}/ (results.json per submission, scores.csv)")
    print(f"{passed} passed, {failed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
