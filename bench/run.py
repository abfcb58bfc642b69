"""Run the WORKLOAD.md benchmarks in one go: machine limits, workloads A, B and C, and scaling.

Prints one table (medians with [min-max] over the timed repeats, ratios against the baseline
measured in the same run) and writes everything, with the machine and software versions and the
load average before and after, to `bench/results/<name>.json`.

    python bench/run.py                        # A on tiny + small, B on tiny, C on tiny + small,
                                               # S (FSDP over 8 simulated devices vs 1) on both
    python bench/run.py --quick                # tiny only, fewer repeats (~3 minutes)
    python bench/run.py --workloads A --sizes small --repeats 5 --name sampling_small

Compilation is never inside a timed figure: each workload times its first call separately and
reports it as compile time. The machine may be shared: every workload interleaves or repeats its
runs, so read the min-max spread beside each median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

# Run from a checkout: import this tree's r1jax (and `bench`), not another installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_grpo, bench_sampling, bench_scaling, limits  # noqa: E402

# S is not a WORKLOAD.md workload: the scaling figures of the GRPO-step issue (bench_scaling.py).
WORKLOADS = ("A", "B", "C", "S")


def machine_info() -> dict:
    """Where and with what the figures were measured."""
    import jax
    import torch
    import transformers

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "cpus": os.cpu_count(),
        "available_cpus": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fmt(stats: dict, scale: float = 1.0, digits: int = 0) -> str:
    m, lo, hi = (stats[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def table(result: dict) -> str:
    """The human-readable summary (a markdown table per section)."""
    lim = result["limits"]
    out = [
        f"machine: {result['machine']['cpu']}, {result['machine']['available_cpus']} cpus, "
        f"load {result['load_before'][0]:.1f} before / {result['load_after'][0]:.1f} after; "
        f"f32 matmul {_fmt(lim['matmul_gflops'], digits=1)} GFLOP/s, copy "
        f"{_fmt(lim['copy_gbs'], digits=1)} GB/s",
        "",
    ]
    busy = result["load_before"][0] > result["machine"]["available_cpus"]  # (1-minute average)
    if busy:
        out += [
            f"NOTE: load {result['load_before'][0]:.1f} on {result['machine']['available_cpus']} "
            "cpus before the run: other work shares the cores, and the ratios below compare "
            "phases of it (transformers has measured 20x slower under such load); rerun quiet.",
            "",
        ]
    for workload, error in result.get("failed", {}).items():
        out += [f"FAILED: workload {workload}: {error}", ""]
    a = [r for r in result["rows"] if r["workload"] == "A"]
    if a:
        out += [
            "A  sampling, 16 x 32 prompt tokens -> 128 new tokens (tokens/s, median [min-max])",
            "| model | phase | r1jax | transformers | ratio | pairwise | r1jax compile s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in a:
            out.append(
                f"| {r['model']} | {r['phase']} | {_fmt(r['r1jax_tok_s'])} | "
                f"{_fmt(r['transformers_tok_s'])} | {r['ratio_of_medians']:.2f}x | "
                f"{r['ratio_pairwise_median']:.2f}x | {r['r1jax_compile_s']:.1f} |"
            )
        out.append("")
    b = [r for r in result["rows"] if r["workload"] == "B"]
    if b:
        out += [
            "B  one GRPO step, 4 prompts x 4 samples, 32 + 128 tokens, beta 0.04 (seconds)",
            "| model | micro-batch rows | prompts once | full step | rollout | update | "
            "compile s | compiles (steady) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in b:
            once = {True: "yes", False: "no"}.get(r.get("shared_prompt_forward"), "?")
            out.append(
                f"| {r['model']} | {r.get('micro_batch_rows', '?')} | {once} | "
                f"{_fmt(r['step_s'], digits=3)} | "
                f"{_fmt(r['rollout_s'], digits=3)} | {_fmt(r['update_s'], digits=3)} | "
                f"{r['compile_s']:.1f} | {r['compiles_first_step']} "
                f"({r['compiles_steady']}) |"
            )
        out.append("")
        for r in b:
            if "parts" not in r:
                continue
            out += [
                f"B  where the step goes ({r['model']}; each part alone, s, median [min-max])",
                "| part | wall | process CPU |",
                "|---|---|---|",
            ]
            for name, part in r["parts"].items():
                out.append(
                    f"| {name} | {_fmt(part['wall_s'], digits=3)} | "
                    f"{_fmt(part['cpu_s'], digits=3)} |"
                )
            out.append("")
    c = [r for r in result["rows"] if r["workload"] == "C"]
    if c:
        rate = result.get("limits_before_c", lim)["matmul_gflops"]
        out += [
            f"C  update throughput, rows x 160 tokens (MFU over the f32 matmul rate measured just "
            f"before: {_fmt(rate, digits=1)} GFLOP/s; > 100%: the host's rate changed in between, "
            f"no figure)",
            "| model | rows | micro-batch rows | update s | tokens/s | GFLOP/s | MFU | "
            "compiles (steady) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in c:
            mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] <= 1 else "invalid"
            out.append(
                f"| {r['model']} | {r['rows']} | {r.get('micro_batch_rows', r['rows'])} | "
                f"{_fmt(r['update_s'], digits=3)} | "
                f"{r['tokens_per_s']:.0f} | {r['achieved_gflops']:.1f} | {mfu} | "
                f"{r['compiles_steady']} |"
            )
        out.append("")
    sc = [r for r in result["rows"] if r["workload"] == "S"]
    if sc:
        mib = 1 / 2**20
        out += [
            "S  GRPO update (16 x 160 tokens) on 8 simulated CPU devices vs 1 (per device; MiB)",
            "| model | mesh | params | optimizer | params + opt | XLA peak | XLA temp | "
            "update s | vs 1 device |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sc:
            m, c = r["memory"], r["compiled"]
            out.append(
                f"| {r['model']} | {r['mesh']} | "
                f"{m['params']['max_per_device_bytes'] * mib:.2f} | "
                f"{m['optimizer']['max_per_device_bytes'] * mib:.2f} | "
                f"{m['params_plus_optimizer_max_per_device_bytes'] * mib:.2f} | "
                f"{c['peak_bytes'] * mib:.1f} | {c['temp_bytes'] * mib:.1f} | "
                f"{_fmt(r['update_s'], digits=2)} | {r['update_vs_1_device']:.2f}x |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads",
        default="A,B,C,S",
        help="comma-separated subset of A,B,C,S (S: FSDP scaling, 8 simulated devices vs 1)",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="model sizes for A, C and S (default tiny,small; B always runs tiny)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats after the warm-up (default 3, --quick 2)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model only, 2 repeats, no prefill row"
    )
    parser.add_argument("--name", default=None, help="results file name (default: all / quick)")
    args = parser.parse_args()

    workloads = tuple(w.strip().upper() for w in args.workloads.split(","))
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"--workloads: unknown {sorted(unknown)}; choose from {WORKLOADS}")
    sizes = tuple((args.sizes or ("tiny" if args.quick else "tiny,small")).split(","))
    unknown = set(sizes) - set(bench_sampling.MODELS)
    if unknown:
        parser.error(
            f"--sizes: unknown {sorted(unknown)}; choose from {sorted(bench_sampling.MODELS)}"
        )
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    repeats = args.repeats or (2 if args.quick else 3)
    name = args.name or ("quick" if args.quick else "all")

    result = {
        "machine": machine_info(),
        "load_before": os.getloadavg(),
        "workloads": workloads,
        "sizes": sizes,
        "repeats": repeats,
        "rows": [],
        "failed": {},
    }
    t0 = time.perf_counter()
    result["limits"] = limits.measure(repeats=max(repeats, 3))

    def c_rows():
        # C's MFU is over the matmul rate measured just before it: the host's rate drifts by up
        # to 1.25x within minutes, so the rate from the start of the run misstates it.
        result["limits_before_c"] = limits.measure(repeats=max(repeats, 3))
        rate = result["limits_before_c"]["matmul_gflops"]["median"]
        return bench_grpo.run(sizes, repeats, rate, workloads=("C",))

    runs = {
        "A": lambda: bench_sampling.run(sizes, repeats, prefill=not args.quick),
        "B": lambda: bench_grpo.run(("tiny",), repeats, workloads=("B",)),
        "C": c_rows,
        "S": lambda: bench_scaling.run(sizes, repeats),
    }
    for workload in (w for w in WORKLOADS if w in workloads):
        try:
            result["rows"] += runs[workload]()
        except Exception as e:  # (one failing workload must not lose the others' figures)
            result["failed"][workload] = f"{type(e).__name__}: {e}"
            print(f"workload {workload} failed: {e}", file=sys.stderr)
        result["load_after"] = os.getloadavg()
        result["wall_s"] = time.perf_counter() - t0
        path = _write(result, name)  # after each workload: a later failure keeps these
    print(table(result))
    print(f"wrote {os.path.relpath(path, ROOT)} ({result['wall_s']:.0f} s)")
    if result["failed"]:
        sys.exit(f"failed workloads: {sorted(result['failed'])}")


def _write(result: dict, name: str) -> str:
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", f"{name}.json")
    with open(path, "w") as f:
        json.dump({**result, "table": table(result)}, f, indent=2)
    return path


if __name__ == "__main__":
    main()
