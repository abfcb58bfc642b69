"""Multi-host on one machine: 2 processes x 4 simulated CPU devices (jax.distributed on localhost,
gloo collectives) run the same GRPO command as 1 process x 8 devices and must end with the same
parameters; only process 0 prints and writes metrics.

This test runs in CI like every other (no skip, no marker that deselects it): it is the only check
that the stages work when the mesh spans processes (batches placed from host data, the host reward
callback, orbax's coordinated checkpoints, process-0-only logging).
"""

import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
import stage_helpers as sh


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    with sh.toy_home(tmp_path_factory) as home_and_workdir:
        yield home_and_workdir


def _process_env(home: str, address: str, i: int) -> dict[str, str]:
    """Environment of process `i` of 2 (4 simulated devices each) joined at `address`."""
    return sh.cli_env(
        home,
        devices=4,
        R1JAX_COORDINATOR_ADDRESS=address,
        R1JAX_NUM_PROCESSES="2",
        R1JAX_PROCESS_ID=str(i),
        R1JAX_CPU_COLLECTIVES="1",
        # No persistent compilation cache: JAX keys its entries per process and only process 0
        # writes them, so with a warm cache process 0 loads every program while process 1
        # compiles it, and reaches the first collective of each new device group that much
        # earlier. gloo waits 30 s for its peer there (hard-coded), then fails the run with
        # "Gloo context initialization failed: DEADLINE_EXCEEDED".
        R1JAX_COMPILATION_CACHE="0",
    )


def _run_two_processes(args: list[str], home: str, tmp_path) -> list[tuple[str, str]]:
    """Run the CLI `args` as 2 processes x 4 devices; [(stdout, stderr)] of each, once both exit."""
    address = f"127.0.0.1:{sh.free_port()}"
    procs = []
    for i in range(2):
        env = _process_env(home, address, i)
        procs.append(sh.popen(args, env, str(tmp_path / f"p{i}")))
    finished = _wait_all(procs, timeout=900)
    logs = [
        (sh.read(str(tmp_path / f"p{i}.out")), sh.read(str(tmp_path / f"p{i}.err")))
        for i in range(2)
    ]
    if not finished or any(p.returncode != 0 for p in procs):
        pytest.fail(
            f"2-process run failed (return codes {[p.returncode for p in procs]}):\n"
            f"--- process 0:\n{logs[0][1][-3000:]}\n--- process 1:\n{logs[1][1][-3000:]}"
        )
    return logs


def test_two_processes_match_one_process(toy, tmp_path_factory, tmp_path):
    home = toy[0]
    reference = sh.reference_rl(tmp_path_factory)  # 1 process x 8 devices, same command
    workdir = tmp_path / "run"
    # Asynchronous checkpointing here (the reference saves synchronously): the numbers cannot
    # depend on it, and orbax's background commit across processes gets exercised. Over
    # data=2 x fsdp=4, the 4 prompts of a step split over the processes (2 each), where the
    # reference's fsdp=8 keeps them whole: the rollout's inputs are placed from host data (jit
    # refused the numpy prompts for a sharding across processes).
    overrides = {**sh.RL_OVERRIDES, "ckpt.async_save": True, "mesh.data": 2, "mesh.fsdp": 4}
    args = ["--stage=rl", f"--workdir={workdir}", *sh.cli_overrides(overrides)]
    logs = _run_two_processes(args, home, tmp_path)

    # Same parameters as one process with the same 8-device mesh.
    base = sh.hf_params(os.path.join(home, "toy_base"))
    want = sh.hf_params(os.path.join(reference, "hf", "final"))
    assert sh.max_param_change(want, base) > 1e-4  # training moved them: the check can fail
    _assert_same_run(str(workdir), reference)

    out0, err0 = _only_process_0_printed(logs)
    assert "GRPO done" in err0 and f"step {sh.RL_STEPS}/{sh.RL_STEPS}" in out0
    # The pattern also matches process 0's metric rows and progress bar.
    assert any(x.startswith("step ") for x in _r1jax_lines(out0))
    assert any(x.strip().startswith("GRPO:") for x in _r1jax_lines(err0))
    assert "GRPO done" in sh.read(str(workdir / "log_p1.txt"))
    with open(workdir / "config_rl.json") as f:
        assert json.load(f)["rl"]["steps"] == sh.RL_STEPS


