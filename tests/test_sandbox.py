"""The hostile-code suite: model-written programs that try to hurt the trainer or the host.

Each program is scored by ``code_reward`` against a test whose expected output is what the
program would print *if the attack worked*, so a leaky sandbox turns into reward 1.0 and a failing
test. Every case also checks: the call returns within the time limit (plus start-up/kill slack),
no process of the run survives it, and the host side effects it tried are absent.
"""

import contextlib
import dataclasses
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from r1jax.rewards import SandboxConfig, SandboxUnavailableError, code_reward, run_python
from r1jax.rewards import sandbox as sandbox_lib
from r1jax.rewards.compose import build_reward_fn

pytestmark = pytest.mark.skipif(
    not sandbox_lib.sandbox_available(), reason="bubblewrap not usable here"
)

LIMIT_S = 1.0
SLACK_S = 1.5  # interpreter start-up, SIGKILL and reaping on a loaded 2-core machine
CFG = SandboxConfig(timeout_s=LIMIT_S)


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def score(code: str, expected: str, stdin: str = "", cfg: SandboxConfig = CFG) -> float:
    start = time.monotonic()
    [reward] = code_reward(
        [fenced(code)], tests=[[{"input": stdin, "output": expected}]], sandbox=cfg
    )
    elapsed = time.monotonic() - start
    assert elapsed < cfg.timeout_s + SLACK_S, f"took {elapsed:.2f}s"
    return reward


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, parent pid, ...]."""
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()


def _parent(pid: int) -> int:
    return int(_stat(pid)[1])


def _other_test_workers() -> set[int]:
    """PIDs of the other pytest-xdist workers (their sandboxes run concurrently with ours)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return set()
    me, controller = os.getpid(), os.getppid()
    siblings = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) != me and _parent(int(pid)) == controller:
                siblings.add(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    return siblings


def _descends_from(pid: int, ancestors: set[int]) -> bool:
    while pid > 1:
        if pid in ancestors:
            return True
        pid = _parent(pid)
    return False


def _ticks_since_boot() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def sandbox_processes(since: int = 0) -> list[str]:
    """Live processes owned by a private sandbox uid and started at or after ``since`` (clock ticks
    since boot; only meaningful when running as root), described for the failure message.

    Zombies are skipped: bubblewrap's in-namespace init is reparented to the host's init when
    bubblewrap exits, and stays a zombie (dead, holding only a PID) until that init reaps it.
    Sandboxes started by another pytest-xdist worker (the reward tests run there concurrently) are
    not ours; a program that escaped its sandbox is reparented to init, so it is still counted.
    Nor is anything started before the test (another program's sandbox, or a survivor of an
    earlier test, which that test's check reported).
    """
    found = []
    others = _other_test_workers()
    base, count = sandbox_lib._private_id_range()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                uid = os.stat(f"/proc/{pid}").st_uid
                if not base <= uid < base + count or _descends_from(int(pid), others):
                    continue
                state, ppid, pgid, *rest = _stat(int(pid))
                started = int(rest[16])  # /proc/<pid>/stat field 22
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
                # An empty cmdline: exiting, memory already freed.
                if state != "Z" and cmdline and started >= since:
                    args = cmdline.replace(b"\0", b" ").decode(errors="replace")
                    found.append(
                        f"pid {pid} ppid {ppid} pgid {pgid} uid {uid} state {state}, started "
                        f"{(started - since) / os.sysconf('SC_CLK_TCK'):.2f}s into the test: "
                        f"{args[:40]}...{args[-50:]}"
                    )
            except (OSError, IndexError):
                continue
    return found


@pytest.fixture(autouse=True)
def nothing_survives():
    since = _ticks_since_boot() - 1
    yield
    # Reaping a killed sandbox takes a moment on a loaded machine; a survivor outlives the wait
    # (every hostile program here tries to live for tens of seconds).
    # The other worker's runs show up as orphans for an instant while it kills them, so only a
    # process seen in every snapshot over the wait counts.
    deadline = time.monotonic() + 2.0
    survivors = sandbox_processes(since)
    while survivors and time.monotonic() < deadline:
        time.sleep(0.05)
        survivors = sandbox_processes(since)
    for line in survivors:  # killed, so that one leak fails one test and not every later one
        try:
            os.kill(int(line.split()[1]), signal.SIGKILL)
        except OSError:
            pass
    assert survivors == []


def test_good_program_passes():
    # The baseline that makes every 0.0 below meaningful.
    assert score("print(sum(map(int, input().split())))", "5", stdin="2 3") == 1.0


def test_infinite_loop():
    assert score("while True:\n    pass", "done") == 0.0


def test_sleep_past_the_limit():
    assert score("import time\ntime.sleep(30)\nprint('done')", "done") == 0.0


def test_ignores_sigterm():
    code = (
        "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\ntime.sleep(30)\nprint('done')"
    )
    assert score(code, "done") == 0.0


def test_memory_bomb():
    assert score("x = bytearray(8 * 1024**3)\nprint('done')", "done") == 0.0
    grow = "x = []\nwhile True:\n    x.append(bytearray(100 * 1024**2))\n    print(len(x))"
    assert score(grow, "100") == 0.0


def test_stdout_flood_and_enormous_output():
    assert score("while True:\n    print('x' * 1000)", "x") == 0.0
    start = time.monotonic()
    result = run_python("import sys\nsys.stdout.write('y' * 50_000_000)", cfg=CFG)
    assert result.output_truncated and len(result.stdout) == CFG.max_output_bytes
    assert time.monotonic() - start < LIMIT_S + SLACK_S
    assert score("import sys\nsys.stdout.write('y' * 50_000_000)", "y" * 5_000_000) == 0.0
    # A test whose expected output is past the cap raises it for that test (1.4 MB: 2e5 numbers).
    numbers = " ".join(map(str, range(1_000_000, 1_200_000)))
    assert score("print(*range(1_000_000, 1_200_000))", numbers) == 1.0


def test_each_run_has_its_own_process_limit():
    """A non-root trainer's runs shared one process limit (its user's tasks + max_processes), so
    concurrent reward workers failed each other's runs at random. The limit is now set inside
    the sandbox's user namespace, where the kernel counts that run's tasks alone: with
    max_processes=3 (the sandbox's init, the program, one thread) a run starts one thread and
    not two, whoever runs it and whatever else its uid runs."""
    if not sandbox_lib._nproc_counts_per_namespace():
        pytest.skip("Linux < 5.14 counts RLIMIT_NPROC per user, not per user namespace")
    cfg = SandboxConfig(timeout_s=LIMIT_S, max_processes=3)
    threads = (
        "import threading, time\n"
        "t = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range({})]\n"
        "for x in t: x.start()\nfor x in t: x.join()\nprint(len(t))"
    )
    assert run_python(threads.format(1), cfg=cfg).stdout == b"1\n"
    result = run_python(threads.format(2), cfg=cfg)
    assert b"can't start new thread" in result.stderr and not result.ok


def test_exit_and_quit_work_as_on_a_judge():
    """`-S` (no site.py) left out exit() and quit(): `print(-1); exit()` ended in a NameError
    and failed the test it had passed."""
    assert score("print(-1)\nexit()\nprint(2)", "-1") == 1.0
    assert (
        score("import sys\nprint(sys.argv[0], __name__)\nquit(0)", "/sandbox/main.py __main__")
        == 1.0
    )
    result = run_python("quit(3)", cfg=CFG)
    assert result.returncode == 3
    assert score("print(__file__)", "/sandbox/main.py") == 1.0
    # Python 3.11 refuses to print an int of more than 4300 digits; a judge's interpreter
    # does not (a correct big-integer answer raised ValueError and scored 0).
    assert score("print(10 ** 5000)", "1" + "0" * 5000) == 1.0


def test_fork_storm():
    code = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
        "        pass\nprint('done')"
    )
    assert score(code, "done") == 0.0


