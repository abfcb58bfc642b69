"""Reward-scoring throughput: serial vs the process pool.

Scores 256 code completions x 5 tests each (every test a fresh bubblewrap sandbox) and 256 math
completions (math-verify), once in-process (``num_workers=0``) and once through the pool
(``num_workers`` = available cores), checks both give identical rewards, prints a table and
writes ``bench/results/rewards.json``.

"cores busy" is machine-wide, from /proc/stat: non-idle CPU time over the scoring call divided by
its wall time (2.0 = both cores of a 2-core machine fully busy). It counts every process on the
machine, so the 1-minute load average before each case is recorded beside it. (Per-process
accounting cannot be used: sandboxed programs are reparented away from this process when
bubblewrap exits, so their CPU time is never reported back here.) Pool start-up (fork server +
importing the reward modules) is timed separately, and an untimed warm-up batch is scored first
in both modes: a long-running trainer pays these first-use costs once, not every step.

On a machine shared with other users, mind Linux's autogroup scheduling
(``kernel.sched_autogroup_enabled=1``): CPU is split fairly between *sessions*, not processes. The
pool's workers share this script's session, so while other sessions are busy the pool cannot take
more than the session's share and its speedup collapses towards 1x (sandboxed programs run in
sessions of their own, so the code case is hit less). Numbers are meaningful with load ~0; the
load average before each measurement and the autogroup setting are recorded for that reason.

    python bench/bench_rewards.py [--n 256] [--tests 5] [--workers N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import numpy as np

# Run from a checkout: import this tree's r1jax, not another installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from r1jax.rewards import build_reward_fn, sandbox_available  # noqa: E402

# Each problem: (program that solves it, generator of one (stdin, expected stdout) test).
PROBLEMS = {
    "sum": (
        "print(sum(map(int, input().split())))",
        lambda r: (lambda xs: (" ".join(map(str, xs)), str(sum(xs))))(
            [r.randint(-99, 99) for _ in range(r.randint(1, 8))]
        ),
    ),
    "reverse": (
        "print(input()[::-1])",
        lambda r: (lambda s: (s, s[::-1]))(
            "".join(r.choice("abcdefgh") for _ in range(r.randint(1, 12)))
        ),
    ),
    "max": (
        "n = int(input())\nprint(max(int(input()) for _ in range(n)))",
        lambda r: (lambda xs: (f"{len(xs)}\n" + "\n".join(map(str, xs)), str(max(xs))))(
            [r.randint(0, 999) for _ in range(r.randint(1, 6))]
        ),
    ),
    "fib": (
        "a, b = 0, 1\nfor _ in range(int(input())):\n    a, b = b, a + b\nprint(a)",
        lambda r: (lambda n: (str(n), str(_fib(n))))(r.randint(0, 60)),
    ),
}


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def code_batch(n: int, tests_per: int, seed: int = 0) -> tuple[list[str], list[list[dict]]]:
    """n completions: 70% correct, 15% wrong answer, 10% crash, 5% no code block."""
    rng = random.Random(seed)
    completions, tests = [], []
    for _ in range(n):
        name = rng.choice(sorted(PROBLEMS))
        program, make_test = PROBLEMS[name]
        roll = rng.random()
        if roll < 0.15:
            program = (
                program.replace("print(", "print(1 + ", 1)
                if name != "reverse"
                else "print(input())"
            )
        elif roll < 0.25:
            program = "import sys\n" + program + "\nraise RuntimeError('oops')"
        fence = "text" if roll > 0.95 else "python"
        completions.append(f"<think>Let me write it.</think>\n```{fence}\n{program}\n```")
        cases = [make_test(rng) for _ in range(tests_per)]
        tests.append([{"input": i, "output": o} for i, o in cases])
    return completions, tests


def math_batch(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n completions with gold answers in assorted notations; about 75% correct."""
    rng = random.Random(seed)
    forms = [
        ("\\frac{{{a}}}{{{b}}}", lambda a, b: f"{a / b:.6f}"),
        ("{a}\\sqrt{{{b}}}", lambda a, b: f"\\sqrt{{{a * a * b}}}"),
        ("\\{{{a}, {b}\\}}", lambda a, b: f"\\{{{b}, {a}\\}}"),
        ("({a}, {b}]", lambda a, b: f"({a},{b}]"),
    ]
    completions, solutions = [], []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(31, 60)
        gold, pred = rng.choice(forms)
        answer = pred(a, b) if rng.random() < 0.75 else pred(a + 1, b)
        completions.append(f"<think>work</think><answer>{answer}</answer>")
        solutions.append(gold.format(a=a, b=b))
    return completions, solutions