def test_two_processes_sample_dynamically_like_one_process(toy, tmp_path):
    """DAPO's dynamic sampling keeps groups by their rewards, read from rollouts split over the
    processes, and gathers the kept rows across them: every process must keep the same ones."""
    from r1jax.stages import common

    overrides = {**sh.RL_OVERRIDES, "rl.dynamic_sampling": True, "rl.max_sampling_rounds": 3}
    config = sh.set_fields(sh.load_config("rl"), overrides)
    common.validate(config, "rl")
    common.run_stage("rl", config, str(tmp_path / "one"))  # 1 process x 8 devices
    rounds = [r["dynamic_sampling/rounds"] for r in sh.metric_rows(str(tmp_path / "one"))[1:]]
    assert max(rounds) > 1, rounds  # (some step drew more batches: the gather ran)
    workdir = tmp_path / "two"
    args = ["--stage=rl", f"--workdir={workdir}"]
    args += sh.cli_overrides({**overrides, "mesh.data": 2, "mesh.fsdp": 4})
    _run_two_processes(args, toy[0], tmp_path)
    _assert_same_run(str(workdir), str(tmp_path / "one"))


def test_two_processes_pretrain_like_one_process(toy, tmp_path):
    """Pretraining, its tag-copy checks (the rows sharded over both processes) and the restart
    they decide included, gives one process's weights, metrics and restart record."""
    from r1jax.stages import common, pretrain

    # Checks at every step, a deadline after the first corpus step: nothing copies this early, so
    # the first initialisation is abandoned there and the second runs to the end.
    overrides = {
        **sh.PRETRAIN_OVERRIDES,
        "pretrain.tag_copy_every": 1,
        "pretrain.tag_copy_restarts": 1,
        "pretrain.tag_copy_deadline": 1,
    }
    reference = tmp_path / "reference"  # 1 process x 8 devices
    config = sh.set_fields(sh.load_config("pretrain"), overrides)
    common.validate(config, "pretrain")
    common.run_stage("pretrain", config, str(reference))
    workdir = tmp_path / "run"
    args = ["--stage=pretrain", f"--workdir={workdir}", *sh.cli_overrides(overrides)]
    logs = _run_two_processes(args, toy[0], tmp_path)

    marker = pretrain.RESTART_FILE
    got, want = (json.loads((d / "restart1" / marker).read_text()) for d in (workdir, reference))
    assert got.keys() == want.keys() and got["seed"] == want["seed"]
    np.testing.assert_allclose(got["abandoned"]["tag_copy"], want["abandoned"]["tag_copy"], 1e-4)
    _assert_same_run(str(workdir), str(reference))
    _assert_same_run(str(workdir / "restart1"), str(reference / "restart1"), hf=False)
    assert all(np.isfinite(r["tag_copy"]) for r in sh.metric_rows(str(workdir)))
    out0, err0 = _only_process_0_printed(logs)
    assert "Starting over from a new one" in err0 and "toy base model saved" in err0
    assert any(x.strip().startswith("pretrain") for x in _r1jax_lines(err0))


def _assert_same_run(workdir: str, reference: str, hf: bool = True) -> None:
    """The final HF weights (if `hf`) and the metric rows of `workdir` are `reference`'s.

    Not bitwise: the cross-process all-reduce (gloo) may sum in another order than the in-process
    one, and Adam divides by sqrt(v), so a near-zero gradient's rounding shows: atol is 100x below
    one Adam step (1e-3). (On the AMD EPYC host one embedding entry of the RL run differs by
    5.9e-6, the same before and after session 22's changes; 5e-6 passed on the Intel host.)
    """
    if hf:
        want = sh.hf_params(os.path.join(reference, "hf", "final"))
        got = sh.hf_params(os.path.join(workdir, "hf", "final"))
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    rows, want_rows = sh.metric_rows(workdir), sh.metric_rows(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows]  # written once per step
    for row, want_row in zip(rows, want_rows, strict=True):
        assert row.keys() == want_row.keys()
        np.testing.assert_allclose(
            [row[k] for k in row], [want_row[k] for k in row], rtol=1e-4, atol=1e-6
        )