def test_fork_storm_does_not_starve_its_neighbours():
    storm = fenced(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    )
    good = fenced(
        "import subprocess\nprint(subprocess.run(['echo', 'hi'], capture_output=True,"
        " text=True).stdout.strip())"
    )
    tests = [[{"input": "", "output": "hi"}]] * 4
    with build_reward_fn([("code", 1.0, {"sandbox": CFG})], num_workers=2) as fn:
        out = fn([storm, good, storm, good], tests=tests)
    assert out.per_reward[0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_a_run_holds_at_most_memory_bytes_times_max_processes():
    """The address-space limit is per process, so a run's memory bound is the product: children
    that each fill 80 MiB under a 96 MiB limit stop at max_processes - 1 of them (a run holding
    memory_bytes x 32 processes, 16 GiB by default, could take the trainer down with it)."""
    cfg = dataclasses.replace(CFG, memory_bytes=96 << 20, max_processes=3, timeout_s=10.0)
    code = (
        "import os, time\n"
        "alive = 0\n"
        "for _ in range(6):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        block = bytearray(80 << 20)\n"
        "        time.sleep(2)\n"
        "        os._exit(0)\n"
        "    alive += 1\n"
        "print(alive)\n"
    )
    result = run_python(code, cfg=cfg)
    assert result.ok, result.stderr
    assert int(result.stdout) <= 2  # with the parent: 3 processes of at most 96 MiB each


DAEMON_MARKER = "31.41592"  # sleep's argument: a string to find in the process table afterwards
DAEMON = (
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(0.3)\n"
    "        try:\n"
    "            print('escaped', flush=True)\n"
    "        except OSError:\n"
    "            pass\n"
    f"        os.execv('/bin/sleep', ['sleep', '{DAEMON_MARKER}'])\n"
    "    os._exit(0)\n"
)


def test_daemon_cannot_outlive_the_run():
    assert score(DAEMON, "escaped") == 0.0
    time.sleep(0.6)  # longer than the daemon's delay: had it survived, it would be sleeping now
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"sleep {DAEMON_MARKER}" not in ps


def test_an_interpreter_elsewhere_shows_the_sandbox_its_library_only():
    """An interpreter outside /usr (built into $HOME or /opt) had its whole prefix mounted: the
    program read every file there. One under /tmp was hidden by the private /tmp."""
    import shutil
    import tempfile

    python = sandbox_lib._interpreter(None)
    stdlib = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    prefix = tempfile.mkdtemp(prefix="r1jax-prefix-")  # (pytest's are closed to other uids)
    try:
        os.chmod(prefix, 0o755)
        for folder in ("bin", "lib", "secret"):
            os.makedirs(os.path.join(prefix, folder))
        shutil.copy2(python, os.path.join(prefix, "bin", "python3"))
        os.symlink(stdlib, os.path.join(prefix, "lib", os.path.basename(stdlib)))
        pathlib.Path(prefix, "secret", "token").write_text("hf_SECRET")
        cfg = SandboxConfig(timeout_s=5.0, python=os.path.join(prefix, "bin", "python3"))
        look = "import os, sys, json\nprint(sys.prefix, *sorted(os.listdir(sys.prefix)))"
        assert score(look, f"{prefix} bin lib", cfg=cfg) == 1.0
        steal = f"print(open({prefix + '/secret/token'!r}).read())"
        assert score(steal, "hf_SECRET", cfg=cfg) == 0.0
    finally:
        shutil.rmtree(prefix)


def test_cannot_write_or_delete_host_files(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("precious")
    planted = tmp_path / "planted.txt"
    code = (
        "import os, shutil\n"
        "hits = []\n"
        f"for action in (lambda: os.remove({str(sentinel)!r}),\n"
        f"               lambda: open({str(sentinel)!r}, 'w').write('gone'),\n"
        f"               lambda: open({str(planted)!r}, 'w').write('x'),\n"
        "               lambda: open('/usr/pwned', 'w').write('x'),\n"
        "               lambda: open('/etc/pwned', 'w').write('x'),\n"
        "               lambda: shutil.rmtree('/usr/share/doc')):\n"
        "    try:\n"
        "        action()\n"
        "        hits.append('x')\n"
        "    except Exception:\n"
        "        pass\n"
        "print('escaped' if hits else 'contained')"
    )
    assert score(code, "escaped") == 0.0
    assert score(code, "contained") == 1.0  # the program did run every attempt
    assert sentinel.read_text() == "precious"
    assert not planted.exists() and not os.path.exists("/usr/pwned")
    assert os.path.isdir("/usr/share/doc")


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        "s = socket.socket()\ns.settimeout(0.5)\n"
        f"s.connect(('127.0.0.1', {port}))\ns.sendall(b'hi')\nprint('connected')"
    )
    try:
        assert score(code, "connected") == 0.0
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody knocked
    finally:
        server.close()
    external = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=0.5)\nprint('ok')"
    assert score(external, "ok") == 0.0


