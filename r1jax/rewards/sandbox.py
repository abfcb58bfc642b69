"""Run untrusted Python (model-written code) with bounded time, memory, processes and output.

Owns ``SandboxConfig``, ``run_python`` and ``sandbox_available``. Layers, outermost first:

1. **A private uid.** When the trainer runs as root, each run gets its own unprivileged uid and
   gid and no supplementary groups (util-linux ``setpriv``, see ``_setpriv_args``). The code then
   cannot signal or ptrace the trainer, cannot write root-owned files, and ``RLIMIT_NPROC`` (which
   the kernel never enforces for root) counts only this run's processes. As a non-root user the
   run keeps the trainer's uid and the process limit is set above the user's current task count.
2. **rlimits** via util-linux ``prlimit`` (so no Python ``preexec_fn`` runs between fork and exec,
   which is unsafe in a multi-threaded trainer): CPU seconds, address space, file size, number of
   processes, no core dumps, open files. The address-space limit is per process, so a run's
   memory is bounded by ``memory_bytes x max_processes`` (4 GiB by default; a cgroup would bound
   the sum, but needs a delegated cgroup tree that containers and TPU VMs do not all give),
   plus the kernel memory of the files it makes in its ``/tmp`` (the tmpfs's size caps their
   data, not their inodes: about 1 KiB each, freed when the run ends). The
   process limit is set inside the sandbox, where (Linux >= 5.14) the kernel counts the
   sandbox's own tasks only, so concurrent runs of one uid do not share it; on older kernels it
   is set outside, over the uid's tasks (as a non-root user, over its other runs too).
3. **bubblewrap** (Debian ``bubblewrap``): new user, PID, network, IPC, UTS and cgroup namespaces;
   a root containing only a read-only ``/usr`` (and the interpreter and its prefix's ``lib`` when
   it lives elsewhere), a fresh ``/proc``, a minimal ``/dev``, and a size-capped private
   ``/tmp``; every other path read-only; a cleared environment; ``--die-with-parent``;
   ``--new-session``. The code is copied in from a memfd, so nothing is written on the host.
   Because the sandbox has its own PID namespace, killing bubblewrap kills every process the
   code started, including daemons that double-forked and called ``setsid``.
4. **A wall-clock deadline** enforced by the reader loop: stdout/stderr are drained
   without blocking; at the deadline, or once stdout passes ``max_output_bytes``, the whole process
   group gets ``SIGKILL`` (nothing can ignore it). Then the sandbox's init (its PID from
   bubblewrap's ``--info-fd``) is killed and waited for through a pidfd, so ``run_python``
   returns only once every process the code started is gone.

Without a working bubblewrap, ``run_python`` refuses (``SandboxUnavailableError``) unless
``allow_unsandboxed=True``; that weaker mode keeps layers 1, 2 and 4 and logs a warning. As root
it also kills every process of the run's private uid afterwards (so daemons die too) and deletes
what the uid left in /tmp, /var/tmp and /dev/shm and its System V IPC objects. As a non-root
user it can do neither: the code runs as the trainer's own uid, so it can signal the trainer and
write its files, and a daemon that leaves the process group survives. Either way the code can
read world-readable host files and use the network.

Standard input is a sealed memfd (a regular file, as on a contest judge, not a pipe): fast-IO
idioms that size it (``os.read(0, os.fstat(0).st_size)``), ``mmap`` it or reopen ``/dev/stdin``
read it all, and the program cannot change it.

Interpreter: ``-I -S -B`` (isolated, no site-packages, no bytecode files), so code gets the
standard library only, as on a contest judge; this also makes startup ~5x faster. ``-X
int_max_str_digits=0`` lifts Python 3.11's 4300-digit limit on printing an int (a correct
big-integer answer raised ValueError; judges run interpreters without it, and the time limit
bounds the cost). A few lines
(``_LAUNCHER``) give back the ``exit()``/``quit()`` that ``-S`` leaves out, then run the program.
The trainer's own interpreter is used when the sandbox uid can reach it, else
``/usr/bin/python3``.
5. **A seccomp filter** (``_seccomp_filter``) refusing the few system calls that hold memory the
   address-space limit does not count: System V shared memory and message queues (a segment
   filled and detached stays in RAM until the IPC namespace goes) and ``memfd_create``; and the
   kernel keyring calls (``add_key``, ``request_key``, ``keyctl``: keyrings are not namespaced,
   so a run could read the trainer's session keyring or leave keys for the next run). They
   fail with ``EPERM``; everything else is allowed (the namespaces and the uid carry the rest).
   On architectures other than x86-64 and arm64 the filter is left out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import itertools
import json
import logging
import math
import os
import re
import select
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)

_MiB = 1 << 20
# Private uids/gids are drawn from [base, base + 2**24): far above distribution and container
# subuid ranges, below the 32-bit limit.
_PRIVATE_ID_BASE = 2_000_000_000
_PRIVATE_ID_COUNT = 1 << 24
_id_counter = itertools.count()
_SANDBOX_CODE_PATH = "/sandbox/main.py"
# What the interpreter runs (`-c`): `-S` leaves out site.py, and with it the `exit()` and `quit()`
# that contest code calls all the time (`print(-1); exit()`); site.setquit() adds just those (it
# does not touch sys.path). Then the program runs in __main__, read from `file PATH` (in the
# sandbox) or `fd N` (unsandboxed: an inherited memfd, no command-line length limit).
_INTERPRETER_FLAGS = ("-I", "-S", "-B", "-X", "int_max_str_digits=0")  # (module docstring)
_LAUNCHER = """\
import site, sys
site.setquit()
_how, _where = sys.argv.pop(1), sys.argv.pop(1)
sys.argv[0] = __file__ = _where if _how == "file" else "main.py"
with open(int(_where) if _how == "fd" else _where, "rb") as _f:
    _code = compile(_f.read(), sys.argv[0], "exec")