# A line r1jax itself prints: a log record ("12:34:56 INFO r1jax...: ..."), a direct message
# ("r1jax: could not upload ..."), a metrics row ("step 5/8 | ..."), or a stage's progress bar
# ("GRPO:  40%|..."). Other text on stderr is not r1jax's: XLA's C++ warnings, which quote op
# metadata (r1jax paths and names included).
_R1JAX_LINE = re.compile(
    r"\d\d:\d\d:\d\d [A-Z]+ r1jax|^r1jax: |^step \d+/\d+ \||"
    r"^(GRPO|pretrain|SFT|distill)[^:]*: +\d+%"
)


def _r1jax_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if _R1JAX_LINE.search(x.strip())]


def _only_process_0_printed(logs: list[tuple[str, str]]) -> tuple[str, str]:
    """Assert that r1jax printed on process 0 only; return process 0's stdout and stderr.

    On process 1 that means no r1jax line on stderr, and nothing on stdout but gloo's connection
    messages (whose threads can interleave them mid-line, leaving fragments like "1"; a line is
    r1jax's if it holds "r1jax" or is r1jax-shaped). Process 0's log must hold r1jax's log
    records, so the pattern is known to match r1jax's real output."""
    (out0, err0), (out1, err1) = logs

    def mine(line: str) -> bool:
        return "r1jax" in line or bool(_R1JAX_LINE.search(line.strip()))

    stdout1 = [x for x in out1.splitlines() if "Gloo" not in x and "peer ranks" not in x]
    printed1 = _r1jax_lines(err1) + [x for x in stdout1 if mine(x)]
    assert printed1 == [], printed1
    assert any(" INFO r1jax" in x for x in _r1jax_lines(err0)), err0[-2000:]
    return out0, err0


def _wait_all(procs, timeout: float) -> bool:
    """Wait for every process; if one fails or time runs out, kill the rest (a peer that lost its
    partner would wait in a collective forever). True if all exited with code 0 by themselves."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return True
        if any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return False


GENERATE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from r1jax import sharding
sharding.initialize_distributed()
from r1jax import sampling
from r1jax.models import hf
import helpers
mesh = sharding.make_mesh(fsdp=-1)
model = hf.load(helpers.hf_checkpoint("qwen2_sharp"), mesh=mesh, rules=sharding.SAMPLING_RULES)
out = sampling.generate(model, {prompts!r}, max_new_tokens=3, mesh=mesh, temperature=0.0)
print("TOKENS", out.tokens)
out = sampling.generate(model, {prompts!r}, max_new_tokens=3, mesh=mesh, **{sampled!r})
print("SAMPLED", out.tokens)
"""


def test_generate_on_a_two_host_mesh_returns_every_row_to_every_process(tmp_path):
    """8 prompts over 8 batch shards on 2 processes: each process holds half the rows; every
    process gets all of them (eval and rejection sampling score them all), as on one host, and
    at temperature 1 the same samples as one process draws with the seed."""
    import subprocess
    import sys

    from helpers import hf_checkpoint

    from r1jax import sampling
    from r1jax.models import hf

    prompts = [[1, 2, 3, 4 + i] for i in range(8)]
    script = tmp_path / "generate.py"
    sampled = dict(temperature=1.0, num_samples=2, seed=7)
    script.write_text(
        GENERATE_SCRIPT.format(tests=os.path.dirname(__file__), prompts=prompts, sampled=sampled)
    )
    address = f"127.0.0.1:{sh.free_port()}"
    procs = []
    for i in range(2):
        env = _process_env(str(tmp_path / "home"), address, i)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
        )  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    model = hf.load(hf_checkpoint("qwen2_sharp"))
    want = sampling.generate(model, prompts, max_new_tokens=3, temperature=0.0).tokens
    drawn = sampling.generate(model, prompts, max_new_tokens=3, **sampled).tokens
    assert drawn != [t for t in want for _ in range(2)]  # (really sampled)
    for out, _ in outputs:
        (line,) = [x for x in out.splitlines() if x.startswith("TOKENS")]
        assert line == f"TOKENS {want}"
        (line,) = [x for x in out.splitlines() if x.startswith("SAMPLED")]
        assert line == f"SAMPLED {drawn}"