def test_cannot_read_parent_environment(monkeypatch):
    secret = "r1jax-test-secret-7f3a9c"
    monkeypatch.setenv("R1JAX_TEST_SECRET", secret)
    code = (
        "import os, glob\n"
        "found = os.environ.get('R1JAX_TEST_SECRET', '')\n"
        "for path in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        f"        if b'{secret}' in open(path, 'rb').read():\n"
        f"            found = '{secret}'\n"
        "    except OSError:\n"
        "        pass\n"
        "print(found)"
    )
    assert score(code, secret) == 0.0
    # Not even the sandbox's own environment carries it.
    result = run_python("import os; print(sorted(os.environ))", cfg=CFG)
    assert result.ok and b"R1JAX_TEST_SECRET" not in result.stdout


def test_cannot_kill_the_parent_or_others():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        code = (
            "import os, signal\n"
            f"for pid in (os.getppid(), {os.getpid()}, {victim.pid}, -1, 1):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
            "print('survived')"
        )
        # The program itself may die by its own kill(-1); either way the reward is not 1.0 for
        # anything but printing 'survived', which proves it got to the end.
        score(code, "survived")
        time.sleep(0.1)
        assert victim.poll() is None, "a sandboxed program killed a host process"
        os.kill(os.getpid(), 0)  # this test process is alive (it is running this line)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


def test_invalid_utf8_everywhere():
    assert score("import sys\nsys.stdout.buffer.write(b'\\xff\\xfeok')", "ok") == 0.0
    # Invalid bytes in the program text, on stdin, and lone surrogates in the completion.
    assert score("print('\udcff')", "?") == 1.0  # the stray surrogate became '?', and ran
    assert score("import sys\nprint(len(sys.stdin.buffer.read()))", "3", stdin="\udcffab") == 1.0
    [reward] = code_reward(
        [b"```python\nprint(1)\xff\n```"], tests=[[{"input": "", "output": "1"}]], sandbox=CFG
    )
    assert reward == 0.0


