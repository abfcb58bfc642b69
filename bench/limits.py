"""The machine's limits, measured in the same run as the workloads they bound.

Two numbers (WORKLOAD.md "Limits to report"):

- matmul rate: float32 `jnp.dot` of two 2048 x 2048 matrices, GFLOP/s (2 * 2048^3 per product),
  median over repeats; the denominator of model FLOP utilisation in workload C;
- copy bandwidth: a 1 GiB float32 array read and written once (`x + 1`, so XLA cannot elide it),
  GB/s counting both directions (2 GiB moved per pass), median over repeats.

Both are timed with the result fetched to completion (`block_until_ready`) and after one warm-up
call, so compilation and first-touch page faults are excluded.

    python bench/limits.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

MATMUL_N = 2048
COPY_BYTES = 1 << 30


def _times(fn, *args, repeats: int) -> list[float]:
    """Wall times (s) of `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return out


def matmul_gflops(repeats: int = 5, n: int = MATMUL_N) -> dict[str, float]:
    """f32 [n, n] @ [n, n] rate: {'median', 'min', 'max'} in GFLOP/s (min/max over repeats)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    times = _times(jax.jit(jnp.dot), a, b, repeats=repeats)
    rates = [2.0 * n**3 / t / 1e9 for t in times]
    return {"median": float(np.median(rates)), "min": min(rates), "max": max(rates)}


def copy_bandwidth(repeats: int = 5, nbytes: int = COPY_BYTES) -> dict[str, float]:
    """Read + write bandwidth of a `nbytes` f32 array: {'median', 'min', 'max'} in GB/s."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    # Donating the input lets the output reuse its buffer, so only one GiB is resident.
    step = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    x = jax.block_until_ready(step(x))  # warm-up (compile and first touch), outside the timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(step(x))
        times.append(time.perf_counter() - t0)
    rates = [2.0 * nbytes / t / 1e9 for t in times]
    return {"median": float(np.median(rates)), "min": min(rates), "max": max(rates)}


def measure(repeats: int = 5) -> dict[str, dict[str, float]]:
    """Both limits: {'matmul_gflops': {...}, 'copy_gbs': {...}}."""
    return {"matmul_gflops": matmul_gflops(repeats), "copy_gbs": copy_bandwidth(repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.repeats), indent=2))


if __name__ == "__main__":
    main()