EVAL_SCRIPT = """
import json, sys
import jax
from r1jax import launch
from r1jax.stages import eval as eval_stage

grade, evaluate, score = eval_stage.Grader.__call__, eval_stage.evaluate, eval_stage.score_prompt

def unlike_process_0(self, texts, **columns):  # as a time limit met on one host only might
    correct = grade(self, texts, **columns)
    return 1.0 - correct if jax.process_index() == 1 else correct

def vote_unlike_process_0(answers, correct, same=None):  # (the vote compares by math-verify)
    out = score(answers, correct, same)
    k = len(correct)
    return out | {{f"cons@{{k}}": 1.0 - out[f"cons@{{k}}"]}} if jax.process_index() == 1 else out

def evaluate_and_keep(*args, **kwargs):
    result = evaluate(*args, **kwargs)
    with open(f"{out}{{jax.process_index()}}.json", "w") as f:
        json.dump(result, f)
    return result

eval_stage.Grader.__call__, eval_stage.evaluate = unlike_process_0, evaluate_and_keep
eval_stage.score_prompt = vote_unlike_process_0
sys.argv = ["r1jax.launch", *{args!r}]
launch.main()
"""


def test_every_process_of_an_evaluation_counts_process_0s_grades(toy, tmp_path):
    """Each process grades every sample and votes on its answers, and not always alike (a time
    limit met on one host): the RL stage's processes kept different best checkpoints, then
    exported different ones. Process 1 grades and votes here as process 0 would not; both must
    report process 0's figures."""
    import subprocess
    import sys

    overrides = {"eval.num_prompts": 6, "eval.batch_prompts": 4, "eval.max_new_tokens": 24}
    args = ["--stage=eval", f"--workdir={tmp_path / 'run'}", *sh.cli_overrides(overrides)]
    script = tmp_path / "eval.py"
    script.write_text(EVAL_SCRIPT.format(out=str(tmp_path / "result"), args=args))
    address = f"127.0.0.1:{sh.free_port()}"
    procs = []
    for i in range(2):
        with open(tmp_path / f"p{i}.err", "w") as err:
            env = _process_env(toy[0], address, i)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script)], env=env, cwd=sh.REPO,
                    stdout=subprocess.DEVNULL, stderr=err,
                )
            )  # fmt: skip
    assert _wait_all(procs, timeout=900), sh.read(str(tmp_path / "p1.err"))[-3000:]
    got = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    assert got[0] == got[1]
    written = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert {k: v for k, v in written.items() if k not in ("model", "minutes")} == got[0]
    samples = (tmp_path / "run" / "eval_samples.jsonl").read_text().splitlines()
    graded = [json.loads(line)["correct"] for line in samples]
    assert got[0]["pass@1"] == pytest.approx(np.mean(graded))


def _sigterm_two_processes(
    args: list[str], home: str, tmp_path, name: str, ready, signum: int = signal.SIGTERM
) -> str:
    """Run `args` on 2 processes, send both `signum` once `ready()`; both must exit with 130.
    Returns process 0's stderr."""
    address = f"127.0.0.1:{sh.free_port()}"
    procs = [
        sh.popen(args, _process_env(home, address, i), str(tmp_path / f"{name}{i}"))
        for i in range(2)
    ]
    try:
        deadline = time.time() + 600
        while not ready():
            assert time.time() < deadline and all(p.poll() is None for p in procs), name
            time.sleep(0.1)
        for p in procs:
            p.send_signal(signum)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err0 = sh.read(str(tmp_path / f"{name}0.err"))
    assert codes == [130, 130], (codes, err0[-2000:])
    return err0