def test_unread_large_stdin_does_not_deadlock():
    assert score("print('fine')", "fine", stdin="z" * 5_000_000) == 1.0


def test_stdin_is_a_file_the_program_can_size_but_not_change():
    """Standard input was a pipe: contest fast-IO (stdin sized by fstat, as PyRival reads it),
    and reopening /dev/stdin, read nothing, so correct programs scored 0."""
    fast_io = "import io, os\ninput = io.BytesIO(os.read(0, os.fstat(0).st_size)).readline\n"
    summing = "input()\nprint(sum(map(int, input().split())))"
    assert score(fast_io + summing, "6", stdin="3\n1 2 3\n") == 1.0
    assert score("print(open('/dev/stdin').read().split()[-1])", "3", stdin="3\n1 2 3\n") == 1.0
    tamper = (
        "import os\ntry:\n    os.write(0, b'x' * 10**8)\nexcept OSError as e:\n"
        "    print(type(e).__name__)"
    )
    assert score(tamper, "PermissionError", stdin="abc") == 1.0  # sealed: no write, no growth


def test_empty_and_malformed_completions():
    completions = [
        "",
        None,
        7,
        [],
        [{"role": "assistant"}],
        "```python\nprint(1)",  # unclosed
        "```\nprint(1)\n```",
        "no code at all",
        "```python\n\n```",
    ]
    tests = [[{"input": "", "output": "1"}]] * len(completions)
    assert code_reward(completions, tests=tests, sandbox=CFG) == [0.0] * len(completions)
    assert code_reward(["```python\nprint(1)\n```"], tests=[None], sandbox=CFG) == [None]
    assert code_reward(["x"], tests=[[{"stdin": "1"}]], sandbox=CFG) == [None]


def test_code_too_long_is_not_run():
    code = "print(1)\n" + "# padding\n" * 30_000
    assert score(code, "1") == 0.0


# bubblewrap between cloning the sandbox's init and releasing it: the init waits on an eventfd for a
# go-ahead that never comes once bubblewrap is dead, and has not been reported on --info-fd yet, so
# only the group kill reaches it (it calls setsid for --new-session after the release).
UNRELEASED_INIT = (
    "import os, sys, time\n"
    "child = os.fork()\n"
    "if child == 0:\n"
    "    time.sleep(60)\n"
    "    os._exit(0)\n"
    "print(child, flush=True)\n"
    "time.sleep(60)\n"
)


def test_deadline_inside_bubblewraps_setup_kills_the_unreported_init(monkeypatch):
    def stand_in(python, cfg, code_fd, info_fd, seccomp_fd=None):
        return [python, "-I", "-S", "-c", UNRELEASED_INIT]

    monkeypatch.setattr(sandbox_lib, "_bwrap_args", stand_in)
    cfg = SandboxConfig(timeout_s=0.5)
    result = sandbox_lib._run("", b"", cfg, sandbox_lib._interpreter(None), sandboxed=True)
    assert result.timed_out
    init = int(result.stdout)
    # SIGKILL is pending on it; on a loaded machine it may not have been scheduled to die yet.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            state = _stat(init)[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("Z", "X", "gone") or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert state in ("Z", "X", "gone"), (
        f"the unreported init {init} survived its run (state {state})"
    )


def test_a_hanging_program_costs_its_row_at_most_the_hang_budget():
    """A program that hangs cost timeout_s for every test of its row (20 tests x 2 s held a
    training step 40 s per completion); hang_budget_s bounds the time its runs may spend
    timing out, and the tests not run by then fail. Runs that finish in time do not count."""
    program = fenced("import time\nif input() == 'hang':\n    time.sleep(100)\nprint(1)")
    tests = [{"input": "hang", "output": "1"}] * 4 + [{"input": "go", "output": "1"}]
    unbounded = dataclasses.replace(CFG, timeout_s=0.5, hang_budget_s=0)
    start = time.monotonic()
    assert code_reward([program], tests=[tests], sandbox=unbounded) == [0.2]  # 4 x 0.5 s, then 1
    assert time.monotonic() - start >= 2.0
    budget = dataclasses.replace(unbounded, hang_budget_s=0.8)
    start = time.monotonic()
    assert code_reward([program], tests=[tests], sandbox=budget) == [0.0]  # the last not run
    assert time.monotonic() - start < 0.8 + SLACK_S
    fine = [{"input": "go", "output": "1"}] * 12  # each run ~30-100 ms: together past 0.2 s
    tight = dataclasses.replace(unbounded, hang_budget_s=0.2)
    assert code_reward([program], tests=[fine], sandbox=tight) == [1.0]
    with pytest.raises(ValueError, match="hang_budget_s must be >= 0"):
        SandboxConfig(hang_budget_s=-1.0)


