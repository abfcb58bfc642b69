"""Shared set-up of the stage, CLI and multi-process tests (tests/test_stages.py, test_cli.py,
test_multiprocess.py): a tiny toy base model, one reference GRPO run, and subprocess helpers.

Notable choices:
- Expensive artefacts (the toy base model, the reference RL run) are built once per test session
  *across pytest-xdist workers*: they live in a directory the workers share and are built under a
  file lock by whichever worker needs them first; the others wait and read the files.
- `R1JAX_HOME` points into that directory, so the default configs' model path "toy" resolves to a
  toy base pretrained here in seconds (hidden 32, 2 layers) instead of the real default one.
- The reference RL run is made to *learn something*: a random toy model earns no task or format
  reward, so the language-consistency reward on 4-token completions (0 when a completion has no
  word, 1 otherwise) gives groups with unequal rewards, hence non-zero advantages and gradients,
  and a learning rate large enough that the policy visibly moves. Tests assert that it did, so a
  comparison of parameters can fail.
- Subprocesses run with `JAX_DEFAULT_MATMUL_PRECISION=highest`, the precision tests/conftest.py sets
  in-process, so both compute the same programs bit for bit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The toy base model of the tests: a few seconds to pretrain.
TINY_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 16,
}

# The reference GRPO run (`rl` stage, configs/rl.py plus these overrides). Shared by the stage,
# resume, corrupt-checkpoint and multi-process tests, which all compare against it.
RL_STEPS = 3
RL_OVERRIDES: dict[str, Any] = {
    "rl.steps": RL_STEPS,
    "rl.prompts_per_step": 4,
    "rl.num_generations": 2,  # 8 rollout rows: one per simulated device
    "rl.max_completion_length": 4,
    "rewards.language_consistency": 1.0,
    "optim.learning_rate": 1e-3,
    "optim.warmup_steps": 0,
    "data.num_train": 32,
    "data.num_eval": 4,
    "data.prompt_buckets": (128,),
    "eval.num_prompts": 4,
    "eval.max_new_tokens": 4,
    "ckpt.every": 1,
    "ckpt.keep": 2,
    "ckpt.async_save": False,
    "log.every": 1,
}


# --------------------------------------------------------------------------------------------------
# Shared, built-once artefacts
# --------------------------------------------------------------------------------------------------


def shared_dir(tmp_path_factory) -> str:
    """A directory every xdist worker of this session sees (the session's own basetemp without
    xdist)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = os.path.join(str(root), "r1jax_stages_shared")
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive lock held across processes (fcntl, so it is released if a worker dies)."""
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(path: str, build) -> str:
    """Run `build(path)` unless an earlier call (any worker) completed it; returns `path`."""
    done = os.path.join(path, "BUILT")
    with file_lock(path):
        if not os.path.exists(done):
            shutil.rmtree(path, ignore_errors=True)  # a build that died half-way
            os.makedirs(path)
            build(path)
            with open(done, "w") as f:
                f.write("ok\n")
    return path


@contextlib.contextmanager
def toy_home(tmp_path_factory):
    """Set R1JAX_HOME to a shared directory holding a tiny toy base model (built by the pretrain
    stage on first use); yields (home, pretrain workdir). Restores R1JAX_HOME afterwards."""
    shared = shared_dir(tmp_path_factory)
    home = os.path.join(shared, "home")
    pretrain_dir = os.path.join(shared, "pretrain")

    def build(path):
        from r1jax.stages import common

        config = pretrain_config()
        common.validate(config, "pretrain")
        common.run_stage("pretrain", config, path)
        os.makedirs(home, exist_ok=True)
        target = os.path.join(home, "toy_base")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(path, "hf", "final"), target)
        common.mark_toy_base(target)  # stands in for the default recipe's base model
        share_compilation_cache(home)

    old = os.environ.get("R1JAX_HOME")
    os.environ["R1JAX_HOME"] = home
    try:
        build_once(pretrain_dir, build)
        yield home, pretrain_dir
    finally:
        if old is None:
            os.environ.pop("R1JAX_HOME", None)
        else:
            os.environ["R1JAX_HOME"] = old


def share_compilation_cache(home: str) -> None:
    """Point the CLI's compilation cache ($R1JAX_HOME/xla_cache) at the one this test process
    uses (tests/conftest.py), so subprocesses reuse what in-process runs compiled (and back)."""
    import jax

    cache = jax.config.jax_compilation_cache_dir
    link = os.path.join(home, "xla_cache")
    if cache and not os.path.lexists(link):
        os.makedirs(cache, exist_ok=True)
        os.symlink(os.path.abspath(cache), link)


# The toy base (`pretrain` stage, configs/pretrain.py plus these overrides): tiny corpus, tiny
# model, 2 copy-task warm-up steps then 3 corpus steps; a few seconds.
PRETRAIN_OVERRIDES: dict[str, Any] = {
    "pretrain.corpus_docs": 300,
    "pretrain.steps": 3,
    "pretrain.batch_size": 8,
    "pretrain.seq_len": 64,
    "pretrain.copy_warmup_steps": 2,
    "pretrain.tag_copy_restarts": 0,  # 3 corpus steps: no deadline to check at
    **{f"pretrain.arch.{k}": v for k, v in TINY_ARCH.items()},
    "optim.total_steps": 3,
    "optim.warmup_steps": 1,
}


def pretrain_config():
    """configs/pretrain.py with PRETRAIN_OVERRIDES."""
    return set_fields(load_config("pretrain"), PRETRAIN_OVERRIDES)


def reference_rl(tmp_path_factory) -> str:
    """Workdir of the uninterrupted reference GRPO run (1 process x 8 devices, in-process)."""

    def build(path):
        from r1jax.stages import common

        config = rl_config()
        common.validate(config, "rl")
        common.run_stage("rl", config, path)

    return build_once(os.path.join(shared_dir(tmp_path_factory), "rl_reference"), build)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def load_config(name: str):
    """configs/<name>.py as the CLI loads it ("pipeline:smoke" calls get_config("smoke"))."""
    from r1jax.stages import common

    stem, sep, arg = name.partition(":")
    return common.load_config_file(os.path.join(REPO, "configs", stem + ".py") + sep + arg)


def set_fields(config, overrides: dict[str, Any]):
    """Apply {"section.field": value} to a (locked) ConfigDict; unknown fields raise."""
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no field {path}")
        node[leaf] = value
    return config


def rl_config():
    """configs/rl.py with RL_OVERRIDES."""
    return set_fields(load_config("rl"), RL_OVERRIDES)


def cli_overrides(overrides: dict[str, Any]) -> list[str]:
    """{"rl.steps": 3} -> ["--config.rl.steps=3"] in ml_collections' override syntax."""
    return [
        f"--config.{k}={v!r}" if isinstance(v, str) else f"--config.{k}={v}"
        for k, v in overrides.items()
    ]


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def hf_params(folder: str) -> dict[str, np.ndarray]:
    """The tensors of an HF checkpoint folder (all *.safetensors files)."""
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    assert out, f"no safetensors in {folder}"
    return out