del site, sys, _how, _where, _f
exec(globals().pop("_code"))
"""


class SandboxUnavailableError(RuntimeError):
    """bubblewrap is not usable and unsandboxed execution was not explicitly allowed."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits for one run of untrusted code. All sizes in bytes, times in seconds."""

    timeout_s: float = 2.0  # wall clock per run, including interpreter start-up
    # Wall clock one completion's test runs may spend timing out (the code reward): past it the
    # rest of its tests are not run and fail; 0 = no limit. A program that hangs would otherwise
    # cost timeout_s for every test of its row; a correct one, however many tests, never
    # reaches it (only runs that time out count).
    hang_budget_s: float = 30.0
    # How the code reward compares a number in the output with the expected one: 0 = as text
    # ("0.50" is not "0.5"); eps > 0 = within an absolute or relative error of eps (the judges'
    # checker for real-valued answers, typically 1e-6); two integers must be equal.
    float_tolerance: float = 0.0
    cpu_time_s: int | None = None  # RLIMIT_CPU per process; None = ceil(timeout_s)
    memory_bytes: int = 512 * _MiB  # RLIMIT_AS (address space) per process; x max_processes per run
    file_size_bytes: int = 16 * _MiB  # RLIMIT_FSIZE: largest file the code may write
    tmpfs_bytes: int = 32 * _MiB  # size of the private /tmp
    max_processes: int = 8  # RLIMIT_NPROC for the run's uid (threads count)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 1 * _MiB  # stdout beyond this kills the run (counts as failed)
    max_stderr_bytes: int = 16 * 1024  # stderr kept for diagnostics; the rest is discarded
    max_code_bytes: int = 256 * 1024  # longer programs are not run
    allow_unsandboxed: bool = False  # without bubblewrap: True = rlimits only (logged), else refuse
    python: str | None = None  # interpreter; None = the trainer's if reachable, else python3

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxConfig.timeout_s must be > 0, got {self.timeout_s}")
        if not self.hang_budget_s >= 0:
            raise ValueError(
                f"SandboxConfig.hang_budget_s must be >= 0 (0 = no limit), got {self.hang_budget_s}"
            )
        if not 0 <= self.float_tolerance < math.inf:
            raise ValueError(
                f"SandboxConfig.float_tolerance must be >= 0 (0 = as text), got "
                f"{self.float_tolerance}"
            )
        for name in (
            "memory_bytes",
            "file_size_bytes",
            "tmpfs_bytes",
            "max_processes",
            "max_open_files",
            "max_output_bytes",
            "max_code_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.cpu_time_s is not None and self.cpu_time_s < 1:  # 0 kills every run at once
            raise ValueError(
                f"SandboxConfig.cpu_time_s must be >= 1 or None, got {self.cpu_time_s}"
            )


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Outcome of one run. ``ok`` = finished in time, exit status 0, output not truncated."""

    stdout: bytes
    stderr: bytes
    returncode: int | None  # None when the run never started (e.g. code too long)
    timed_out: bool
    output_truncated: bool
    wall_s: float
    sandboxed: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


# --- environment probing -----------------------------------------------------------------------


def _drops_privileges() -> bool:
    return os.geteuid() == 0


def _world_reachable(path: str) -> bool:
    """Whether an arbitrary unprivileged uid can execute ``path`` (every parent dir o+x)."""
    path = os.path.realpath(path)
    try:
        if (os.stat(path).st_mode & 0o005) != 0o005:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """[(first id, count)] usable in this user namespace, from /proc/self/{uid,gid}_map."""
    try:
        with open(path) as f:
            return [(int(inside), int(count)) for inside, _, count in map(str.split, f)]
    except (OSError, ValueError):
        return [(0, 1 << 32)]


@functools.cache
def _private_id_range() -> tuple[int, int]:
    """(base, count) of ids for per-run uids/gids that setuid/setgid accept here.

    Normally ``[_PRIVATE_ID_BASE, +2**24)``. Inside a user namespace that maps fewer ids (a
    remapped container often maps only 0..65535), the top 1024 ids of the highest mapped range are
    used instead, below 65534/65535 (nobody/nogroup).
    """
    maps = [_mapped_ranges("/proc/self/uid_map"), _mapped_ranges("/proc/self/gid_map")]

    def mapped(lo: int, hi: int) -> bool:
        return all(any(s <= lo and hi <= s + c for s, c in m) for m in maps)

    if mapped(_PRIVATE_ID_BASE, _PRIVATE_ID_BASE + _PRIVATE_ID_COUNT):
        return _PRIVATE_ID_BASE, _PRIVATE_ID_COUNT
    top = min(max(s + c for s, c in m) for m in maps)
    top = min(top, 65534)
    if top > 2048 and mapped(top - 1024, top):
        return top - 1024, 1024
    raise SandboxUnavailableError(
        "no free range of user ids to run untrusted code under (see /proc/self/uid_map); run the "
        "trainer as a non-root user instead"
    )


@functools.cache
def _interpreter(configured: str | None) -> str:
    """The real path of the interpreter the sandbox runs."""
    if configured is not None:
        path = shutil.which(configured) or configured
        if not os.path.exists(path):
            raise ValueError(f"SandboxConfig.python: interpreter {configured!r} does not exist")
        return os.path.realpath(path)
    own = os.path.realpath(sys.executable)
    if not _drops_privileges() or _world_reachable(own):
        return own
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if _world_reachable(candidate):
            return os.path.realpath(candidate)
    raise SandboxUnavailableError(
        f"no Python interpreter the sandbox uid can execute: {own} sits in a directory closed to "
        "other users; set SandboxConfig.python to a world-readable interpreter (e.g. "
        "/usr/bin/python3)."
    )


def _filesystem_args(python: str) -> list[str]:
    """bwrap arguments building the sandbox's root filesystem (everything read-only but /tmp)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(python))  # <prefix>/bin/python -> <prefix>
    if prefix not in ("/", "/usr") and not prefix.startswith("/usr/"):
        # What the interpreter runs from (the standard library, libpython, a conda prefix's
        # shared libraries), not its whole prefix: one built into $HOME or /opt showed the
        # program every file there (datasets with the expected outputs, tokens, keys).
        args += ["--ro-bind", python, python]
        for lib in ("lib", "lib64"):
            if os.path.isdir(path := os.path.join(prefix, lib)):
                args += ["--ro-bind", path, path]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def _setpriv_args(uid: int) -> list[str]:
    """argv prefix that runs the rest as ``uid``/``gid`` with no groups and no new privileges.

    util-linux ``setpriv`` rather than ``Popen(user=…)``: CPython cannot use ``vfork`` when it has
    to change ids itself, and a plain ``fork`` of a trainer holding gigabytes costs milliseconds
    per run in page-table copies; with the change done after ``exec`` every spawn stays cheap.
    """
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]