def test_ctrl_c_during_grading_does_not_wait_for_the_batch():
    """Evaluation and rejection sampling grade in worker processes, which ignore Ctrl-C (the
    trainer decides when to stop): leaving on it waited for the whole batch in flight, a minute
    of hanging programs here, before the KeyboardInterrupt reached the user."""
    import types

    import stage_helpers as sh

    from r1jax.stages.eval import Grader

    config = sh.load_config("eval")
    config.sandbox.timeout_s = 60.0
    tests = [{"input": "", "output": "1"}]
    rows = types.SimpleNamespace(rows=[{"task": "code", "tests": tests}])
    hang = fenced("import time\ntime.sleep(100)")
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), Grader(rows, config, num_workers=2) as grade:
        grade.submit([hang] * 2, task=["code"] * 2, tests=[tests] * 2)
        time.sleep(1.0)  # (both workers running a program)
        raise KeyboardInterrupt
    assert time.monotonic() - start < 1.0 + 3 * SLACK_S


def test_a_sandbox_trial_that_fails_for_a_moment_is_tried_again(monkeypatch):
    """A reward worker whose first trivial run failed once (out of processes for a moment)
    kept "bwrap failed" for good: every code row after it failed, or with allow_unsandboxed ran
    without the sandbox."""
    real_run, failures, runs = sandbox_lib._run, [2], []

    def flaky(code, stdin, cfg, python, sandboxed):
        runs.append(code)
        if failures[0] > 0:
            failures[0] -= 1
            return sandbox_lib.RunResult(b"", b"fork: out of processes", 1, False, False, 0.0, True)
        return real_run(code, stdin, cfg, python, sandboxed=sandboxed)

    python = sandbox_lib._interpreter(None)
    monkeypatch.setattr(sandbox_lib, "_run", flaky)
    monkeypatch.setattr(sandbox_lib, "_trials", {})
    assert sandbox_lib._bwrap_problem(python) is None and len(runs) == 3  # 2 failures, then ok
    assert sandbox_lib._bwrap_problem(python) is None and len(runs) == 3  # remembered
    failures[0] = 3
    monkeypatch.setattr(sandbox_lib, "_trials", {})
    assert "out of processes" in sandbox_lib._bwrap_problem(python)  # 3 in a row: unusable
    assert "out of processes" in sandbox_lib._bwrap_problem(python) and len(runs) == 6
    monkeypatch.setattr(sandbox_lib, "_TRIAL_RETRY_S", 0.0)  # ... for a while, then tried again
    assert sandbox_lib._bwrap_problem(python) is None and len(runs) == 7


def test_refuses_without_sandbox_unless_allowed(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_lib, "_bwrap_problem", lambda python: "simulated: no bwrap")
    monkeypatch.setattr(sandbox_lib, "_warned_unsandboxed", False)
    with pytest.raises(SandboxUnavailableError, match="allow_unsandboxed=True"):
        code_reward([fenced("print(1)")], tests=[[{"input": "", "output": "1"}]], sandbox=CFG)
    weak = SandboxConfig(timeout_s=LIMIT_S, allow_unsandboxed=True)
    with caplog.at_level(logging.WARNING, logger="r1jax.rewards.sandbox"):
        assert score("print(input())", "hey", stdin="hey", cfg=weak) == 1.0
    assert "WITHOUT A SANDBOX" in caplog.text
    # The weaker mode still enforces the wall clock and the output cap.
    assert score("while True:\n    pass", "done", cfg=weak) == 0.0
    assert score("while True:\n    print('x' * 1000)", "x", cfg=weak) == 0.0
    if os.geteuid() == 0:  # as root, the weak mode kills the run's whole private uid
        # (A daemon that prints 0.3 s after the run's exit was read when this process noticed
        # the exit late, on a loaded host: the weak mode drains the pipes 0.1 s after the exit
        # it sees, with no PID namespace to end the daemon with the run. It waits 2 s here.)
        slow = DAEMON.replace("time.sleep(0.3)", "time.sleep(2.0)")
        assert score(slow, "escaped", cfg=weak) == 0.0
        time.sleep(2.3)
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert f"sleep {DAEMON_MARKER}" not in ps
    # A program that closes its stdout and stderr and then exits 0 was killed when its pipes
    # ended; exit() is there (the interpreter runs without site.py); a program past the
    # command line's 128 KiB limit for one argument runs (it went in as `-c CODE`).
    close = "import os, time\nprint(7, flush=True)\nos.close(1)\nos.close(2)\ntime.sleep(0.3)"
    assert score(close, "7", cfg=weak) == 1.0
    assert score("print(-1)\nexit()\nprint(2)", "-1", cfg=weak) == 1.0
    assert score("print(10 ** 5000)", "1" + "0" * 5000, cfg=weak) == 1.0
    assert score("x = 1\n" * 40_000 + "print(x)", "1", cfg=weak) == 1.0