def test_sigterm_stops_every_process_at_one_saved_step(toy, tmp_path):
    """SIGTERM (`launch/tpu_pod.sh stop`, a preemption notice) reaches a multi-process run through
    JAX's preemption service: every process stops at the same step, once that step's checkpoint
    is written, and says how to resume (it used to train on to the last step). A resumed run told
    to stop before its first save stops too."""
    workdir = tmp_path / "run"
    overrides = {
        "sft.num_examples": 32,
        "sft.seq_len": 128,
        "sft.batch_size": 8,
        "sft.epochs": 50.0,  # 200 steps: far more than run before the signal
        "ckpt.every": 50,
        "log.every": 1,
    }
    args = ["--stage=sft", f"--workdir={workdir}", *sh.cli_overrides(overrides)]

    def run_until(ready, name: str, signum: int = signal.SIGTERM) -> int:
        """Start both processes, signal them once `ready()`; the step they stopped at."""
        err0 = _sigterm_two_processes(args, toy[0], tmp_path, name, ready, signum)
        match = re.search(
            r"stopped at step (\d+) \(SIGTERM / Ctrl-C / preemption\); its checkpoint is saved; "
            r"the same command resumes",
            err0,
        )
        assert match, err0[-2000:]
        return int(match.group(1))

    def rows() -> int:
        return len(sh.metric_rows(str(workdir))) if (workdir / "metrics.jsonl").exists() else 0

    step = run_until(lambda: rows() >= 3, "first")
    assert 3 <= step < 200
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]  # committed, not every 50

    # Resumed, and told to stop before its first save: the stop must still come (the service
    # counts in calls that only rise; with the training step it waited for a step 1 never seen).
    def restored() -> bool:
        return "Restored checkpoint" in sh.read(str(tmp_path / "again0.err"))

    # (and Ctrl-C, as srun passes it to every task: it stopped each process where it was, with
    # nothing saved; it is passed on as SIGTERM now)
    again = run_until(restored, "again", signal.SIGINT)
    assert step < again < 200
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(step), str(again)]


def test_sigterm_stops_a_multi_process_evaluation_between_batches(toy, tmp_path):
    """Evaluation and rejection sampling keep no checkpoints, so they had no step to stop at:
    SIGTERM left a multi-process run going until SIGKILL. Every process now stops before the
    next batch of prompts, together, and says the command starts over."""
    workdir = tmp_path / "eval"
    overrides = {"eval.num_prompts": 64, "eval.batch_prompts": 4, "eval.max_new_tokens": 32}
    args = ["--stage=eval", f"--workdir={workdir}", *sh.cli_overrides(overrides)]

    def started() -> bool:
        return "evaluating" in sh.read(str(tmp_path / "eval0.err"))

    err0 = _sigterm_two_processes(args, toy[0], tmp_path, "eval", started)
    assert re.search(
        r"stopped at prompt \d+ of 64 \(evaluation\) \(SIGTERM / Ctrl-C / preemption\); "
        r"--stage=eval keeps no checkpoints: the same command starts it again",
        err0,
    ), err0[-2000:]
    assert not (workdir / "eval.json").exists()


def test_a_multi_process_rejection_sampling_resumes_from_process_0s_batches(toy, tmp_path):
    """Process 0 alone reads and writes the saved batches (the workdir need not be shared): every
    process must skip the same ones, or they sample different batches and the collectives hang."""
    from r1jax.stages import rejection_sampling as rs

    workdir = tmp_path / "run"
    overrides = {
        "rejection_sampling.num_prompts": 8,
        "rejection_sampling.batch_prompts": 4,
        "rejection_sampling.num_samples": 2,
        "rejection_sampling.max_new_tokens": 16,
    }
    args = ["--stage=rejection_sampling", f"--workdir={workdir}", *sh.cli_overrides(overrides)]
    (tmp_path / "first").mkdir()
    (tmp_path / "again").mkdir()
    _run_two_processes(args, toy[0], tmp_path / "first")
    output = (workdir / "rejection_sampled.jsonl").read_text()
    folder = workdir / rs.SAMPLES_FOLDER
    manifest = json.loads((folder / "run.json").read_text())
    assert manifest["finished"]
    # As if stopped after its first batch.
    (folder / "prompts_000000004-000000008.jsonl").unlink()
    (folder / "run.json").write_text(json.dumps({**manifest, "finished": False}))
    logs = _run_two_processes(args, toy[0], tmp_path / "again")
    assert "resuming, 1 of 2 batches already sampled" in logs[0][1]
    assert (workdir / "rejection_sampled.jsonl").read_text() == output
    assert (folder / "prompts_000000004-000000008.jsonl").exists()
    # A batch damaged on process 0's disk: both stop, process 1 pointing to process 0's output
    # (it waited for process 0's counts, and died of a lost connection).
    damaged = folder / "prompts_000000000-000000004.jsonl"
    damaged.write_text(damaged.read_text()[:-5])
    address = f"127.0.0.1:{sh.free_port()}"
    procs = [
        sh.popen(args, _process_env(toy[0], address, i), str(tmp_path / f"damaged{i}"))
        for i in range(2)
    ]
    codes, seconds = _exit_codes(procs)
    last = [sh.read(str(tmp_path / f"damaged{i}.err")).strip().splitlines()[-1] for i in range(2)]
    assert codes == [1, 1] and seconds < 25, (codes, seconds, last)
    assert "000004.jsonl:8 is not a sample" in last[0], last
    assert "process 0 could not filter the saved samples (see its output)" in last[1], last


