"""Tests for the cluster launchers in launch/ (TPU pod slice, Slurm GPU, plain-SSH GPU).

What is checked:
- every script parses (`bash -n`) and is shellcheck-clean (skipped when shellcheck is missing);
- bad usage (missing --name/--nodes/--hosts/--stage, unknown stage or option) exits 2 with a
  message naming what to fix;
- --dry-run prints the real commands: these are parsed back with shlex (POSIX rules, as a remote
  shell would) and the r1jax arguments must come out word for word, quotes and spaces included;
- the scripts also run for real against stand-ins for `gcloud`, `ssh`, `srun`, `sbatch`,
  `scontrol` and `uv` placed first on PATH. The stand-ins run the "remote" commands locally with
  `sh` (dash here, stricter than the bash on real hosts), and a stand-in Python records the
  argv, working directory and R1JAX_* environment each process saw. This covers ranks and
  coordinator addresses, one failing rank stopping the others, and TPU detach + stop.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_gpu.sh", "ssh_gpu.sh", "common.sh"]
EXECUTABLES = ["tpu_pod.sh", "slurm_gpu.sh", "ssh_gpu.sh"]
TRICKY = '--config.data.note=it\'s a "test" $HOME'  # must reach r1jax unchanged

# ---------------------------------------------------------------------------------------------
# Stand-ins for the cluster tools

FAKE_PYTHON = f"""#!{sys.executable}
# Stand-in for the Python that runs `-m r1jax.launch`: records what it was started with.
import json, os, signal, sys, time, uuid
if os.environ.get("FAKE_IGNORE_TERM"):  # a hung r1jax: SIGTERM acts only at a step's end
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[1] == "-c":
    print("stand-in python: import check ok")
    sys.exit(0)
assert sys.argv[1:3] == ["-m", "r1jax.launch"], sys.argv
rank = os.environ.get("R1JAX_PROCESS_ID") or os.path.basename(os.environ["HOME"])
# (before the record the tests wait for: a SIGTERM sent right after it must find the handler)
if os.environ.get("FAKE_SAY_TERM"):  # as r1jax stops: a last line, then exit 130
    def stop(*_):
        print("stand-in r1jax got SIGTERM, rank", rank, flush=True)
        sys.exit(130)
    signal.signal(signal.SIGTERM, stop)
record = dict(argv=sys.argv[3:], cwd=os.getcwd(), pid=os.getpid(), rank=rank,
              env={{k: v for k, v in os.environ.items()
                   if k.startswith(("R1JAX_", "JAX_", "PYTHONUNBUFFERED", "EXTRA_"))}})
path = os.path.join(os.environ["FAKE_RECORDS"], uuid.uuid4().hex + ".json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.rename(path + ".tmp", path)
print("stand-in r1jax started, rank", rank, flush=True)
if rank == os.environ.get("FAKE_STOPPED_RANK"):  # r1jax's exit after a clean stop
    sys.exit(130)
if rank == os.environ.get("FAKE_FAIL_RANK"):
    sys.exit(3)
if rank == os.environ.get("FAKE_KILLED_RANK"):  # as JAX aborts the survivors of a dead peer
    os.kill(os.getpid(), 9)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""

# ssh [options] destination command...: runs the command locally with sh, as a child in a
# session of its own, so that neither killing this process nor a Ctrl-C reaches the "remote"
# command, as with real ssh.
FAKE_SSH = r"""#!/usr/bin/env bash
set -euo pipefail
while [ $# -gt 0 ]; do
  case "$1" in
    -[oipFlJE]) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
echo "$1" >> "$FAKE_RECORDS/ssh-hosts.txt"
shift
setsid -w sh -c "$*"
"""

# gcloud compute tpus tpu-vm {create,delete,scp,ssh}: workers are directories worker0..N-1
# under FAKE_TPU_ROOT, each the HOME of its "host"; commands run in sessions of their own, as
# FAKE_SSH does.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
set -euo pipefail
[ "$1 $2 $3" = "compute tpus tpu-vm" ] || { echo "fake gcloud: unexpected $*" >&2; exit 1; }
verb="$4"; shift 4
printf '%s\n' "$verb $*" >> "$FAKE_RECORDS/gcloud.txt"
worker=0 command="" positional=()
for arg in "$@"; do
  case "$arg" in
    --worker=*) worker="${arg#--worker=}" ;;
    --command=*) command="${arg#--command=}" ;;
    --*) ;;
    *) positional+=("$arg") ;;
  esac