@pytest.mark.skipif(not sandbox_lib._pdeathsig_works(), reason="setpriv has no --pdeathsig")
def test_an_unsandboxed_program_ends_with_the_worker_running_it(monkeypatch):
    """A reward worker ended mid-run (the pool's deadline, the OOM killer) skipped the run's
    clean-up; without bubblewrap's --die-with-parent the program lived on as an orphan."""
    import multiprocessing

    monkeypatch.setattr(sandbox_lib, "_bwrap_problem", lambda python: "simulated: no bwrap")
    monkeypatch.setattr(sandbox_lib, "_warned_unsandboxed", True)
    weak = SandboxConfig(timeout_s=60, allow_unsandboxed=True)
    marker = "27.1828"
    sleeper = f"import os\nos.execv('/bin/sleep', ['sleep', '{marker}'])"

    def sleeping() -> bool:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        return f"sleep {marker}" in ps.splitlines()

    worker = multiprocessing.get_context("fork").Process(
        target=run_python, args=(sleeper, b"", weak)
    )
    worker.start()
    deadline = time.monotonic() + 30
    while not sleeping() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleeping(), "the program never started"
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    deadline = time.monotonic() + 5
    while sleeping() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sleeping()


@pytest.mark.skipif(os.geteuid() != 0, reason="private uids need root")
def test_unsandboxed_runs_leave_no_files_or_shared_memory(monkeypatch):
    """The weak mode (no bubblewrap) as root: what a run's private uid wrote in the shared temp
    folders, and its System V shared memory, stayed on the host after every run."""
    monkeypatch.setattr(sandbox_lib, "_bwrap_problem", lambda python: "simulated: no bwrap")
    marker = f"r1jax_left_{os.getpid()}"
    places = [f"/tmp/{marker}", f"/var/tmp/{marker}", f"/dev/shm/{marker}", f"/tmp/{marker}_d"]
    code = (
        "import ctypes, os\n"
        f"for path in {places[:3]!r}:\n"
        "    open(path, 'w').write('x' * 1000)\n"
        f"os.mkdir({places[3]!r})\n"
        f"open({places[3]!r} + '/f', 'w').write('y')\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.shmget(0, 1 << 20, 0o1600))\n"
    )
    result = run_python(code, cfg=SandboxConfig(timeout_s=LIMIT_S, allow_unsandboxed=True))
    assert result.ok and not result.sandboxed, result.stderr
    segment = result.stdout.decode().strip()
    assert int(segment) >= 0
    assert [p for p in places if os.path.lexists(p)] == []
    with open("/proc/sysvipc/shm") as f:
        assert segment not in [line.split()[1] for line in f.readlines()[1:]]


