"""Shared test setup: 8 simulated CPU devices, float32 matmuls, session-scoped fixtures.

The device count must be set before JAX initialises its backend, so it happens at import time here,
before any test module imports jax.numpy.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Reuse compiled programs across test processes (xdist workers) and runs: most of this suite's time
# is XLA compiling small models. The cache is keyed by program and flags, so it never changes
# results.
jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("R1JAX_TEST_XLA_CACHE", "/tmp/r1jax_test_xla_cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_sessionfinish(session, exitstatus):
    """Drop compiled programs and collect garbage while the session still owns the time. Left to
    interpreter exit, that work (about half of a worker's ~5 s exit) ran after xdist had asked the
    worker to stop, and execnet interrupts a worker still exiting after 5 s: a KeyboardInterrupt
    inside JAX's gc callback, reported as a PytestUnraisableExceptionWarning."""
    import gc

    jax.clear_caches()
    gc.collect()