def busy_cpu_seconds() -> float:
    """Machine-wide non-idle CPU seconds since boot (all cores, all processes)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def autogroup() -> str:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def measure(specs, warm, completions, columns, workers: int) -> dict:
    """Time one scoring call with ``workers``, in steady state.

    Pool start-up is timed apart; then the ``warm`` batch is scored untimed, so that the
    per-process first-use costs (math-verify builds its parsers lazily, sympy fills its caches)
    are paid as a long-running trainer pays them: once, not every step.
    """
    load = os.getloadavg()[0]
    with build_reward_fn(specs, num_workers=workers) as fn:
        start = time.perf_counter()
        fn.warmup()
        startup = time.perf_counter() - start
        fn(warm[0], **warm[1])
        busy0, start = busy_cpu_seconds(), time.perf_counter()
        out = fn(completions, **columns)
        wall = time.perf_counter() - start
        busy = busy_cpu_seconds() - busy0
    return {
        "wall_s": wall,
        "startup_s": startup,
        "cores_busy": busy / wall,
        "load_1m": load,
        "mean_reward": float(np.nanmean(out.per_reward[0])),
        "values": out.per_reward,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--tests", type=int, default=5)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate serial/pool this many times and keep each one's fastest "
        "(damps noise from other load on a shared machine)",
    )
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "rewards.json")
    )
    args = parser.parse_args()
    if not sandbox_available():
        raise SystemExit("bubblewrap is not usable here; the code benchmark needs the sandbox")

    def code_case(seed, n=args.n):
        completions, tests = code_batch(n if seed < 1000 else 4 * args.workers, args.tests, seed)
        return completions, {"tests": tests}

    def math_case(seed, n=args.n):
        completions, solutions = math_batch(n if seed < 1000 else max(32, n // 4), seed)
        return completions, {"solution": solutions}

    cases = [
        (f"code ({args.n} x {args.tests} tests)", [("code", 1.0, {})], code_case),
        (f"accuracy ({args.n} math)", [("accuracy", 1.0, {})], math_case),
    ]
    rows = []
    for label, specs, make_batch in cases:
        runs = []
        # A fresh batch per repeat: parse caches left in this process by one serial run must not
        # speed up the next (pool workers always start cold).
        for seed in range(args.repeats):
            warm = make_batch(1000 + seed)
            batch, columns = make_batch(seed)
            serial = measure(specs, warm, batch, columns, workers=0)
            pooled = measure(specs, warm, batch, columns, workers=args.workers)
            if not np.array_equal(serial["values"], pooled["values"], equal_nan=True):
                raise SystemExit(f"{label}: pool and serial rewards differ")
            runs.append((serial, pooled))
        serial = min((r[0] for r in runs), key=lambda m: m["wall_s"])
        pooled = min((r[1] for r in runs), key=lambda m: m["wall_s"])
        rows.append(
            {
                "case": label,
                "workers": args.workers,
                "serial_s": serial["wall_s"],
                "pool_s": pooled["wall_s"],
                "speedup": serial["wall_s"] / pooled["wall_s"],
                "pool_startup_s": pooled["startup_s"],
                "serial_cores_busy": serial["cores_busy"],
                "pool_cores_busy": pooled["cores_busy"],
                "serial_load_1m": serial["load_1m"],
                "pool_load_1m": pooled["load_1m"],
                "mean_reward": serial["mean_reward"],
            }
        )

    header = (
        f"{'case':<26} {'serial s':>9} {'pool s':>8} {'speedup':>8} {'startup s':>10} "
        f"{'cores busy (serial/pool)':>25} {'load before':>12} {'mean reward':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        busy = f"{r['serial_cores_busy']:.2f} / {r['pool_cores_busy']:.2f}"
        load = f"{r['serial_load_1m']:.1f} / {r['pool_load_1m']:.1f}"
        print(
            f"{r['case']:<26} {r['serial_s']:>9.2f} {r['pool_s']:>8.2f} {r['speedup']:>7.2f}x "
            f"{r['pool_startup_s']:>10.2f} {busy:>25} {load:>12} {r['mean_reward']:>12.3f}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "available_cpus": len(os.sched_getaffinity(0)),
                    "workers": args.workers,
                    "python": platform.python_version(),
                    "sched_autogroup": autogroup(),
                },
                "repeats": args.repeats,
                "rows": rows,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