def _exit_codes(procs, timeout: float = 600) -> tuple[list[int], float]:
    """Each process's exit code, and the seconds from the first exit to the last (a peer that
    waited for a collective would take gloo's 30 s timeout, or forever). Measured between exits,
    not from the start: start-up on a loaded 2-core machine takes from seconds to minutes."""
    exits = {}
    deadline = time.monotonic() + timeout
    try:
        while len(exits) < len(procs) and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if i not in exits and p.poll() is not None:
                    exits[i] = time.monotonic()
            time.sleep(0.05)
        return [p.poll() for p in procs], (
            max(exits.values()) - min(exits.values()) if exits else float("inf")
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_start_up_error_on_one_host_stops_every_process(toy, tmp_path):
    """The model folder missing on one host only: that host says so, the other stops too, naming
    it (it used to run on into a collective and fail 30 s later with a gloo timeout)."""
    address = f"127.0.0.1:{sh.free_port()}"
    procs = []
    for i, model in enumerate([os.path.join(toy[0], "toy_base"), str(tmp_path / "not_here")]):
        env = _process_env(toy[0], address, i)
        args = ["--stage=eval", f"--workdir={tmp_path / 'run'}", f"--config.model.path={model}"]
        procs.append(sh.popen(args, env, str(tmp_path / f"p{i}")))
    codes, seconds = _exit_codes(procs)
    assert codes == [1, 1] and seconds < 25, (codes, seconds)  # (a gloo timeout: 30 s)
    last = [sh.read(str(tmp_path / f"p{i}.err")).strip().splitlines()[-1] for i in range(2)]
    assert last[0] == "error: process(es) [1] cannot start (see their output)", last
    assert last[1].startswith("config error: model.path") and "not_here" in last[1], last


def test_the_toy_model_on_hosts_without_a_shared_home_is_refused_on_every_process(toy, tmp_path):
    """model.path='toy' on a TPU slice: every process built the toy base model into its own
    R1JAX_HOME (each host's local disk), process 1 waited 600 s for checkpoint files only process
    0's disk had, then both hung. Now refused at once, by every process alike."""
    address = f"127.0.0.1:{sh.free_port()}"
    procs = []
    for i, home in enumerate([toy[0], str(tmp_path / "home1")]):  # (process 0's has the model)
        env = _process_env(home, address, i)
        procs.append(
            sh.popen(
                ["--stage=eval", f"--workdir={tmp_path / 'run'}"], env, str(tmp_path / f"p{i}")
            )
        )
    codes, seconds = _exit_codes(procs)
    assert codes == [1, 1] and seconds < 25, (codes, seconds)
    for i in range(2):
        last = sh.read(str(tmp_path / f"p{i}.err")).strip().splitlines()[-1]
        assert "1 of the 2 processes do not share" in last and "R1JAX_HOME" in last, last


def test_a_workdir_the_hosts_do_not_share_is_refused_on_every_process(toy, tmp_path):
    """--workdir=/scratch/run on hosts without a shared file system: every process trained, then
    waited forever for a checkpoint whose shards were on the other host's disk (no message for
    10 minutes, and SIGTERM did not end it). Now a checkpointing stage is refused before any
    work, by every process (evaluation and rejection sampling write from process 0 alone)."""
    address = f"127.0.0.1:{sh.free_port()}"
    procs = []
    for i in range(2):  # (each host's own disk: one folder per process)
        env = _process_env(toy[0], address, i)
        args = ["--stage=sft", f"--workdir={tmp_path / f'run{i}'}"]
        procs.append(sh.popen(args, env, str(tmp_path / f"p{i}")))
    codes, seconds = _exit_codes(procs)
    assert codes == [1, 1] and seconds < 25, (codes, seconds)
    for i in range(2):
        last = sh.read(str(tmp_path / f"p{i}.err")).strip().splitlines()[-1]
        assert "is not one folder shared by every host (1 of the 2 processes" in last, last


def test_a_checkpoint_damaged_in_one_process_files_stops_every_process(toy, tmp_path):
    """A resume whose checkpoint is damaged only in the files process 1 wrote: process 1 failed
    with the one-line error, and process 0 waited for it inside orbax's restore forever."""
    import glob

    workdir = tmp_path / "run"
    overrides = {"sft.num_examples": 16, "sft.seq_len": 128, "sft.batch_size": 8, "ckpt.every": 1}
    args = ["--stage=sft", f"--workdir={workdir}", *sh.cli_overrides(overrides)]
    _run_two_processes(args, toy[0], tmp_path)
    last = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    damaged = glob.glob(
        str(workdir / "checkpoints" / str(last) / "*" / "ocdbt.process_1" / "d" / "*")
    )
    assert damaged
    for path in damaged:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    address = f"127.0.0.1:{sh.free_port()}"
    procs = [
        sh.popen(args, _process_env(toy[0], address, i), str(tmp_path / f"again{i}"))
        for i in range(2)
    ]
    codes, seconds = _exit_codes(procs)
    assert codes == [1, 1] and seconds < 25, (codes, seconds)
    for i in range(2):
        line = sh.read(str(tmp_path / f"again{i}.err")).strip().splitlines()[-1]
        assert line.startswith(f"error: Checkpoint {workdir}/checkpoints/{last} is damaged"), line


def test_data_that_differs_between_hosts_is_refused_on_every_process(toy, tmp_path):
    """Each host reads its own copy of a data file: with one copy stale, every device took its
    slice of the batch from its own host's rows, and process 0 graded the mix against its own
    answers, silently. Now refused by every process, naming the one that differs."""
    address = f"127.0.0.1:{sh.free_port()}"
    rows = [{"prompt": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(40)]
    procs = []
    for i in range(2):
        if i:
            rows[7] = {**rows[7], "solution": "0"}  # (process 1's copy: one answer differs)
        data = tmp_path / f"copy{i}" / "rows.jsonl"
        data.parent.mkdir()
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        env = _process_env(toy[0], address, i)
        args = ["--stage=eval", f"--workdir={tmp_path / 'run'}", f"--config.data.source={data}"]
        procs.append(sh.popen(args, env, str(tmp_path / f"p{i}")))
    codes, seconds = _exit_codes(procs)
    assert codes == [1, 1], codes
    for i in range(2):
        last = sh.read(str(tmp_path / f"p{i}.err")).strip().splitlines()[-1]
        assert "differs on process(es) [1]" in last, last
    # The same for a model folder whose tokenizer files differ on one host (same weights and
    # config.json, which were all its check read): the hosts templated the prompts apart.
    address, procs = f"127.0.0.1:{sh.free_port()}", []
    for i in range(2):
        model = tmp_path / f"model{i}"
        shutil.copytree(os.path.join(toy[0], "toy_base"), model)
        if i:
            settings = json.loads((model / "tokenizer_config.json").read_text())
            settings["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}x"
            (model / "tokenizer_config.json").write_text(json.dumps(settings))
        args = ["--stage=eval", f"--workdir={tmp_path / 'run2'}", f"--config.model.path={model}"]
        args += ["--config.data.template=chat"]
        procs.append(sh.popen(args, _process_env(toy[0], address, i), str(tmp_path / f"q{i}")))
    codes, seconds = _exit_codes(procs)
    assert codes == [1, 1], codes
    for i in range(2):
        last = sh.read(str(tmp_path / f"q{i}.err")).strip().splitlines()[-1]
        assert "prompts as templated and tokenised" in last and "process(es) [1]" in last, last
    # Pretraining: each process tokenises its own corpus (another tokenizers version on one host
    # gives other rows); here process 1's corpus has one word more.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from r1jax.data import corpus\n"
        "made = corpus.pretrain_corpus\n"
        "corpus.pretrain_corpus = lambda *a, **k: [d + ' more' for d in made(*a, **k)]\n"
    )
    address, procs = f"127.0.0.1:{sh.free_port()}", []
    args = ["--stage=pretrain", f"--workdir={tmp_path / 'run3'}"]
    args += sh.cli_overrides(sh.PRETRAIN_OVERRIDES)
    for i in range(2):
        env = _process_env(toy[0], address, i)
        if i:
            env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
        procs.append(sh.popen(args, env, str(tmp_path / f"t{i}")))
    codes, seconds = _exit_codes(procs)
    assert codes == [1, 1], codes
    for i in range(2):
        last = sh.read(str(tmp_path / f"t{i}.err")).strip().splitlines()[-1]
        assert "pretraining corpus as tokenised" in last and "process(es) [1]" in last, last


def test_a_process_told_another_process_count_stops_every_process(toy, tmp_path):
    """A process told R1JAX_NUM_PROCESSES=3 joins a 2-process job and stops with its one line;
    it left before the start-up agreement, where process 0 then waited for it until gloo's
    timeout, and died with a traceback."""
    address, procs = f"127.0.0.1:{sh.free_port()}", []
    for i, count in enumerate(("2", "3")):
        env = {**_process_env(toy[0], address, i), "R1JAX_NUM_PROCESSES": count}
        args = ["--stage=eval", f"--workdir={tmp_path / 'run'}"]
        procs.append(sh.popen(args, env, str(tmp_path / f"p{i}")))
    codes, seconds = _exit_codes(procs)
    assert codes == [1, 1] and seconds < 25, (codes, seconds)
    last = [sh.read(str(tmp_path / f"p{i}.err")).strip().splitlines()[-1] for i in range(2)]
    assert last[0] == "error: process(es) [1] cannot start (see their output)", last
    assert "R1JAX_NUM_PROCESSES=3 here, but the coordinator" in last[1], last


def test_a_warning_while_the_config_is_validated_is_printed_by_process_0_only(toy, tmp_path):
    """Validation runs before the stage's logging (process 0 to the console): its warnings were
    printed by every host, in absl's format. (Each process is given its own workdir here, which
    is refused next: nothing compiles.)"""
    address, procs = f"127.0.0.1:{sh.free_port()}", []
    for i in range(2):
        args = ["--stage=sft", f"--workdir={tmp_path / f'run{i}'}"]
        args += ["--config.model.param_dtype=bfloat16"]
        procs.append(sh.popen(args, _process_env(toy[0], address, i), str(tmp_path / f"p{i}")))
    codes, seconds = _exit_codes(procs)
    assert codes == [1, 1], codes
    warned = [
        [x for x in sh.read(str(tmp_path / f"p{i}.err")).splitlines() if "param_dtype" in x]
        for i in range(2)
    ]
    assert len(warned[0]) == 1 and warned[1] == [], warned


LOCAL_BATCH_SCRIPT = """
from r1jax import sharding
sharding.initialize_distributed()
import jax, numpy as np
mesh = sharding.make_mesh(fsdp=2, tensor=4)  # 2 batch shards for 4 processes
pid = jax.process_index()
try:
    sharding.shard_local_batch({"x": np.arange(2)[:, None] + 2 * pid}, mesh)
except ValueError as e:
    print("REFUSED", "fewer groups than the 4 processes" in str(e))
"""


def test_a_local_batch_over_fewer_batch_shards_than_processes_is_refused(tmp_path):
    """4 processes x 2 devices, fsdp=2 x tensor=4: processes 0 and 1 hold the same rows, yet each
    passed its own; the global batch came out with 4 of the 8 rows, differing between processes."""
    import subprocess
    import sys

    script = tmp_path / "local_batch.py"
    script.write_text(LOCAL_BATCH_SCRIPT)
    address = f"127.0.0.1:{sh.free_port()}"
    procs = []
    for i in range(4):
        env = sh.cli_env(
            str(tmp_path / "home"), devices=2, R1JAX_COORDINATOR_ADDRESS=address,
            R1JAX_NUM_PROCESSES="4", R1JAX_PROCESS_ID=str(i), R1JAX_CPU_COLLECTIVES="1",
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
        )  # fmt: skip
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "REFUSED True" in out, (out, err[-2000:])