@pytest.mark.skipif(os.geteuid() != 0, reason="private uids need root")
def test_concurrent_runs_never_share_a_private_uid(monkeypatch):
    """Where only a few ids are usable (a remapped container: 1024), two workers' runs drew the
    same uid (2 bits of the pid and a counter starting at 0 in each), so they shared a process
    limit, and the weak mode's cleanup of one killed the other."""
    base = sandbox_lib._private_id_range()[0]
    monkeypatch.setattr(sandbox_lib, "_private_id_range", lambda: (base, 4))
    holder = subprocess.Popen(  # another worker, holding one of the four ids
        [
            sys.executable,
            "-c",
            "import sys\nfrom r1jax.rewards import sandbox as s\n"
            f"s._private_id_range = lambda: ({base}, 4)\n"
            "with s._private_uid() as uid:\n    print(uid, flush=True)\n    sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = int(holder.stdout.readline())
        with contextlib.ExitStack() as stack:
            ours = [stack.enter_context(sandbox_lib._private_uid()) for _ in range(3)]
            assert sorted([held, *ours]) == [base, base + 1, base + 2, base + 3]
    finally:
        holder.communicate("", timeout=30)
    # Without a usable lock file (another user's file at its name), runs go on unreserved.
    monkeypatch.setattr(sandbox_lib, "_uid_lock_file", lambda: None)
    assert run_python("print(5)", cfg=CFG).stdout == b"5\n"


def test_private_ids_fit_a_remapped_user_namespace(monkeypatch):
    # A remapped container often maps only uids 0..65535; the per-run ids must then come from
    # inside that range (and avoid nobody/nogroup), or setuid would fail and every run score 0.
    monkeypatch.setattr(sandbox_lib, "_mapped_ranges", lambda path: [(0, 65536)])
    sandbox_lib._private_id_range.cache_clear()
    try:
        assert sandbox_lib._private_id_range() == (65534 - 1024, 1024)
        monkeypatch.setattr(sandbox_lib, "_mapped_ranges", lambda path: [(0, 1)])
        sandbox_lib._private_id_range.cache_clear()
        with pytest.raises(SandboxUnavailableError, match="uid_map"):
            sandbox_lib._private_id_range()
    finally:
        sandbox_lib._private_id_range.cache_clear()


def test_memory_outside_the_address_space_limit_is_refused():
    """System V shared memory filled and detached (and message queues, memfds) would stay in RAM
    beyond RLIMIT_AS until the run ends: the seccomp filter refuses them; the run goes on."""
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('shm', libc.shmget(0, 32 << 20, 0o1600), ctypes.get_errno())\n"
        "print('msg', libc.msgget(0, 0o1600), ctypes.get_errno())\n"
        "try:\n    os.memfd_create('x')\nexcept PermissionError:\n    print('memfd refused')\n"
    )
    from r1jax.rewards import sandbox

    if sandbox._seccomp_filter() is None:
        pytest.skip("no seccomp filter for this architecture (x86-64 and arm64 only)")
    result = run_python(code, cfg=CFG)
    assert result.sandboxed and result.returncode == 0, result.stderr
    assert result.stdout.decode().split("\n")[:3] == ["shm -1 1", "msg -1 1", "memfd refused"]


KEYRING_PROBE = """
import ctypes, platform
from r1jax.rewards import SandboxConfig, run_python
from r1jax.rewards.sandbox import _SECCOMP_BLOCKED
calls = _SECCOMP_BLOCKED[platform.machine()][1]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.syscall(calls["keyctl"], 1, None) > 0  # KEYCTL_JOIN_SESSION_KEYRING: a new one
secret = b"trainer-token"
libc.syscall(calls["add_key"], b"user", b"secret", secret, len(secret), ctypes.c_int(-3))
steal = (
    "import ctypes\\n"
    "libc = ctypes.CDLL(None, use_errno=True)\\n"
    "key = libc.syscall(KEYCTL, 10, ctypes.c_int(-3), b'user', b'secret', 0)\\n"  # SEARCH @s
    "buf = ctypes.create_string_buffer(64)\\n"
    "n = libc.syscall(KEYCTL, 11, key, buf, 64)\\n"  # READ
    "print(buf.raw[:n].decode() if n > 0 else 'errno', ctypes.get_errno())\\n"
).replace("KEYCTL", str(calls["keyctl"]))
print(run_python(steal, b"", SandboxConfig(timeout_s=3.0)).stdout.decode().strip())
leave = (
    "import ctypes\\n"
    "libc = ctypes.CDLL(None, use_errno=True)\\n"
    "print(libc.syscall(ADD_KEY, b'user', b'note', b'x', 1, ctypes.c_int(-3)) > 0)\\n"
).replace("ADD_KEY", str(calls["add_key"]))
print(run_python(leave, b"", SandboxConfig(timeout_s=3.0)).stdout.decode().strip())
"""


def test_the_kernel_keyring_is_out_of_reach():
    """Keyrings are not namespaced: a run inherited the trainer's session keyring (a process
    started by Docker/runc, systemd or a login has one; here the probe joins a new one) and read
    the keys in it, or left keys there for the next test's run to read."""
    if sandbox_lib._seccomp_filter() is None:
        pytest.skip("no seccomp filter for this architecture (x86-64 and arm64 only)")
    probe = subprocess.run(
        [sys.executable, "-c", KEYRING_PROBE], capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[:2] == ["errno 1", "False"], probe.stdout  # (EPERM)


MANY_FILES_PROBE = """
import os, resource
from r1jax.rewards import SandboxConfig, run_python
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
print(max(held) >= 1024, run_python("print(6 * 7)", b"", SandboxConfig(timeout_s=3.0)).stdout)
"""


def test_a_trainer_holding_many_files_still_runs_programs():
    """With more than 1024 files open in the trainer (a container's limit allows 20,000), every
    run raised "filedescriptor out of range in select()" (the wait for the sandbox's init)."""
    probe = subprocess.run(
        [sys.executable, "-c", MANY_FILES_PROBE], capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "True b'42\\n'", probe.stdout


def test_the_init_is_killed_only_while_its_pid_is_bubblewraps_child(monkeypatch):
    """The sandbox init's PID (bubblewrap's report) was opened after the run: reaped by then
    (by bubblewrap at its exit, or by PID 1 as an orphan), the PID could name an unrelated
    process, which the run SIGKILLed. It is taken only while its parent is bubblewrap."""
    bystander = subprocess.Popen(["sleep", "30"])
    launcher = subprocess.Popen(["sleep", "30"])  # (stands in for bubblewrap: not its parent)
    read, write = os.pipe()
    try:
        os.write(write, b'{"child-pid": %d}' % bystander.pid)
        os.close(write)
        assert sandbox_lib._sandbox_init(read, launcher) is None
        assert bystander.poll() is None
        # ... nor, when this process reaps orphans (a reward worker, a container's PID 1), any
        # child of its own: only the init of a PID namespace below this one.
        with monkeypatch.context() as m:
            m.setattr(sandbox_lib, "_reaps_orphans", lambda: True)
            read3, write3 = os.pipe()
            os.write(write3, b'{"child-pid": %d}' % bystander.pid)
            os.close(write3)
            assert sandbox_lib._sandbox_init(read3, launcher) is None
            os.close(read3)
        assert bystander.poll() is None
        # No report (bubblewrap failed before it): no init, once the pipe ends.
        read2, write2 = os.pipe()
        os.close(write2)
        assert sandbox_lib._sandbox_init(read2, launcher) is None
        os.close(read2)
    finally:
        os.close(read)
        for p in (bystander, launcher):
            p.kill()
            p.wait()


def test_a_program_cannot_forge_log_lines(caplog):
    """A program whose stderr starts with "bwrap:" is logged as a possible setup failure; its
    newlines made lines of their own ("ERROR:r1jax.train: checkpoint corrupt")."""
    code = "import sys\nsys.stderr.write('bwrap: x\\nERROR:r1jax.train: checkpoint corrupt\\n')"
    with caplog.at_level(logging.WARNING, logger="r1jax.rewards.sandbox"):
        assert run_python(code, b"", CFG).ok
    assert caplog.records and all("\n" not in r.getMessage() for r in caplog.records)


def test_limits_that_fail_every_run_are_refused_up_front():
    """Limits no program runs under (here 3 open files: bubblewrap needs ~10) and cpu_time_s=0
    passed validation and scored every completion 0 for a whole run, with at most a per-run
    warning."""
    import ml_collections

    from r1jax.stages import common

    config = ml_collections.ConfigDict({"sandbox": {"max_open_files": 3, "max_processes": 8}})
    with pytest.raises(common.ConfigError, match=r"prints 42 fails under these .*max_open_files"):
        common.sandbox_options(config)
    del config.sandbox["max_open_files"]
    config.sandbox.cpu_time_s = 0
    with pytest.raises(common.ConfigError, match=r"sandbox.cpu_time_s must be >= 1"):
        common.sandbox_options(config)
    config.sandbox.cpu_time_s = 1
    config.sandbox.float_tolerance = -1e-6
    with pytest.raises(common.ConfigError, match=r"sandbox.float_tolerance must be >= 0"):
        common.sandbox_options(config)
    config.sandbox.float_tolerance = 1e-6
    want = {"max_processes": 8, "cpu_time_s": 1, "float_tolerance": 1e-6}
    assert common.sandbox_options(config) == want


def test_runs_leave_no_zombie_when_the_trainer_is_pid_1(tmp_path):
    """bubblewrap exits before its sandbox init, whose orphan went to PID 1: a trainer that is
    PID 1 of its container (`docker run` without --init) reaped none, and the zombies, counted
    against the private uids' process limit, later made every run fail (code reward 0). Runs
    in the process itself and in the rewards' pool workers (whose orphans went to the trainer)."""
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"]).returncode:
        pytest.fail("unshare --pid --fork --mount-proc is refused here (the test needs root)")
    script = tmp_path / "pid1.py"
    script.write_text(
        "import os, time\n"
        "from r1jax.rewards import build_reward_fn\n"
        "from r1jax.rewards.sandbox import run_python, SandboxConfig\n"
        "if __name__ == '__main__':\n"
        "    assert os.getpid() == 1\n"
        "    for i in range(6):\n"
        "        assert run_python(f'print({i})', b'', SandboxConfig(timeout_s=5.0)).ok\n"
        "    code = '<answer>```python\\nprint(int(input()) * 2)\\n```</answer>'\n"
        "    with build_reward_fn([('code', 1.0)], num_workers=1) as fn:  # (RL's pool)\n"
        "        for _ in range(2):\n"
        "            out = fn([code] * 4, tests=[[{'input': '3', 'output': '6'}]] * 4)\n"
        "            assert list(out.total) == [1.0] * 4, out.total\n"
        "    time.sleep(0.5)\n"
        "    states = []\n"
        "    for p in filter(str.isdigit, os.listdir('/proc')):\n"
        "        try:\n"
        "            states.append(open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0])\n"
        "        except OSError:\n"
        "            pass\n"
        "    print('zombies', states.count('Z'))\n"
    )
    out = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(sandbox_lib.__file__).parents[2])},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["zombies", "0"], out.stdout


def test_a_program_that_closes_its_output_is_waited_for_without_pidfds(monkeypatch):
    """A program that closes stdout and stderr and runs on is waited for, its exit status kept;
    on a kernel without pidfd_open (Linux < 5.3, where the unsandboxed fallback is for) that
    wait raised ENOSYS."""
    import errno

    def no_pidfds(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(sandbox_lib.os, "pidfd_open", no_pidfds)
    code = "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(0.3)\nraise SystemExit(3)"
    cfg = SandboxConfig(timeout_s=5.0, allow_unsandboxed=True)
    result = sandbox_lib._run(code, b"", cfg, sandbox_lib._interpreter(None), sandboxed=False)
    assert (result.returncode, result.timed_out) == (3, False)