def metric_rows(workdir: str) -> list[dict[str, Any]]:
    """metrics.jsonl rows without the fields that legitimately differ between equal runs (wall
    time; compiles, which a resumed process counts from its own start)."""
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.append({k: v for k, v in row.items() if k not in ("time", "compiles")})
    return rows


def max_param_change(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


# --------------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------------


def cli_env(home: str, devices: int = 8, **extra: str) -> dict[str, str]:
    """Environment of a `python -m r1jax.launch` subprocess: `devices` simulated CPU devices, the
    tests' toy home and matmul precision, nothing from a surrounding multi-host setup."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("R1JAX_", "PYTEST_", "JAX_", "XLA_"))
    }
    env.update(
        {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
            "JAX_DEFAULT_MATMUL_PRECISION": "highest",
            "R1JAX_HOME": home,
            "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def sampled(tokens: list[list[int]], stop_reason: list[int] | None = None):
    """What `sampling.generate` returns for these completions (a stub sampler's answer)."""
    from r1jax import sampling

    return sampling.GenerateOutput(
        tokens=tokens,
        logprobs=[np.zeros(len(t), np.float32) for t in tokens],
        stop_reason=[0] * len(tokens) if stop_reason is None else stop_reason,
        device=None,
        prompt_ids=None,
        prompt_mask=None,
    )


def launch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "r1jax.launch", *args]


def popen(args: list[str], env: dict[str, str], log_prefix: str) -> subprocess.Popen:
    """Start the CLI with stdout/stderr in `<log_prefix>.out/.err` (files, so a chatty child never
    blocks on a full pipe)."""
    out = open(log_prefix + ".out", "w")  # the child keeps its own copy
    err = open(log_prefix + ".err", "w")
    try:
        return subprocess.Popen(launch_cmd(*args), env=env, cwd=REPO, stdout=out, stderr=err)
    finally:
        out.close()
        err.close()


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
