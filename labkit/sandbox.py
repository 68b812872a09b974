"""The sandbox in which the grader runs a submitted notebook.

:func:`run` starts a command in a grading folder under ``prlimit`` (address space, CPU time, file size, no
core dumps) and, with ``unshare`` (util-linux), in new network, PID and mount namespaces:

- no network: only the namespace's own loopback, which the kernel needs to talk to nbval;
- when the run ends, every process it started is killed, even ones that detached;
- private ``/tmp`` and ``/dev/shm``: fresh and empty for each run, gone with it; the grading folder
  appears at :data:`GRADING_FOLDER`;
- every private path (the hidden checks, the solutions, the submissions, the reports, other people's
  files, and the verify side of the checks, see :func:`verify_side`) covered by an empty tmpfs or by
  /dev/null; the repository, Python, the virtual environment and labkit mounted read-only;
- as root, the command runs as the unprivileged user ``nobody``, who can write only the grading
  folder's ``outputs/`` and ``home/`` and the private ``/tmp``.

Without root, a user namespace (``unshare -r``) grants all of this but the second user. If none of it
is available, the run goes on without isolation, and the description says so.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Where people and programs keep files: everything under these is hidden from a graded run,
# except the paths the run needs (see private_paths).
SCAN_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/root", "/home", "/srv", "/mnt", "/media", "/autograder")
GRADING_FOLDER = "/tmp/labkit-grading"  # where a run's folder appears inside the sandbox
NOBODY = 65534
LABKIT = Path(__file__).resolve().parent


@dataclass
class Limits:
    cell_timeout: int = 120       # seconds per cell (nbval)
    timeout: int = 600            # wall-clock seconds per submission
    memory_gb: float = 8.0        # address space per process
    max_steps: int = 20           # LABKIT_MAX_STEPS: training loops are capped while grading
    threads: int = 1              # CPU threads per kernel: the cores shared among the runs at once


def verify_side() -> list[Path]:
    """The checks' verify side, which the kernel must not import: every module of ``labkit/checks`` but the
    collect side (``kernel.py``) and the package's lazy ``__init__.py``, their compiled bytecode, and the
    records' schemas."""
    checks = LABKIT / "checks"
    return [checks / "__pycache__", checks / "schemas", *(p for p in sorted(checks.glob("*.py")) if p.name not in ("__init__.py",
                                                                                               "kernel.py"))]


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

    roots = [Path(r) for r in SCAN_ROOTS] + [LABKIT.parent.parent, Path.home()] + extra
    for root in sorted({r.resolve() for r in roots if r.exists()}):
        visit(root)
    for path in extra:  # a private path inside a kept one (the verify side of labkit) is hidden too
        if path.exists() and path.resolve() not in hidden and any(path.resolve().is_relative_to(k) for k in keep):
            hidden.append(path.resolve())
    # A path inside another hidden folder is gone already (and mounting over it would fail).
    unique = sorted(set(hidden))
    return [p for p in unique if not any(p != q and p.is_relative_to(q) for q in unique)]


def prepare(folder: Path, writable: list[str]) -> None:
    """Permissions for a kernel that runs as ``nobody``: ``writable`` subfolders (and the folder itself, where
    pytest writes its report) sticky and world-writable, so that nothing of the grader's can be replaced; the
    notebook ``nobody``'s own, for nbval's conftest to delete once it is read."""
    for path in [folder, *(folder / name for name in writable)]:
        path.mkdir(exist_ok=True)
        path.chmod(0o1777)
    if os.geteuid() == 0:
        os.chown(folder / "submission.ipynb", NOBODY, NOBODY)


