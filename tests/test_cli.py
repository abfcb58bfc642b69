"""The command line itself, as a user runs it (`python -m r1jax.launch ...` in a subprocess):
config errors refused before any work, `--help`, and a GRPO run killed with SIGKILL then rerun
with the same command, which must end exactly where an uninterrupted run ends (and, once its
checkpoint is damaged, stop with one line naming it).
"""

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import stage_helpers as sh

from r1jax.launch import STAGES


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    with sh.toy_home(tmp_path_factory) as home_and_workdir:
        yield home_and_workdir


def run_cli(args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        sh.launch_cmd(*args), env=env, cwd=sh.REPO, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------------------------------
# Config errors and --help
# --------------------------------------------------------------------------------------------------

CONFIG_ERRORS = {
    # override -> what the one message must name
    "unknown_key": (["--config.rl.bogus=1"], ["rl.bogus"]),
    "wrong_type": (["--config.rl.steps=abc"], ["rl.steps", "abc"]),
    "batch_not_divisible_by_mesh": (
        ["--config.rl.prompts_per_step=3", "--config.rl.num_generations=3"],
        ["rl.prompts_per_step", "rl.num_generations", "8 batch shards"],
    ),
    "bad_loss_type": (["--config.rl.loss_type=ppo"], ["rl.loss_type", "ppo"]),
}


def test_config_errors_are_refused_before_any_work(tmp_path):
    # All four at once: each is a fresh interpreter, and they must not reach the model anyway.
    env = sh.cli_env(str(tmp_path / "empty_home"))
    procs = {}
    for name, (overrides, _) in CONFIG_ERRORS.items():
        args = ["--stage=rl", f"--workdir={tmp_path / name}", *overrides]
        procs[name] = subprocess.Popen(
            sh.launch_cmd(*args),
            env=env,
            cwd=sh.REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    start = time.time()
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode != 0, f"{name}: exited 0\n{err}"
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err, f"{name}: a traceback instead of a message\n{err}"
        assert lines and all(word in lines[0] for word in CONFIG_ERRORS[name][1]), (name, err)
        assert len(lines) <= 2, f"{name}: more than one message\n{err}"
        assert out == ""
        # Refused before any work: no workdir, no toy base model trained.
        assert not (tmp_path / name).exists(), name
    assert not (tmp_path / "empty_home").exists()
    assert time.time() - start < 120  # imports only, no compilation


def test_help_lists_stages_and_config_fields():
    env = sh.cli_env("/nonexistent")
    out = run_cli(["--help"], env)
    assert out.returncode == 0 and all(stage in out.stdout for stage in STAGES)
    out = run_cli(["--stage=rl", "--help"], env)
    assert out.returncode == 0
    for field in (
        "rl.loss_type = 'grpo'",
        "rl.num_generations = 8",
        "ckpt.every",
        "mesh.fsdp",
        "rewards.format",
        "data.source",
        "optim.learning_rate",
    ):
        assert field in out.stdout, field
    # --help describes the config actually chosen, argument included.
    out = run_cli(["--stage=pipeline", "--config=configs/pipeline.py:smoke", "--help"], env)
    assert out.returncode == 0 and "r1_zero.rl.steps = 2 (int)" in out.stdout


# --------------------------------------------------------------------------------------------------
# SIGKILL, then the same command again
# --------------------------------------------------------------------------------------------------


def test_sigkill_then_rerun_resumes_and_matches_uninterrupted_run(toy, tmp_path_factory, tmp_path):
    home = toy[0]
    reference = sh.reference_rl(tmp_path_factory)
    workdir = tmp_path / "run"
    args = ["--stage=rl", f"--workdir={workdir}", *sh.cli_overrides(sh.RL_OVERRIDES)]
    env = sh.cli_env(home)

    # 1. Start the run and kill it as soon as its first checkpoint is committed.
    first = workdir / "checkpoints" / "1"
    proc = sh.popen(args, env, str(tmp_path / "killed"))
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended (rc {proc.returncode}) before it could be killed:\n"
        + sh.read(str(tmp_path / "killed.err"))[-3000:]
    )
    saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert saved and saved[-1] < sh.RL_STEPS and not (workdir / "hf").exists()

    # 2. The same command again: resumes from the last complete checkpoint and finishes.
    done = run_cli(args, env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = re.search(r"resumed from step (\d+)", done.stderr)
    assert resumed and 1 <= int(resumed.group(1)) < sh.RL_STEPS, done.stderr[-3000:]

    # 3. Exactly the uninterrupted run's parameters and logged numbers.
    want = sh.hf_params(os.path.join(reference, "hf", "final"))
    got = sh.hf_params(str(workdir / "hf" / "final"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert sh.metric_rows(str(workdir)) == sh.metric_rows(reference)

    # 4. A checkpoint damaged afterwards: the next rerun stops with one line naming it.
    last = workdir / "checkpoints" / str(sh.RL_STEPS)
    for f in last.glob("model/**/d/*"):
        f.write_bytes(f.read_bytes()[: max(f.stat().st_size // 3, 1)])
    failed = run_cli(args, env, timeout=300)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and str(last) in message, message
