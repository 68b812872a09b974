"""The sandbox in which the grader runs a submitted notebook.

:func:`run` starts a command in a grading folder under:

- ``prlimit`` (util-linux): caps on address space, CPU time, file size and core dumps;
- ``unshare`` (util-linux): new network, PID and mount namespaces. No network (only the
  namespace's own loopback, which the kernel needs to talk to nbval); when the run ends, every
  process it started is killed, even ones that detached; every private path is covered by an
  empty tmpfs (a folder) or by /dev/null (a file).

Without root, a user namespace (``unshare -r``) grants the same where the kernel allows it. If
none of this is available, the run goes on without isolation, and the description says so.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Where people and programs keep files: everything under these is hidden from a graded run,
# except the paths the run needs (see private_paths).
SCAN_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/root", "/home", "/srv", "/mnt", "/media", "/autograder")


@dataclass
class Limits:
    cell_timeout: int = 120       # seconds per cell (nbval)
    timeout: int = 600            # wall-clock seconds per submission
    memory_gb: float = 8.0        # address space per process
    max_steps: int = 20           # LABKIT_MAX_STEPS: training loops are capped while grading


def private_paths(keep: list[Path], extra: list[Path]) -> list[Path]:
    """The folders and files to hide from a graded run: all of :data:`SCAN_ROOTS`, the folder above
    the repository, the home folder and ``extra``, except the paths in ``keep`` (the grading folder,
    Python, labkit) and the folders leading to them."""
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

    repository = Path(__file__).resolve().parent.parent
    roots = [Path(r) for r in SCAN_ROOTS] + [repository.parent, Path.home()] + extra
    for root in sorted({r.resolve() for r in roots if r.exists()}):
        visit(root)
    # A path inside another hidden folder is gone already (and mounting over it would fail).
    unique = sorted(set(hidden))
    return [p for p in unique if not any(p != q and p.is_relative_to(q) for q in unique)]


def namespace_prefix(hidden: list[Path]) -> tuple[list[str], str]:
    """The ``unshare`` command prefix that isolates a run, and its description ("none ..." without it)."""
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


def limits_prefix(limits: Limits) -> list[str]:
    """``prlimit`` caps every process of the run: address space, CPU time, file size, no core dumps."""
    prlimit = shutil.which("prlimit")
    if not prlimit:
        return []
    memory = int(limits.memory_gb * 2**30)
    return [prlimit, f"--as={memory}", f"--cpu={2 * limits.timeout}", f"--fsize={200 * 2**20}", "--core=0", "--"]


def scratch_root() -> str | None:
    """/dev/shm when it is writable (it is hidden from graded runs, all but their own folder)."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def run(command: list[str], folder: Path, env: dict[str, str], limits: Limits, hidden: list[Path],
        log_path: Path) -> tuple[str, str]:
    """Run ``command`` in ``folder``, sandboxed, its output to ``log_path``, for at most ``limits.timeout``
    seconds; return the last 20 kB of the log and the description of the sandbox."""
    prefix, description = namespace_prefix(hidden)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*limits_prefix(limits), *prefix, *command], cwd=folder, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            process.wait(timeout=limits.timeout)
            note = ""
        except subprocess.TimeoutExpired:
            note = f"\n[grader] wall-clock limit of {limits.timeout} s reached: run stopped"
        finally:
            _kill_group(process)
    with open(log_path, "rb") as log:
        log.seek(max(0, log_path.stat().st_size - 20_000))
        return log.read().decode(errors="replace") + note, description


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