def _closed_ancestor(path: Path) -> Path | None:
    """The highest folder above ``path`` that other users may not enter (such as /root), if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def _script(folder: Path, hidden: list[Path], readonly: list[Path]) -> str:
    """The shell commands that build the sandbox's file system, as root in the new mount namespace."""
    q = lambda p: shlex.quote(str(p))
    # The fresh /tmp and /dev/shm may cover the grading folder and the read-only paths (a repository cloned
    # under /tmp): each is held open across them (fd 3, 4, ...) and bound back, at GRADING_FOLDER or in place
    # (--no-canonicalize: mount(8) would resolve /proc/self/fd/N to its path, which now names the fresh tmpfs).
    covered = lambda p: p.is_relative_to("/tmp") or p.is_relative_to("/dev/shm")
    under = [p for p in readonly if covered(p) and not any(p != r and p.is_relative_to(r) for r in readonly)]
    held = [(GRADING_FOLDER, folder)] + [(str(p), p) for p in under]
    steps = [f"{shutil.which('ip')} link set lo up", *(f"exec {3 + i}< {q(p)}" for i, (_, p) in enumerate(held)),
             "mount -t tmpfs -o mode=1777 tmpfs /tmp", "mount -t tmpfs -o mode=1777 tmpfs /dev/shm"]
    steps += [f"mkdir -p {q(to)} && mount --no-canonicalize --bind /proc/self/fd/{3 + i} {q(to)} && exec {3 + i}<&-"
              for i, (to, _) in enumerate(held)]
    # A needed path under a folder others cannot enter moves onto a fresh, open copy of that folder.
    closed = {path: _closed_ancestor(path) for path in readonly}
    for top in sorted({t for t in closed.values() if t}):
        inside = [p for p, t in closed.items() if t == top]
        stashes = [f"/tmp/.labkit-stash{i}" for i in range(len(inside))]
        steps += [f"mkdir -p {s} && mount --bind {q(p)} {s}" for p, s in zip(inside, stashes)]
        steps += [f"mount -t tmpfs -o mode=755 tmpfs {q(top)}"]
        steps += [f"mkdir -p {q(p)} && mount --move {s} {q(p)}" for p, s in zip(inside, stashes)]
    steps += [f"mount --bind {q(p)} {q(p)} && mount -o remount,bind,ro {q(p)}" for p in readonly]
    # Then the masks (a bind of a folder would not carry them). A path that vanished since it was listed
    # (another run's temporary file) needs no hiding.
    steps += [f"{{ mount {'-t tmpfs -o size=4k none' if p.is_dir() else '--bind /dev/null'} {q(p)}"
              f" 2>/dev/null || ! test -e {q(p)}; }}" for p in hidden
              if not covered(p) or any(p.is_relative_to(r) for r in under)]
    return " && ".join(steps + [f"cd {GRADING_FOLDER}"])


def namespace_prefix(folder: Path, hidden: list[Path], readonly: list[Path]) -> tuple[list[str], str]:
    """The ``unshare`` command prefix that isolates a run, and its description ("none ..." without it)."""
    unshare, ip, setpriv = shutil.which("unshare"), shutil.which("ip"), shutil.which("setpriv")
    script = _script(folder, hidden, readonly)
    nobody = f"{setpriv} --reuid={NOBODY} --regid={NOBODY} --clear-groups --no-new-privs"
    for extra, user in (([], os.geteuid() == 0 and setpriv), (["-r"], None)):
        if unshare and ip:
            base = [unshare, *extra, "--net", "--pid", "--mount", "--fork", "--kill-child"]
            run_as = f"{nobody} " if user else ""
            probe = subprocess.run([*base, "sh", "-c", f"{script} && {run_as}true"], capture_output=True, timeout=30)
            if probe.returncode == 0:
                who = "as nobody" if user else "as the grader's user (no second user to switch to)"
                return [*base, "sh", "-c", f'{script} && exec {run_as}"$@"', "sandbox"], (
                    f"unshare: no network, own PID namespace, private /tmp, {len(hidden)} private paths hidden, "
                    f"read-only system, {who}")
    return [], "none (unshare or ip unavailable): no network isolation; files readable and writable"


def limits_prefix(limits: Limits) -> list[str]:
    """``prlimit`` caps every process of the run: address space, CPU time, file size, no core dumps."""
    prlimit = shutil.which("prlimit")
    if not prlimit:
        return []
    memory = int(limits.memory_gb * 2**30)
    return [prlimit, f"--as={memory}", f"--cpu={2 * limits.timeout}", f"--fsize={200 * 2**20}", "--core=0", "--"]


def scratch_root() -> str | None:
    """/dev/shm when it is writable (private to each graded run, which sees only its own folder)."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def run(command: list[str], folder: Path, env: dict[str, str], limits: Limits, hidden: list[Path],
        readonly: list[Path], log_path: Path) -> tuple[str, str]:
    """Run ``command`` in the grading ``folder``, sandboxed, its output to ``log_path``, for at most
    ``limits.timeout`` seconds; return the last 20 kB of the log and the description of the sandbox."""
    prefix, description = namespace_prefix(folder, hidden, readonly)
    if not prefix:  # no sandbox: the folder is where it is
        env = {**env, **{k: v.replace(GRADING_FOLDER, str(folder)) for k, v in env.items()}}
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
