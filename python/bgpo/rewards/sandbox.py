"""The code sandbox: bubblewrap namespaces around the test harness of ``_harness.py``.

Threat model: the program is hostile.  It may try to pass without solving the task (exit tricks, objects
that equal anything, reading the tests, forging the verdict), to read or change the host (files,
processes, the trainer's environment, the network), or to exhaust it (disk, memory, processes, CPU,
leftover daemons).  Every run gets (bubblewrap, ``bwrap``):

- new pid, mount, network, ipc, uts, cgroup and user namespaces; inside, uid 65534 with no capabilities,
  ``no_new_privs`` and no further user namespaces; no ``/proc``, no network but its own loopback;
- a read-only root holding only ``/usr``, the interpreter's prefix and the harness; a private ``/tmp``
  (tmpfs of ``disk_limit`` bytes, the only writable place); the environment is PATH/HOME/LANG only;
- rlimits set by the judge before the program starts: CPU seconds, address space, processes (counted
  per user namespace, so per run), open files, file size, no core files, no POSIX message queues;
- the judge is pid 1 of its pid namespace: when it returns (or the trainer kills ``bwrap`` at the time
  limit) the kernel kills every process the program started, daemons included.

When the trainer runs as root, an outer ``bwrap`` (new pid/net/ipc/uts namespaces, the same read-only
view) drops to the host uid 65534 with ``setpriv`` before the inner one creates the user namespace, so
the program is never root on the host either (and the process limit applies: the kernel does not enforce
``RLIMIT_NPROC`` for root).  The outer pid 1 is bwrap's own reaper, not the inner bwrap: ``setpriv``
clears the parent-death signal, so only the reaper dies with the outer bwrap, taking the nested pid
namespaces with it.  The verdict comes from the judge over a private pipe with a per-run nonce
(see ``_harness.py``); no exit status is ever read as a verdict.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..ops._checks import check_int, check_real
from .base import RewardOutput

__all__ = ["Limits", "SandboxUnavailable", "run_program", "sandbox_problem", "require_sandbox", "INSTALL_HINT"]

INSTALL_HINT = ("install bubblewrap >= 0.8 (Debian/Ubuntu: apt-get install -y bubblewrap; Fedora: dnf install "
                "bubblewrap) and allow user namespaces, or opt in to unsandboxed execution with "
                "allow_unsandboxed_code: true (runs model-written code as your user)")
HARNESS = Path(__file__).resolve().parent / "_harness.py"
INSIDE_HARNESS = "/sandbox/harness.py"
SANDBOX_UID = 65534  # "nobody"
MAX_PAYLOAD = 1 << 20  # bytes of program + tests (the pipe is enlarged to hold them at once)
MAX_VERDICT = 1 << 16
_F_SETPIPE_SZ = 1031


class SandboxUnavailable(RuntimeError):
    """The sandbox does not work here and unsandboxed execution was not allowed."""


@dataclass(frozen=True)
class Limits:
    time: float = 10.0          # seconds of wall clock for the whole run
    memory: int = 1 << 30       # bytes of address space per process
    file_size: int = 1 << 20    # bytes per written file
    disk: int = 8 << 20         # bytes of the private /tmp (all files together)
    processes: int = 8          # processes and threads of the run (the judge and the runner are two)
    open_files: int = 64

    def __post_init__(self):
        check_real("time_limit", self.time, positive=True)  # seconds
        for name in ("memory", "file_size", "disk", "processes", "open_files"):
            check_int(name, getattr(self, name), low=1)

    def rlimits(self, sandboxed: bool = True) -> dict[str, int]:
        """The judge's setrlimit calls.  Unsandboxed, the process limit would count every process of the
        trainer's user (and root is exempt), so it is left out."""
        limits = {"RLIMIT_CPU": int(self.time) + 1, "RLIMIT_AS": self.memory, "RLIMIT_FSIZE": self.file_size,
                  "RLIMIT_NOFILE": self.open_files, "RLIMIT_CORE": 0, "RLIMIT_MSGQUEUE": 0}
        return {**limits, "RLIMIT_NPROC": self.processes} if sandboxed else limits


def _interpreter() -> tuple[str, str]:
    """(prefix to bind, executable inside it) of the base interpreter (a venv's packages stay outside)."""
    prefix = os.path.realpath(sys.base_prefix)
    executable = os.path.realpath(sys.executable)
    if not executable.startswith(prefix + os.sep):
        raise RuntimeError(f"the interpreter {executable} is not inside its prefix {prefix}")
    return prefix, executable