done
workers=()
if [ "$worker" = all ]; then
  for ((i = 0; i < FAKE_TPU_WORKERS; i++)); do workers+=("$FAKE_TPU_ROOT/worker$i"); done
else
  workers=("$FAKE_TPU_ROOT/worker$worker")
fi
case "$verb" in
  create | delete) ;;
  scp) for w in "${workers[@]}"; do cp "${positional[0]}" "$w/${positional[1]#*:}"; done ;;
  ssh)
    pids=()
    for w in "${workers[@]}"; do
      (cd "$w" && HOME="$w" setsid -w sh -c "$command") &
      pids+=("$!")
    done
    rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    exit "$rc"
    ;;
esac
"""

FAKE_UV = r"""#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "$*" >> "$FAKE_RECORDS/uv.txt"
if [ "$1" = venv ]; then
  dir="${*: -1}"
  mkdir -p "$dir/bin"
  ln -s "$FAKE_PYTHON" "$dir/bin/python"
fi
"""

# curl, for the TPU VM metadata server only: worker N of a 2-worker slice (N from its HOME).
FAKE_CURL = r"""#!/usr/bin/env bash
[ -z "${FAKE_NO_METADATA:-}" ] || exit 6
case "${*: -1}" in
  */computeMetadata/v1/instance/attributes/agent-worker-number) printf '%s' "${HOME##*worker}" ;;
  */computeMetadata/v1/instance/attributes/worker-network-endpoints)
    printf 't1v-w-0:a:10.0.0.2,t1v-w-1:b:10.0.0.3' ;;
  *) exit 22 ;;
esac
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 1
printf 'node17\nnode18\n'
"""

# srun: runs the task command once per task, with the SLURM_* variables a real task sees.
FAKE_SRUN = r"""#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "$*" >> "$FAKE_RECORDS/srun.txt"
ntasks=1
while [ $# -gt 0 ]; do
  case "$1" in
    --ntasks=*) ntasks="${1#--ntasks=}"; shift ;;
    --*) shift ;;
    *) break ;;
  esac
done
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NTASKS=$ntasks "$@" & pids+=("$!")
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit "$rc"
"""

# sbatch: records its options and runs the --wrap script at once, inside a fake 2-node job.
FAKE_SBATCH = r"""#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "$@" > "$FAKE_RECORDS/sbatch-args.txt"
wrap="" chdir=.
for arg in "$@"; do
  case "$arg" in
    --wrap=*) wrap="${arg#--wrap=}" ;;
    --chdir=*) chdir="${arg#--chdir=}" ;;
  esac
done
echo "Submitted batch job 4321"
cd "$chdir"
SLURM_JOB_ID=4321 SLURM_JOB_NUM_NODES=2 SLURM_JOB_NODELIST='node[17-18]' sh -c "$wrap"
"""


@pytest.fixture()
def env(tmp_path):
    """Environment whose PATH starts with the stand-ins; FAKE_RECORDS collects what they saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [
        ("python-r1jax", FAKE_PYTHON),
        ("ssh", FAKE_SSH),
        ("gcloud", FAKE_GCLOUD),
        ("uv", FAKE_UV),
        ("curl", FAKE_CURL),
        ("scontrol", FAKE_SCONTROL),
        ("srun", FAKE_SRUN),
        ("sbatch", FAKE_SBATCH),
    ]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    tpu_root = tmp_path / "tpu"
    for i in range(2):
        (tpu_root / f"worker{i}").mkdir(parents=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "R1JAX_"))}
    environ.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        TMPDIR=str(tmp_path),
        FAKE_RECORDS=str(records),
        FAKE_PYTHON=str(bin_dir / "python-r1jax"),
        FAKE_TPU_ROOT=str(tpu_root),
        FAKE_TPU_WORKERS="2",
    )
    return environ