@functools.cache
def _pdeathsig_works() -> bool:
    """Whether this setpriv sets the parent-death signal (util-linux 2.33 and later)."""
    try:
        found = subprocess.run(["setpriv", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--pdeathsig" in found.stdout


def _limits_args(cfg: SandboxConfig, uid_is_private: bool, *, sandboxed: bool) -> list[str]:
    cpu = cfg.cpu_time_s if cfg.cpu_time_s is not None else max(1, math.ceil(cfg.timeout_s))
    nproc = []
    if not (sandboxed and _nproc_counts_per_namespace()):  # else set inside (`_inner_limits`)
        count = cfg.max_processes
        if not uid_is_private:
            # RLIMIT_NPROC is checked against every task the uid owns, trainer threads included
            # (and other runs of this user at the same moment: they share the headroom).
            count += _tasks_of_uid(os.getuid())
        nproc = [f"--nproc={count}"]
    return [
        "prlimit",
        f"--cpu={cpu}",
        f"--as={cfg.memory_bytes}",
        f"--fsize={cfg.file_size_bytes}",
        *nproc,
        f"--nofile={cfg.max_open_files}",
        "--core=0",
        "--",
    ]


def _inner_limits(cfg: SandboxConfig) -> list[str]:
    """argv prefix, run inside the sandbox, that limits the run's processes: in its own user
    namespace the kernel counts only the sandbox's tasks, so the limit is the run's whatever
    uid it has and whatever else that uid runs (several reward workers of a non-root trainer
    would otherwise share one count, and their runs fail at random)."""
    if not _nproc_counts_per_namespace():
        return []
    return ["prlimit", f"--nproc={cfg.max_processes}", "--"]


@functools.cache
def _nproc_counts_per_namespace() -> bool:
    """Whether RLIMIT_NPROC counts each user namespace's tasks apart (Linux >= 5.14, ucounts)."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return bool(match) and (int(match[1]), int(match[2])) >= (5, 14)


def _tasks_of_uid(uid: int) -> int:
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return count


# System calls refused in the sandbox, by architecture (AUDIT_ARCH_*, numbers): those holding
# memory RLIMIT_AS does not count, and the kernel keyrings, which no namespace separates (a run
# read the trainer's session keyring, and left keys there for the next test's run to read).
_SECCOMP_BLOCKED = {
    "x86_64": (
        0xC000003E,
        {"shmget": 29, "shmat": 30, "msgget": 68, "memfd_create": 319}
        | {"add_key": 248, "request_key": 249, "keyctl": 250},
    ),
    "aarch64": (
        0xC00000B7,
        {"shmget": 194, "shmat": 196, "msgget": 186, "memfd_create": 279}
        | {"add_key": 217, "request_key": 218, "keyctl": 219},
    ),
}


@functools.cache
def _seccomp_filter() -> bytes | None:
    """A classic-BPF seccomp program (what ``bwrap --seccomp`` reads): the `_SECCOMP_BLOCKED`
    calls of this architecture fail with EPERM, as does anything from another ABI (x86's x32 or
    i386 numbering would bypass the numbers); everything else is allowed. None elsewhere."""
    import platform
    import struct

    if platform.machine() not in _SECCOMP_BLOCKED:
        return None
    arch, calls = _SECCOMP_BLOCKED[platform.machine()]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
    allow, eperm = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    n = len(calls)
    # Layout: 0 arch, 1 arch check, 2 nr, 3 x32 check, 4..4+n-1 calls, then ALLOW, then EPERM.
    deny = 4 + n + 1
    program = [
        (load, 0, 0, 4),  # seccomp_data.arch
        (jeq, 0, deny - 2, arch),
        (load, 0, 0, 0),  # seccomp_data.nr
        (jge, deny - 4, 0, 0x40000000),  # x32 system calls
        *((jeq, deny - (5 + i), 0, nr) for i, nr in enumerate(calls.values())),
        (ret, 0, 0, allow),
        (ret, 0, 0, eperm),
    ]
    return b"".join(struct.pack("<HBBI", *insn) for insn in program)


def _bwrap_args(
    python: str, cfg: SandboxConfig, code_fd: int, info_fd: int, seccomp_fd: int | None = None
) -> list[str]:
    return [
        "bwrap",
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--info-fd",
        str(info_fd),
        # /tmp first: an interpreter that lives there is mounted on top of it, not hidden.
        "--size",
        str(cfg.tmpfs_bytes),
        "--tmpfs",
        "/tmp",
        *_filesystem_args(python),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "0444",
        "--file",
        str(code_fd),
        _SANDBOX_CODE_PATH,
        # Remount after the last mount: the root and /dev tmpfs bwrap made would be writable
        # and unbounded otherwise.
        "--remount-ro",
        "/dev",
        "--remount-ro",
        "/",
        "--chdir",
        "/tmp",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "PYTHONIOENCODING",
        "utf-8",
        "--",
        *_inner_limits(cfg),
        python,
        *_INTERPRETER_FLAGS,
        "-c",
        _LAUNCHER,
        "file",
        _SANDBOX_CODE_PATH,
    ]


_TRIAL_ATTEMPTS = 3  # a trivial run failing this many times in a row means bwrap is unusable
_TRIAL_RETRY_S = 60.0  # after which a failed trial is tried again (the failure may have passed)
_trials: dict[str, tuple[str | None, float]] = {}  # interpreter -> (problem, when found)


def _bwrap_problem(python: str) -> str | None:
    """None when bubblewrap runs a trivial program here, else why not.

    A working sandbox is remembered for the process; a problem only for `_TRIAL_RETRY_S`, and a
    failing trivial run is tried again before it counts (a run can fail for a passing reason:
    the machine out of processes or memory for a moment). A reward worker that kept one bad
    moment for good failed every code row after it (or, with `allow_unsandboxed`, ran them
    without the sandbox)."""
    cached = _trials.get(python)
    if cached is not None and (cached[0] is None or time.monotonic() < cached[1] + _TRIAL_RETRY_S):
        return cached[0]
    problem = _tools_problem()
    attempt = 0
    while problem is None:
        result = _run(
            "print(6 * 7)",
            b"",
            SandboxConfig(timeout_s=10.0, python=python),
            python,
            sandboxed=True,
        )
        if result.ok and result.stdout.strip() == b"42":
            break
        attempt += 1
        if attempt == _TRIAL_ATTEMPTS:
            detail = result.stderr.decode("utf-8", errors="replace").strip()[-300:]
            problem = f"bwrap failed a trivial run (exit {result.returncode}): {detail}"
        else:
            time.sleep(0.1 * attempt)
    _trials[python] = (problem, time.monotonic())
    return problem


def _tools_problem() -> str | None:
    """What the sandbox needs on PATH and is missing, or None."""
    if shutil.which("bwrap") is None:
        return "`bwrap` is not on PATH (Debian/Ubuntu package `bubblewrap`)"
    for tool in ("prlimit", "setpriv") if _drops_privileges() else ("prlimit",):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (util-linux)"
    return None


def sandbox_available(python: str | None = None) -> bool:
    """Whether bubblewrap sandboxing works on this machine for the given interpreter."""
    return _bwrap_problem(_interpreter(python)) is None


# --- running -----------------------------------------------------------------------------------

_warned_unsandboxed = False


def run_python(code: str, stdin: str | bytes = b"", cfg: SandboxConfig | None = None) -> RunResult:
    """Run ``code`` as a Python program with ``stdin``; return its output, bounded in every way.

    Never raises for anything the code does. Blocks at most ``cfg.timeout_s`` plus kill/reap time
    (tens of milliseconds).

    Args:
      code: program text (stray surrogates are replaced, so any ``str`` is accepted).
      stdin: bytes, or text encoded as UTF-8, fed to the program's standard input.
      cfg: limits; default ``SandboxConfig()``.
    Raises:
      SandboxUnavailableError: bubblewrap is unusable and ``cfg.allow_unsandboxed`` is False.
    """
    global _warned_unsandboxed
    cfg = cfg or SandboxConfig()
    python = _interpreter(cfg.python)
    problem = _bwrap_problem(python)
    if problem is not None and not cfg.allow_unsandboxed:
        raise SandboxUnavailableError(
            f"refusing to run untrusted code without a sandbox: {problem}. Install bubblewrap, or "
            "set allow_unsandboxed=True (rlimits and a private uid only) if you accept the risk."
        )
    if problem is not None and _drops_privileges() and shutil.which("setpriv") is None:
        raise SandboxUnavailableError("`setpriv` (util-linux) is needed to drop root privileges")
    if problem is not None and not _warned_unsandboxed:
        logger.warning(
            "RUNNING UNTRUSTED CODE WITHOUT A SANDBOX (allow_unsandboxed=True): only rlimits, %s "
            "and a wall-clock kill protect this machine. Reason: %s",
            "a private uid"
            if _drops_privileges()
            else "NOT a private uid (not root: the code "
            "runs as this user, and can signal this process and write its files)",
            problem,
        )
        _warned_unsandboxed = True
    data = stdin.encode("utf-8", errors="replace") if isinstance(stdin, str) else bytes(stdin)
    return _run(code, data, cfg, python, sandboxed=problem is None)


@functools.cache
def _adopt_orphans() -> None:
    """In a worker process (the rewards' pool), become the reaper of its descendants' orphans
    (once per process): bubblewrap exits before its sandbox init, whose orphan goes to PID 1,
    which in a container is often the trainer itself, and the trainer does not know to reap it:
    every run would leave a zombie holding a PID. The worker reaps it (`_kill_namespace`). The
    main process is left as it is (a subreaper adopts every orphan of every descendant, and it
    would reap only these): there the orphan goes to PID 1, which reaps it, or which is this
    process, and then it is reaped here too."""
    import ctypes
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _run(code: str, stdin: bytes, cfg: SandboxConfig, python: str, *, sandboxed: bool) -> RunResult:
    source = code.encode("utf-8", errors="replace")
    if len(source) > cfg.max_code_bytes:
        return RunResult(b"", b"code too long", None, False, False, 0.0, sandboxed)
    private = _drops_privileges()
    with _private_uid() if private else contextlib.nullcontext() as uid:
        return _run_as(source, stdin, cfg, python, sandboxed, uid)


def _run_as(
    source: bytes, stdin: bytes, cfg: SandboxConfig, python: str, sandboxed: bool, uid: int | None
) -> RunResult:
    """`_run` as private `uid` (None: as this process's own uid)."""
    private = uid is not None
    drop = _setpriv_args(uid) if private else []
    if not sandboxed and _pdeathsig_works():
        # Killed with this process (bubblewrap's --die-with-parent does it in the sandbox): a
        # worker ended mid-run (a deadline, the OOM killer) skips the clean-up below, and the
        # program lived on as an orphan.
        drop = (drop or ["setpriv", "--"])[:-1] + ["--pdeathsig=KILL", "--"]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    code_fd = os.memfd_create("r1jax-sandbox-code")  # close-on-exec but for pass_fds
    os.write(code_fd, source)
    os.lseek(code_fd, 0, os.SEEK_SET)
    own_fds: list[int] = [code_fd]  # closed in the parent once the run is over
    info_r = -1
    if sandboxed:
        _adopt_orphans()
        info_r, info_w = os.pipe()  # bwrap reports the sandbox init's PID here
        os.set_blocking(info_r, False)
        own_fds.append(info_r)
        seccomp_fd = None
        if (program := _seccomp_filter()) is not None:
            seccomp_fd = os.memfd_create("r1jax-sandbox-seccomp")
            os.write(seccomp_fd, program)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            own_fds.append(seccomp_fd)
        own_fds.append(info_w)  # last: closed first, below
        argv = (
            drop
            + _limits_args(cfg, private, sandboxed=True)
            + _bwrap_args(python, cfg, code_fd, info_w, seccomp_fd)
        )
        pass_fds: tuple[int, ...] = tuple(
            fd for fd in (code_fd, info_w, seccomp_fd) if fd is not None
        )
    else:
        launch = [python, *_INTERPRETER_FLAGS, "-c", _LAUNCHER, "fd", str(code_fd)]
        argv = drop + _limits_args(cfg, private, sandboxed=False) + launch
        pass_fds = (code_fd,)
    stdin_fd = _sealed_file(stdin)  # fd 0 of the program, closed in the parent after the start
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=stdin_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd="/",
            pass_fds=pass_fds,
            start_new_session=True,
            close_fds=True,
        )
    except (OSError, ValueError) as e:  # e.g. argument list too long for `-c`
        for fd in own_fds:
            os.close(fd)
        return RunResult(b"", str(e).encode(), None, False, False, 0.0, sandboxed)
    finally:
        os.close(stdin_fd)
    if sandboxed:
        os.close(own_fds.pop())  # our copy of info_w: the pipe then ends when bwrap's does
    try:
        killed = []  # (the uid killed when the exit was seen: not again below)
        on_exit = (
            None if sandboxed or not private else lambda: killed.append(_kill_uid(python, uid))
        )
        out, err, timed_out, truncated = _communicate(proc, start + cfg.timeout_s, cfg, on_exit)
    finally:
        # (bubblewrap is not reaped until `_kill_group`: its PID names it and no later process)
        init = _sandbox_init(info_r, proc) if sandboxed else None
        _kill_group(proc)
        if init is not None:
            _kill_namespace(init)
        elif private and not sandboxed:
            if not killed:
                _kill_uid(python, uid)
            _remove_files_of(uid)
        for fd in own_fds:
            os.close(fd)
    wall = time.monotonic() - start
    if sandboxed and err.startswith(b"bwrap:"):  # (or a program's own stderr: kept on one line)
        logger.warning("sandbox setup failed? %r", err[:300].decode("utf-8", errors="replace"))
    return RunResult(bytes(out), bytes(err), proc.returncode, timed_out, truncated, wall, sandboxed)


def _sealed_file(data: bytes) -> int:
    """A memfd holding `data`, at offset 0, sealed against writes and resizing (the program gets
    it as its standard input; it cannot alter it or grow it into unaccounted memory)."""
    fd = os.memfd_create("r1jax-sandbox-stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _communicate(
    proc: subprocess.Popen, deadline: float, cfg: SandboxConfig, on_exit=None
) -> tuple[bytearray, bytearray, bool, bool]:
    """Drain stdout/stderr without blocking, until exit, deadline or output cap. `on_exit()` is
    called once the program has exited, before the pipes are drained (the unsandboxed mode kills
    the run's uid there: a daemon's later output is not the program's)."""
    out, err = bytearray(), bytearray()
    timed_out = truncated = False
    with selectors.DefaultSelector() as sel:
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            sel.register(stream, selectors.EVENT_READ)
        exited_at = None
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = not _exited(proc)
                break
            if _exited(proc):
                # The program is done; anything still holding our pipes open is a straggler (an
                # unsandboxed daemon). Drain briefly, then stop waiting for it.
                if exited_at is None and on_exit is not None:
                    on_exit()
                    on_exit, now = None, time.monotonic()  # (the drain's time starts after it)
                exited_at = exited_at or now
                if now - exited_at > 0.1:
                    break
            for key, _ in sel.select(timeout=min(deadline - now, 0.05)):
                stream = key.fileobj
                try:
                    chunk = os.read(stream.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(stream)
                    continue
                if stream is proc.stdout:
                    out += chunk
                    if len(out) > cfg.max_output_bytes:
                        del out[cfg.max_output_bytes :]
                        truncated = True
                else:
                    err += chunk[: max(0, cfg.max_stderr_bytes - len(err))]
            if truncated:
                break
    if not (timed_out or truncated) and not _exited(proc):
        # Both pipes ended (the program closed its stdout and stderr) but it runs on: its exit
        # status still counts, so wait for it (to the deadline) before the group is killed.
        timed_out = not _wait_unreaped(proc, deadline - time.monotonic())
        if on_exit is not None:
            on_exit()
    return out, err, timed_out, truncated


def _exited(proc: subprocess.Popen) -> bool:
    """Whether `proc` has exited, without reaping it (`Popen.poll` would): until `_kill_group`
    its zombie keeps its PID and process group number, which a later process could otherwise
    be given, and be killed in its place."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_unreaped(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `proc` to exit, without reaping it; whether it did."""
    try:
        pidfd = os.pidfd_open(proc.pid)  # (unreaped: the PID is still this process's)
    except OSError:  # (Linux < 5.3: no pidfds)
        deadline = time.monotonic() + timeout
        while not _exited(proc) and time.monotonic() < deadline:
            time.sleep(0.01)
        return _exited(proc)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(pidfd)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (bwrap's death then tears down its PID namespace), then
    reap the process (the group's number stays its own until then: `_exited`)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for stream in (proc.stdout, proc.stderr):
        try:
            stream.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # unreachable in practice: SIGKILL cannot be ignored
        logger.error("sandboxed process %d did not die after SIGKILL", proc.pid)


def _kill_uid(python: str, uid: int) -> None:
    """SIGKILL every process of a private uid (unsandboxed mode: daemons that left the group).

    ``kill(-1, …)`` from a process running as that uid reaches exactly the uid's processes, in
    one kernel pass that a fork storm cannot outrun.
    """
    killer = "import os, signal\ntry:\n os.kill(-1, signal.SIGKILL)\nexcept OSError:\n pass"
    subprocess.run(
        _setpriv_args(uid) + [python, "-I", "-S", "-c", killer],
        env={},
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=10,
        check=False,
    )


@contextlib.contextmanager
def _private_uid():
    """A per-run uid (as root) that no other run of this machine holds until the run is over.

    Candidates start from this process's pid and a counter; each is reserved by a lock on its
    byte of one lock file, so concurrent reward workers never share a uid even where only 1024
    ids are usable (a remapped container): two runs with one uid would share a process limit, and
    the unsandboxed mode's cleanup of one (every process of its uid) would kill the other. Without
    a usable lock file, the candidate is taken as it is.
    """
    base, count = _private_id_range()
    first = (((os.getpid() & 0xFFFF) << 8) | (next(_id_counter) & 0xFF)) % count
    fd = _uid_lock_file()
    k = None  # stays None: every id held, or no usable lock file (the first candidate, shared)
    if fd is not None:
        with _held_lock:
            for candidate in itertools.chain(range(first, count), range(first)):
                if candidate in _held:
                    continue  # (record locks do not exclude this process's own threads)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, candidate)
                except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held elsewhere
                    continue
                except OSError:  # ENOLCK, EINVAL...: locks do not work on this file system
                    break
                _held.add(candidate)
                k = candidate
                break
    try:
        yield base + (first if k is None else k)
    finally:
        if k is not None:
            with _held_lock:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, k)
                _held.discard(k)


_held: set[int] = set()  # ids this process holds
_held_lock = threading.Lock()
_lock_fds: dict[int, int | None] = {}  # pid -> its lock file (record locks are per process)


def _uid_lock_file() -> int | None:
    """This process's descriptor of the machine's uid lock file (root's, in /tmp: one for every
    job, whatever its TMPDIR), or None when it cannot be used."""
    pid = os.getpid()
    if pid not in _lock_fds:
        path = "/tmp/r1jax-sandbox-uids.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            if os.fstat(fd).st_uid != os.geteuid():  # (someone else's file: not trusted)
                os.close(fd)
                fd = None
        except OSError:
            fd = None
        _lock_fds[pid] = fd
    return _lock_fds[pid]


# Where an unsandboxed program can leave files behind (world-writable), and its System V IPC.
_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# /proc/sysvipc/<kind>: ipcrm's flag, and the columns of the owner's and the creator's uid.
_SYSV_IPC = {"shm": ("-m", 7, 9), "msg": ("-q", 7, 9), "sem": ("-s", 4, 6)}


def _remove_files_of(uid: int) -> None:
    """Unsandboxed mode, after the run's processes are gone: delete what its private uid left in
    the shared temp directories (their top-level entries it owns, with what is inside) and its
    System V shared memory, queues and semaphores, which would otherwise hold disk and memory
    after every run."""
    for folder in _SHARED_DIRS:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass
    for kind, (flag, owner, creator) in _SYSV_IPC.items():
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        for row in rows:
            if len(row) > creator and str(uid) in (row[owner], row[creator]):
                subprocess.run(["ipcrm", flag, row[1]], capture_output=True, check=False)


def _sandbox_init(info_fd: int, proc: subprocess.Popen) -> int | None:
    """A pidfd of the sandbox's init, from the PID bubblewrap reported on `info_fd` (read
    without waiting); None when bubblewrap made none or the init is gone.

    Call it while bubblewrap (`proc`) is not yet reaped, so that its PID is still its own: the
    process with the reported PID is the init only if its parent is bubblewrap, or this process
    when it is the orphan's reaper (bubblewrap exits first; the init's zombie then waits for this
    process to reap it). Another reaper (PID 1) may have reaped it already and its PID been given
    to an unrelated process, which the kill would then reach."""
    try:
        pid = int(json.loads(os.read(info_fd, 4096) or b"{}")["child-pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # bwrap died before creating the namespace
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone already (and its namespace with it)
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            parent = int(f.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        parent = None
    # (the pidfd names whatever had the PID when it was opened, and still has it now; an init
    # of a PID namespace below ours, as a child of this process, is an orphaned sandbox's)
    ours = parent == proc.pid or (parent == os.getpid() and _reaps_orphans())
    if ours and _namespace_depth(pid) > _namespace_depth("self"):
        return pidfd
    os.close(pidfd)
    return None


def _namespace_depth(pid: int | str) -> int:
    """How many PID namespaces process `pid` is in (its NSpid line; 0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((len(x.split()) - 1 for x in f if x.startswith("NSpid:")), 0)
    except OSError:
        return 0


def _reaps_orphans() -> bool:
    """Whether orphans of this process's descendants come to it (PID 1, or a subreaper)."""
    import ctypes

    if os.getpid() == 1:
        return True
    flag = ctypes.c_int(0)
    try:  # PR_GET_CHILD_SUBREAPER
        return ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0) == 0 and bool(flag.value)
    except (OSError, AttributeError):
        return False


def _kill_namespace(pidfd: int) -> None:
    """SIGKILL the sandbox's init (`pidfd`, from `_sandbox_init`; closed here) and wait until
    its PID namespace is empty.

    Killing bubblewrap alone already dooms the namespace (``--die-with-parent``), but
    asynchronously; this makes ``run_python`` return only once every process the code started,
    daemons included, is gone. The kernel lets a namespace's init finish exiting only after all
    other members have, so "init has exited" (its pidfd turns readable) means "namespace empty".
    """
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    poller = select.poll()  # (not select.select: a trainer may hold more than 1024 files)
    poller.register(pidfd, select.POLLIN)
    try:
        if not poller.poll(5000):
            logger.error("sandbox PID namespace did not empty after SIGKILL")
        else:
            # bubblewrap exits before its sandbox init, which is orphaned: when this process is
            # the reaper (PID 1 of a container, a subreaper) it must reap it, or every run leaves
            # a zombie holding a PID.
            try:
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                pass  # not our child: whoever adopted it reaps it
    finally:
        os.close(pidfd)