def _view(prefix: str, outer: bool) -> list[str]:
    """bwrap arguments of the read-only view: /usr, the interpreter's prefix, the harness.  In the inner
    bwrap of the root mode the sources are the outer sandbox's copies (the same paths)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        target = os.readlink(f"/{name}") if os.path.islink(f"/{name}") else None
        if target is not None:
            args += ["--symlink", target, f"/{name}"]
        elif os.path.isdir(f"/{name}"):
            args += ["--ro-bind", f"/{name}", f"/{name}"]
    if prefix != "/usr" and not prefix.startswith("/usr/"):
        parents = list(reversed(Path(prefix).parents))[1:]  # without "/"
        for parent in parents:  # created world-searchable, whatever the host's modes (e.g. /root 0700)
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", prefix, prefix]
    args += ["--perms", "0755", "--dir", "/sandbox",
             "--ro-bind", str(HARNESS) if outer else INSIDE_HARNESS, INSIDE_HARNESS]
    return args


def _command(limits: Limits, fds: tuple[int, int]) -> list[str]:
    prefix, executable = _interpreter()
    root = os.geteuid() == 0
    inner = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
             "--as-pid-1", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--clearenv",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
             *_view(prefix, outer=not root), "--dev", "/dev", "--size", str(limits.disk), "--tmpfs", "/tmp",
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp",
             executable, "-I", "-S", INSIDE_HARNESS, "judge", str(fds[0]), str(fds[1])]
    if not root:
        return inner
    uid = str(SANDBOX_UID)
    return ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", *_view(prefix, outer=True),
            "--proc", "/proc", "--dev", "/dev", "--dir", "/tmp", "--remount-ro", "/",
            "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            "/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--", "/usr/bin/" + inner[0], *inner[1:]]


def _unsandboxed_command(fds: tuple[int, int]) -> list[str]:
    return [sys.executable, "-I", "-S", str(HARNESS), "judge", str(fds[0]), str(fds[1])]


def run_program(program: str, test: str, *, setup: str = "", entry: str | None = None, limits: Limits = Limits(),
                sandboxed: bool = True) -> RewardOutput:
    """Run ``test`` against ``program`` (see ``_harness.py``); 1.0 if it passes, else 0.0 and why.
    ``setup``: trusted code run before the test, whose names win over the program's but ``entry``'s."""
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "program": program, "setup": setup, "entry": entry, "test": test,
                          "time": limits.time, "limits": limits.rlimits(sandboxed)}).encode()
    job_read, job_write = os.pipe()
    try:
        capacity = fcntl.fcntl(job_write, _F_SETPIPE_SZ, MAX_PAYLOAD)
    except OSError:  # fs.pipe-max-size below 1 MiB
        capacity = 1 << 16
    if len(payload) > capacity:
        os.close(job_read)
        os.close(job_write)
        return RewardOutput(0.0, f"program and tests over {capacity} bytes")
    verdict_read, verdict_write = os.pipe()
    fds = (job_read, verdict_write)
    with tempfile.TemporaryDirectory(prefix="bgpo-sandbox-") as workdir:
        try:
            os.write(job_write, payload)  # fits in the pipe: never blocks
            os.close(job_write)
            job_write = -1
            command = _command(limits, fds) if sandboxed else _unsandboxed_command(fds)
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
            process = subprocess.Popen(command, cwd=workdir, env=env, pass_fds=fds, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        except BaseException:
            os.close(verdict_read)
            raise
        finally:
            for fd in (job_read, verdict_write, job_write):
                if fd >= 0:
                    os.close(fd)
        try:
            verdict, stderr, timed_out = _collect(verdict_read, process.stderr, limits.time)
        finally:
            os.close(verdict_read)
            if sandboxed:
                process.kill()  # bwrap: the namespaces die with it (and its judge, pid 1, has returned)
            else:
                with contextlib.suppress(ProcessLookupError):  # the judge's group (a setsid daemon escapes)
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            process.stderr.close()
    if timed_out:
        return RewardOutput(0.0, f"timeout after {limits.time:g}s")
    return _verdict(verdict, nonce, stderr)


def _collect(verdict_fd: int, stderr, time_limit: float) -> tuple[bytes, bytes, bool]:
    """Read the verdict pipe and bwrap's stderr until both close or the time is up."""
    deadline = time.monotonic() + time_limit
    chunks: dict[int, list[bytes]] = {verdict_fd: [], stderr.fileno(): []}
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"", b"", True
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, MAX_VERDICT)
                size = sum(map(len, chunks[key.fd]))
                if not data or size > MAX_VERDICT:
                    selector.unregister(key.fd)
                else:
                    chunks[key.fd].append(data)
    return b"".join(chunks[verdict_fd]), b"".join(chunks[stderr.fileno()]), False


def _verdict(raw: bytes, nonce: str, stderr: bytes) -> RewardOutput:
    try:
        verdict = json.loads(raw)
        valid = (type(verdict) is dict and secrets.compare_digest(str(verdict.get("nonce")), nonce)
                 and type(verdict.get("passed")) is bool)
    except ValueError:
        valid = False
    if not valid:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        return RewardOutput(0.0, "no verdict from the sandbox" + (f": {lines[-1][:200]}" if lines else ""))
    return RewardOutput(1.0) if verdict["passed"] else RewardOutput(0.0, str(verdict.get("reason", ""))[:300])


@functools.lru_cache(maxsize=1)
def sandbox_problem() -> str | None:
    """None when the sandbox works here (a trivial program passes and a wrong one fails), else why not."""
    tools = ["bwrap", "setpriv"] if os.geteuid() == 0 else ["bwrap"]  # setpriv: util-linux
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"the code sandbox needs {' and '.join(missing)}, not found: {INSTALL_HINT}"
    try:
        ok = run_program("def f():\n    return 1\n", "assert f() == 1\n", limits=Limits(time=20.0))
        wrong = run_program("def f():\n    return 2\n", "assert f() == 1\n", limits=Limits(time=20.0))
    except (OSError, RuntimeError) as error:
        return f"the code sandbox does not start ({error}): {INSTALL_HINT}"
    if ok.score != 1.0 or wrong.score != 0.0:
        return f"the code sandbox does not work here ({ok.reason or wrong.reason or 'wrong verdicts'}): {INSTALL_HINT}"
    return None


def require_sandbox(allow_unsandboxed: bool = False) -> bool:
    """True when code runs sandboxed; False when it cannot and ``allow_unsandboxed``; else SandboxUnavailable."""
    if not isinstance(allow_unsandboxed, bool):
        raise ValueError(f"allow_unsandboxed: expected a bool, got {allow_unsandboxed!r}")
    problem = sandbox_problem()
    if problem is None:
        return True
    if allow_unsandboxed:
        return False
    raise SandboxUnavailable(f"refusing to run model-written code: {problem}")