def launch(script, *args, env=None, cwd=None, timeout=60):
    """Run launch/<script> with args; returns the CompletedProcess (text, both streams)."""
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def python_records(env, count, timeout=10.0):
    """Wait for `count` stand-in Python records and return them sorted by rank."""
    records = Path(env["FAKE_RECORDS"])
    deadline = time.monotonic() + timeout
    while len(found := sorted(records.glob("*.json"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == count, f"expected {count} r1jax processes, saw {len(found)}"
    return sorted((json.loads(p.read_text()) for p in found), key=lambda r: r["rank"])


def alive(pid):
    """True while `pid` runs (a zombie left for an absent init to reap counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_dead(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def dry_run_lines(result):
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def option(words, name):
    """The value of `name=VALUE` among parsed words."""
    values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
    assert len(values) == 1, f"{name} appears {len(values)} times in {words}"
    return values[0]


# ---------------------------------------------------------------------------------------------
# Static checks and usage errors


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(
        ["shellcheck", "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", EXECUTABLES)
def test_executable_with_strict_mode_and_help(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in path.read_text()
    result = launch(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage:"), result.stderr
    assert launch(script).returncode == 2  # no arguments: usage on stderr


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("tpu_pod.sh", ["run", "--", "--stage=rl"], "--name is required"),
        ("tpu_pod.sh", ["run", "--name", "r1"], "needs the r1jax arguments"),
        ("tpu_pod.sh", ["run", "--name", "r1", "--", "--workdir=gs://b"], "no --stage"),
        ("tpu_pod.sh", ["run", "--name", "r1", "--", "--stage=grpo"], "unknown stage 'grpo'"),
        ("tpu_pod.sh", ["create", "--name", "r1", "--detach"], "--detach does not apply"),
        ("tpu_pod.sh", ["create", "--name", "r1", "--accelerator-type", "x9-8"], "--version"),
        ("tpu_pod.sh", ["launch", "--name", "r1"], "unknown command 'launch'"),
        ("tpu_pod.sh", ["run", "--name", "r1", "--env", "1X=2", "--", "--stage=rl"], "1X"),
        ("tpu_pod.sh", ["setup", "--name", "r1", "--remote-dir", "."], "--remote-dir"),
        ("tpu_pod.sh", ["logs", "--name", "r1", "--worker"], "--worker needs a value"),
        ("slurm_gpu.sh", ["submit", "--", "--stage=rl"], "--nodes is required"),
        ("slurm_gpu.sh", ["submit", "--nodes", "two", "--", "--stage=rl"], "'two'"),
        ("slurm_gpu.sh", ["run", "--", "--stage=rl"], "inside a Slurm allocation"),
        ("slurm_gpu.sh", ["run", "--nodes", "2", "--", "--stage=rl"], "is for 'submit'"),
        ("slurm_gpu.sh", ["submit", "--nodes", "2"], "no r1jax arguments"),
        ("ssh_gpu.sh", ["--", "--stage=rl"], "no hosts"),
        ("ssh_gpu.sh", ["--hosts", "a,b", "--", "--config.x=1"], "no --stage"),
        ("ssh_gpu.sh", ["--hosts", "a", "--", "--flagfile=/nonexistent"], "not readable here"),
        ("ssh_gpu.sh", ["--hosts", ",", "--", "--stage=rl"], "host list is empty"),
        ("ssh_gpu.sh", ["--hostfile", "/nonexistent", "--", "--stage=rl"], "does not exist"),
        ("ssh_gpu.sh", ["--hosts", "a", "--port", "http", "--", "--stage=rl"], "--port"),
    ],
)
def test_bad_usage_names_the_problem(script, args, message, env):
    # --dry-run goes before any '--' (after it, it would be an r1jax argument).
    at = 0 if script == "ssh_gpu.sh" else 1
    result = launch(script, *args[:at], "--dry-run", *args[at:], env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert not result.stdout  # nothing was printed as a command, nothing ran
    assert not list(Path(env["FAKE_RECORDS"]).iterdir())


# ---------------------------------------------------------------------------------------------
# Dry runs print the real commands


def test_tpu_dry_run_prints_gcloud_commands(env):
    create = dry_run_lines(
        launch(
            "tpu_pod.sh",
            "create",
            "--name",
            "r1",
            "--zone=us-west4-a",
            "--accelerator-type",
            "v5litepod-64",
            "--spot",
            "--dry-run",
            env=env,
        )
    )
    assert create == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "r1",
            "--zone=us-west4-a",
            "--accelerator-type=v5litepod-64",
            "--version=v2-alpha-tpuv5-lite",
            "--spot",
        ]
    ]

    result = launch(
        "tpu_pod.sh",
        "run",
        "--name",
        "r1",
        "--zone",
        "us-west4-a",
        "--env",
        "EXTRA_A=x y",
        "--dry-run",
        "--",
        "--stage=rl",
        TRICKY,
        "--workdir=gs://bucket/run",
        env=env,
    )
    [words] = dry_run_lines(result)
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "r1"]
    assert "--worker=all" in words and "--zone=us-west4-a" in words
    command = option(words, "--command")
    assert "http://${GCE_METADATA_IP:-metadata.google.internal}" in command
    remote = shlex.split(command.splitlines()[-1])  # after the metadata look-up
    start = max(i for i, word in enumerate(remote) if word == "{") + 1
    launched = remote[start : remote.index("&", start)]  # (then waited for)
    assert launched[:3] == ["env", "PYTHONUNBUFFERED=1", "EXTRA_A=x y"]
    assert launched[3].endswith("/r1jax-venv/bin/python")
    assert launched[4:] == ["-m", "r1jax.launch", "--stage=rl", TRICKY, "--workdir=gs://bucket/run"]
    assert "warning" not in result.stderr  # gs:// is the workdir a slice needs

    result = launch(
        "tpu_pod.sh", "run", "--name", "r1", "--dry-run", "--", "--stage", "sft", env=env
    )
    assert "no --workdir" in result.stderr and "gs://" in result.stderr


def test_slurm_dry_runs_print_sbatch_and_srun(env):
    [sbatch] = dry_run_lines(
        launch(
            "slurm_gpu.sh",
            "submit",
            "--nodes",
            "2",
            "--partition",
            "gpu",
            "--env",
            "EXTRA_B=1",
            "--dry-run",
            "--",
            "--stage=distill",
            TRICKY,
            "--workdir=/shared/run",
            env=env,
        )
    )
    assert sbatch[0] == "sbatch"
    assert {
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--exclusive",
        "--partition=gpu",
        "--job-name=r1jax-distill",
        "--signal=TERM@300",  # time to save the step before the time limit (KillWait: 30 s)
    } <= set(sbatch)
    job = shlex.split(option(sbatch, "--wrap"))
    assert job[:3] == ["bash", str(LAUNCH / "slurm_gpu.sh"), "run"]
    assert job[job.index("--") + 1 :] == ["--stage=distill", TRICKY, "--workdir=/shared/run"]
    assert job[job.index("--env") + 1] == "EXTRA_B=1"

    env.update(SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[17-18]")
    [srun] = dry_run_lines(
        launch(
            "slurm_gpu.sh",
            "run",
            "--gpus-per-node",
            "4",
            "--dry-run",
            "--",
            "--stage=rl",
            "--workdir=/shared/run",
            env=env,
        )
    )
    assert srun[0] == "env"
    # jax's own Slurm detection would pick this port too: 61440 + 1234 % 4096.
    assert option(srun, "R1JAX_COORDINATOR_ADDRESS") == "node17:62674"
    assert option(srun, "R1JAX_NUM_PROCESSES") == "2"
    assert option(srun, "JAX_LOCAL_DEVICE_IDS") == "0,1,2,3"
    rest = srun[srun.index("srun") :]
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"} <= set(rest)
    assert 'R1JAX_PROCESS_ID="$SLURM_PROCID"' in rest[rest.index("-c") + 1]
    assert rest[-4:] == ["-m", "r1jax.launch", "--stage=rl", "--workdir=/shared/run"]


def test_ssh_dry_run_prints_one_ssh_per_host(env, tmp_path):
    hostfile = tmp_path / "hosts"
    # (MPI and DeepSpeed hostfiles add "slots=N": the host is the first word)
    hostfile.write_text("# two nodes\nalice@gpu-a\n\n  gpu-b slots=8  # second\n")
    lines = dry_run_lines(
        launch(
            "ssh_gpu.sh",
            "--hostfile",
            str(hostfile),
            "--port",
            "9000",
            "--chdir",
            "/srv/r 1",
            "--dry-run",
            "--",
            "--stage=eval",
            TRICKY,
            "--workdir=/shared/run",
            env=env,
        )
    )
    assert [words[-2] for words in lines] == ["alice@gpu-a", "gpu-b"]
    for rank, words in enumerate(lines):
        assert words[0] == "ssh" and "BatchMode=yes" in words
        remote = shlex.split(words[-1])
        assert remote[:2] == ["cd", "/srv/r 1"]
        launched = remote[remote.index("exec") + 1 :]
        assert option(launched, "R1JAX_COORDINATOR_ADDRESS") == "gpu-a:9000"
        assert option(launched, "R1JAX_NUM_PROCESSES") == "2"
        assert option(launched, "R1JAX_PROCESS_ID") == str(rank)
        assert launched[-5:] == [
            "-m",
            "r1jax.launch",
            "--stage=eval",
            TRICKY,
            "--workdir=/shared/run",
        ]
    # The stage may come from a flagfile, as r1jax.launch reads it (the launcher said "no
    # --stage"); a bad stage there is caught here too.
    flags = tmp_path / "run.flags"
    for stage, status in (("eval", 0), ("grpo", 2)):
        flags.write_text(f"# the run\n  --stage={stage}\n\n--workdir=/shared/run\n")
        out = launch(
            "ssh_gpu.sh", "--hosts", "a", "--dry-run", "--", f"--flagfile={flags}", env=env
        )
        assert out.returncode == status, out.stderr
    assert "unknown stage 'grpo'" in out.stderr
    # A flagfile that names itself ends (it recursed forever), "--flagfile F" is read as absl
    # reads it, and one only the hosts have passes when --stage is on the command line.
    flags.write_text(f"--stage=eval\n--flagfile={flags}\n")
    out = launch("ssh_gpu.sh", "--hosts", "a", "--dry-run", "--", "--flagfile", str(flags), env=env)
    assert out.returncode == 0, out.stderr
    args = ["--stage=rl", "--flagfile=/on/the/hosts.flags"]
    out = launch("ssh_gpu.sh", "--hosts", "a", "--dry-run", "--", *args, env=env)
    assert out.returncode == 0 and "--flagfile=/on/the/hosts.flags" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------------
# Real runs against the stand-ins


def test_ssh_launch_starts_every_rank(env, tmp_path):
    workdir = tmp_path / "code"
    workdir.mkdir()
    result = launch(
        "ssh_gpu.sh",
        "--hosts",
        "gpu-a,bob@gpu-b",
        "--chdir",
        str(workdir),
        "--python",
        env["FAKE_PYTHON"],
        "--env",
        "EXTRA_C=c d",
        "--log-dir",
        str(tmp_path / "logs"),
        "--",
        "--stage=rl",
        TRICKY,
        "--workdir=/shared/run",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    records = python_records(env, 2)
    assert [r["rank"] for r in records] == ["0", "1"]
    for r in records:
        assert r["argv"] == ["--stage=rl", TRICKY, "--workdir=/shared/run"]
        assert r["cwd"] == str(workdir)
        assert r["env"]["R1JAX_COORDINATOR_ADDRESS"] == "gpu-a:8476"
        assert r["env"]["R1JAX_NUM_PROCESSES"] == "2"
        assert r["env"]["EXTRA_C"] == "c d"
    assert "[1 bob@gpu-b] stand-in r1jax started, rank 1" in result.stdout
    assert "stand-in r1jax started, rank 1" in (tmp_path / "logs/rank1-bob@gpu-b.log").read_text()


def test_ssh_launch_stops_every_rank_when_one_fails(env, tmp_path):
    env.update(FAKE_FAIL_RANK="1", FAKE_SLEEP="60")
    start = time.monotonic()
    result = launch(
        "ssh_gpu.sh",
        "--hosts",
        "gpu-a,gpu-b",
        "--python",
        env["FAKE_PYTHON"],
        "--log-dir",
        str(tmp_path / "logs"),
        "--",
        "--stage=rl",
        env=env,
        timeout=40,
    )
    records = python_records(env, 2)
    survivor = records[0]["pid"]
    try:
        assert result.returncode == 3, result.stderr
        assert "Rank 1 on gpu-b exited with status 3" in result.stderr
        assert time.monotonic() - start < 30
        assert wait_dead(survivor), "rank 0 kept running after rank 1 failed"
        # The cleanup reached gpu-a and gpu-b: launch twice, then one stop for the survivor.
        hosts = (Path(env["FAKE_RECORDS"]) / "ssh-hosts.txt").read_text().split()
        assert sorted(hosts) == ["gpu-a", "gpu-a", "gpu-b"]
    finally:
        if alive(survivor):
            os.kill(survivor, signal.SIGKILL)


def interrupt(script, *args, env, sig=signal.SIGINT):
    """Start launch/<script>, wait for its 2 stand-in r1jax processes, then press Ctrl-C (`sig`,
    SIGINT, to the launcher's process group, which the "remote" processes are not in; SIGHUP: the
    terminal closed). Returns the launcher's exit status and the pids of the r1jax processes."""
    # A non-interactive bash cannot trap a signal ignored when it started, and pytest-xdist's
    # workers ignore SIGINT (a terminal's Ctrl-C would not): reset it to the default first.
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    reset += "os.execvp(sys.argv[1], sys.argv[1:])"
    launcher = subprocess.Popen(
        [sys.executable, "-c", reset, "bash", str(LAUNCH / script), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        pids = [r["pid"] for r in python_records(env, 2)]
        os.killpg(launcher.pid, sig)
        return launcher.wait(timeout=30), pids
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def test_ssh_ctrl_c_stops_every_rank(env, tmp_path):
    # Ranks that ignore SIGTERM (hung, never reaching the step end where it acts) kept running
    # after Ctrl-C: SIGKILL follows after --stop-grace.
    env.update(FAKE_SLEEP="60", FAKE_IGNORE_TERM="1")
    args = ["--hosts", "gpu-a,gpu-b", "--python", env["FAKE_PYTHON"], "--log-dir", str(tmp_path)]
    args += ["--stop-grace", "2"]
    status, pids = interrupt("ssh_gpu.sh", *args, "--", "--stage=rl", env=env)
    try:
        assert status == 130
        assert all(wait_dead(p) for p in pids), "a rank kept running after Ctrl-C"
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


# Runs argv[2:] in a session whose controlling terminal is a pty (setsid -c, without forking),
# closes the terminal once the file argv[1] exists, and exits with the command's status. SIGHUP
# as in a terminal's session: under nohup (a test run started so) it is ignored, which the
# launcher inherits and cannot trap, so the run outlives its terminal as nohup asks.
TERMINAL = """
import os, pty, signal, subprocess, sys, time
signal.signal(signal.SIGHUP, signal.SIG_DFL)
terminal, its_end = pty.openpty()
command = subprocess.Popen(
    ["setsid", "-c", *sys.argv[2:]], stdin=its_end, stdout=its_end, stderr=its_end
)
os.close(its_end)
while not os.path.exists(sys.argv[1]) and command.poll() is None:
    time.sleep(0.05)
os.close(terminal)
sys.exit(command.wait())
"""


def test_ssh_a_closed_terminal_stops_every_rank(env, tmp_path):
    """The launcher's terminal closes (SIGHUP; writes to it fail from then on): every rank ran
    on unseen, with nothing left to stop it, first for want of a SIGHUP trap, then because the
    trap's message to the closed terminal failed and set -e ended the launcher before the stop."""
    env.update(FAKE_SLEEP="60", FAKE_IGNORE_TERM="1")
    args = ["--hosts", "gpu-a,gpu-b", "--python", env["FAKE_PYTHON"], "--log-dir", str(tmp_path)]
    args = ["bash", str(LAUNCH / "ssh_gpu.sh"), *args, "--stop-grace", "2", "--", "--stage=rl"]
    # The terminal is opened and closed by a process of its own, with SIGHUP's default action
    # (see TERMINAL; and a process forked from this test process would hold the pty open too).
    go = tmp_path / "close-the-terminal"
    launcher = subprocess.Popen([sys.executable, "-c", TERMINAL, str(go), *args], env=env)
    pids = []
    try:
        pids = [r["pid"] for r in python_records(env, 2)]
        go.touch()
        launcher.wait(timeout=30)
        assert all(wait_dead(p) for p in pids), "a rank kept running after the terminal closed"
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_ssh_ctrl_c_keeps_what_the_ranks_print_while_they_stop(env, tmp_path):
    """Ctrl-C reached the output pipeline (tee, the prefixer) too, which died before the ranks
    were told to stop: their last lines were lost, and r1jax's writes hit a broken pipe."""
    env.update(FAKE_SLEEP="60", FAKE_SAY_TERM="1")
    args = ["--hosts", "gpu-a,gpu-b", "--python", env["FAKE_PYTHON"], "--log-dir", str(tmp_path)]
    status, pids = interrupt("ssh_gpu.sh", *args, "--", "--stage=rl", env=env)
    try:
        assert status == 130
        assert all(wait_dead(p) for p in pids)
        for rank, host in enumerate(("gpu-a", "gpu-b")):
            path, line = tmp_path / f"rank{rank}-{host}.log", f"got SIGTERM, rank {rank}"
            deadline = time.monotonic() + 10  # (the pipeline writes it after the rank exits)
            while line not in path.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert line in path.read_text(), path.read_text()
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_slurm_submit_runs_one_process_per_node(env):
    result = launch(
        "slurm_gpu.sh",
        "submit",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--python",
        env["FAKE_PYTHON"],
        "--env",
        "EXTRA_D=1",
        "--",
        "--stage=sft",
        TRICKY,
        "--workdir=/shared/run",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Submitted batch job 4321" in result.stdout
    records = python_records(env, 2)
    assert [r["rank"] for r in records] == ["0", "1"]
    for r in records:
        assert r["argv"] == ["--stage=sft", TRICKY, "--workdir=/shared/run"]
        assert r["cwd"] == str(REPO)
        assert r["env"]["R1JAX_COORDINATOR_ADDRESS"] == f"node17:{61440 + 4321 % 4096}"
        assert r["env"]["R1JAX_NUM_PROCESSES"] == "2"
        assert r["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
        assert r["env"]["EXTRA_D"] == "1"


def test_tpu_setup_run_detach_and_stop(env):
    workers = [Path(env["FAKE_TPU_ROOT"]) / f"worker{i}" for i in range(2)]
    setup = launch("tpu_pod.sh", "setup", "--name", "r1", env=env)
    assert setup.returncode == 0, setup.stderr
    for w in workers:
        # The checkout arrived (this very test file included) and a venv was made for it.
        copied = w / "r1jax/tests/test_launch_scripts.py"
        assert copied.read_bytes() == Path(__file__).read_bytes()
        assert (w / "r1jax-venv/bin/python").exists()
        assert not (w / "r1jax-src.tgz").exists()
    uv_calls = (Path(env["FAKE_RECORDS"]) / "uv.txt").read_text()
    assert uv_calls.count("pip install") == 2 and "r1jax[tpu]" in uv_calls
    # A run without --workdir keeps its work in the code folder (runs/<stage>): setting up again
    # after a code change replaced the folder, runs and all.
    for w in workers:
        (w / "r1jax/runs/sft/checkpoints/500").mkdir(parents=True)
        (w / "r1jax/runs/sft/checkpoints/500/state").write_text("saved")
        (w / "r1jax/.notes").write_text("mine")
        (w / "r1jax/r1jax/gone.py").write_text("")  # (code the new copy lacks does go)
    again = launch("tpu_pod.sh", "setup", "--name", "r1", env=env)
    assert again.returncode == 0, again.stderr
    for w in workers:
        assert (w / "r1jax/runs/sft/checkpoints/500/state").read_text() == "saved"
        assert (w / "r1jax/.notes").read_text() == "mine"
        assert not (w / "r1jax/r1jax/gone.py").exists() and not (w / "r1jax.new").exists()
        assert (w / "r1jax/tests/test_launch_scripts.py").read_bytes() == copied.read_bytes()
    # From a repository (--repo) the first time: the copy becomes a checkout in place, runs/ kept.
    repo = Path(env["TMPDIR"]) / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README.md").write_text("from the repository\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    fetched = launch(
        "tpu_pod.sh", "setup", "--name", "r1", "--repo", f"file://{repo}", "--ref", "main", env=env
    )
    assert fetched.returncode == 0, fetched.stderr
    for w in workers:
        assert (w / "r1jax/README.md").read_text() == "from the repository\n"
        assert (w / "r1jax/runs/sft/checkpoints/500/state").read_text() == "saved"

    run = launch(
        "tpu_pod.sh",
        "run",
        "--name",
        "r1",
        "--env",
        "EXTRA_E=e",
        "--",
        "--stage=rl",
        TRICKY,
        "--workdir=gs://b/run",
        env=env,
    )
    assert run.returncode == 0, run.stderr
    records = python_records(env, 2)
    for r, w in zip(records, workers, strict=True):
        assert r["argv"] == ["--stage=rl", TRICKY, "--workdir=gs://b/run"]
        assert r["cwd"] == str(w / "r1jax")
        assert r["env"]["EXTRA_E"] == "e" and r["env"]["PYTHONUNBUFFERED"] == "1"
    # Coordinator variables come from the metadata server; worker 0 hosts the coordinator.
    assert [r["env"]["R1JAX_PROCESS_ID"] for r in records] == ["0", "1"]
    for r, w in zip(records, workers, strict=True):
        assert r["env"]["R1JAX_COORDINATOR_ADDRESS"] == "10.0.0.2:8482"
        assert r["env"]["R1JAX_NUM_PROCESSES"] == "2"
        assert (w / "r1jax-logs/run.pid").read_text().strip() == str(r["pid"])  # for `stop`
    # A worker's r1jax killed by a signal: its exit status stays below 128. Exec'd, the signal
    # ended the ssh session, which ssh reports as 255, and gcloud ran the whole command again (up
    # to 10 times) taking 255 for a failed connection.
    killed = launch("tpu_pod.sh", "run", "--name", "r1", "--", "--stage=rl", env=env | {
        "FAKE_KILLED_RANK": "1"})  # fmt: skip
    assert killed.returncode == 137 - 64, killed.stderr
    assert "r1jax was killed by signal 9" in killed.stderr
    # r1jax's own exit after a clean stop (130, its step saved) is no kill by signal 2.
    stopped = launch("tpu_pod.sh", "run", "--name", "r1", "--", "--stage=rl", env=env | {
        "FAKE_STOPPED_RANK": "1"})  # fmt: skip
    assert "r1jax stopped (resumable)" in stopped.stderr and "signal" not in stopped.stderr

    for p in Path(env["FAKE_RECORDS"]).glob("*.json"):
        p.unlink()
    # Without a metadata server nothing is exported, leaving r1jax to its own detection.
    env.update(FAKE_SLEEP="60", FAKE_NO_METADATA="1", FAKE_IGNORE_TERM="1")
    detach = launch(
        "tpu_pod.sh",
        "run",
        "--name",
        "r1",
        "--detach",
        "--",
        "--stage=eval",
        "--workdir=gs://b/run",
        env=env,
        timeout=20,
    )
    assert detach.returncode == 0, detach.stderr
    records = python_records(env, 2)
    pids = [r["pid"] for r in records]
    try:
        assert all(alive(p) for p in pids)
        assert not any(k.startswith("R1JAX_") for r in records for k in r["env"])
        logs = launch("tpu_pod.sh", "logs", "--name", "r1", "--worker", "1", env=env)
        assert "stand-in r1jax started, rank worker1" in logs.stdout
        busy = launch("tpu_pod.sh", "setup", "--name", "r1", env=env)
        assert busy.returncode != 0 and "r1jax is running; stop it first" in busy.stderr
        # A second run would fail on the busy TPU after replacing run.pid, leaving the first
        # out of `stop`'s reach.
        again = launch("tpu_pod.sh", "run", "--name", "r1", "--", "--stage=rl", env=env)
        assert again.returncode != 0 and "r1jax is running; stop it first" in again.stderr
        # SIGTERM is not enough for a hung run: SIGKILL after --grace (was a fixed 60 s, less
        # than a long RL step needs to reach its save), and said (it said "stopped", status 0).
        stop = launch("tpu_pod.sh", "stop", "--name", "r1", "--grace", "1", env=env)
        assert stop.returncode != 0 and "stopped r1jax" not in stop.stdout, stop.stdout
        assert all(wait_dead(p) for p in pids)
        assert stop.stderr.count("did not stop within 1 s and was killed") == 2, stop.stderr
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)

    # Ctrl-C on a foreground run stops the processes on the hosts too.
    del env["FAKE_IGNORE_TERM"]
    for p in Path(env["FAKE_RECORDS"]).glob("*.json"):
        p.unlink()
    status, pids = interrupt("tpu_pod.sh", "run", "--name", "r1", "--", "--stage=rl", env=env)
    try:
        assert status == 130
        assert all(wait_dead(p) for p in pids), "r1jax kept running after Ctrl-C"
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_slurm_counts_as_a_cluster_only_inside_an_srun_step(monkeypatch):
    """An `sbatch` script or `salloc` shell with several tasks has no step node list, which JAX's
    Slurm detection needs: a single process started there must not try to join a cluster."""
    from r1jax import sharding

    for name in list(os.environ):
        if name.startswith(("SLURM_", "TPU_", "MEGASCALE_", "OMPI_")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(sharding.os.path, "exists", lambda path: False)  # not a TPU VM
    monkeypatch.setenv("SLURM_JOB_ID", "4321")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert not sharding._on_known_cluster()
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[17-18]")
    assert sharding._on_known_cluster()
    # Under `mpirun` with several ranks (Open MPI's runtime variables), JAX's detection applies.
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1234.0;tcp://10.0.0.1:5000")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert not sharding._on_known_cluster()  # one rank: a single process
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert sharding._on_known_cluster()


def test_a_cpu_run_on_a_tpu_vm_is_no_part_of_the_slice(monkeypatch):
    """JAX_PLATFORMS=cpu on a TPU VM joined the slice all the same: it waited for every worker
    (or joined a running job's coordinator)."""
    from r1jax import sharding

    for name in list(os.environ):
        if name.startswith(("SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "JAX_PLATFORMS")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(sharding.os.path, "exists", lambda path: path == "/dev/accel0")
    assert sharding._on_known_cluster()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not sharding._on_known_cluster()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert sharding._on_known_cluster()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("SLURM_JOB_ID", "4321")  # (a multi-process CPU job under srun still is)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[17-18]")
    assert sharding._on_known_cluster()
