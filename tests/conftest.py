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
