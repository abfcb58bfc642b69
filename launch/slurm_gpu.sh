#!/usr/bin/env bash
# Multi-node GPU launcher for r1jax on Slurm: one `python -m r1jax.launch` process per node,
# started by `srun`, each driving all of its node's GPUs.
#
#   submit  builds an `sbatch` job whose script calls this file's `run` on the first node;
#   run     (inside an allocation, from sbatch or salloc) starts the processes with srun.
#
# Notable choices:
# - The coordinator is given explicitly through R1JAX_COORDINATOR_ADDRESS / R1JAX_NUM_PROCESSES /
#   R1JAX_PROCESS_ID (the process id is read from SLURM_PROCID inside each task), so r1jax starts
#   jax.distributed the same way here as under ssh_gpu.sh.
# - JAX_LOCAL_DEVICE_IDS lists every GPU of the node. Without it, jax's Slurm detection
#   (jax._src.clusters.SlurmCluster) restricts each process to the single GPU numbered
#   SLURM_LOCALID, i.e. GPU 0 with one task per node, leaving 7 of 8 GPUs idle.
# - The coordinator port defaults to the one jax's own Slurm detection would pick (from the job
#   id), so two jobs sharing a node do not collide.
# - `submit` uses `sbatch --wrap` to call this file where it lies instead of letting sbatch copy
#   it, so common.sh and the repository stay reachable; the repository must be on a file system
#   that all nodes share, as Slurm clusters usually have.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm_gpu.sh submit --nodes N [options] -- R1JAX_ARGS...
       launch/slurm_gpu.sh run [options] -- R1JAX_ARGS...     (inside sbatch or salloc)

Run `python -m r1jax.launch R1JAX_ARGS` as one process per node on a Slurm GPU cluster.
R1JAX_ARGS must include --stage (pretrain sft rl rejection_sampling distill eval pipeline).

submit options:
  --nodes N                number of nodes (required)
  --partition NAME         Slurm partition
  --time D-HH:MM:SS        time limit
  --account NAME           account to charge
  --job-name NAME          default r1jax-STAGE
  --output PATTERN         job log (default %x-%j.out in the repository: job name, job id)
  --sbatch-arg ARG         extra sbatch argument, e.g. --sbatch-arg=--qos=high (repeatable)
submit and run options:
  --gpus-per-node G        GPUs per node (default 8; under `run`, SLURM_GPUS_ON_NODE if set)
  --cpus-per-task N        CPUs for each process (default: the cluster's default for the job)
  --python PATH            Python with r1jax installed (default python3)
  --port PORT              coordinator port (default 61440 + job id mod 4096)
  --coordinator-host HOST  address of the first node as the others reach it (default its name)
  --env KEY=VALUE          extra environment variable for r1jax on every node (repeatable)
  --dry-run                print the commands instead of running them
  -h, --help               show this help

Examples:
  launch/slurm_gpu.sh submit --nodes 2 --partition gpu --time 1-00:00:00 -- \
      --stage=rl --config=configs/rl.py --workdir=/shared/r1jax/rl-run1
  salloc --nodes 2 --gpus-per-node 8 --exclusive
  launch/slurm_gpu.sh run -- --stage=eval --workdir=/shared/r1jax/rl-run1
EOF
}

# ---------------------------------------------------------------------------------------------
# Arguments

if [ $# -eq 0 ]; then
  usage >&2
  exit 2
fi
case "$1" in
  -h | --help) usage && exit 0 ;;
  submit | run) CMD="$1" && shift ;;
  *) die "unknown command '$1'; choose 'submit' (login node) or 'run' (inside an allocation)" ;;
esac

NODES="" PARTITION="" TIME_LIMIT="" ACCOUNT="" JOB_NAME="" OUTPUT="" DRY_RUN=0
GPUS_PER_NODE="" CPUS_PER_TASK="" PYTHON="python3" PORT="" COORDINATOR_HOST=""
SBATCH_ARGS=() ENV_PAIRS=() PASS_ARGS=()

SUBMIT_ONLY=" --nodes --partition --time --account --job-name --output --sbatch-arg "
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift && PASS_ARGS=("$@") && break ;;
    -h | --help) usage && exit 0 ;;
    --dry-run) DRY_RUN=1 && shift && continue ;;
    --*=*) opt="${1%%=*}" val="${1#*=}" nshift=1 ;;
    --*)
      opt="$1" nshift=2
      [ $# -ge 2 ] || die "option $opt needs a value"
      val="$2"
      ;;
    *) die "unexpected argument '$1'; r1jax arguments go after '--'" ;;
  esac
  if [ "$CMD" = run ]; then
    case "$SUBMIT_ONLY" in
      *" $opt "*) die "option $opt is for 'submit'; inside an allocation the job already has it" ;;
    esac
  fi
  case "$opt" in
    --nodes) NODES="$val" ;;
    --partition) PARTITION="$val" ;;
    --time) TIME_LIMIT="$val" ;;
    --account) ACCOUNT="$val" ;;
    --job-name) JOB_NAME="$val" ;;
    --output) OUTPUT="$val" ;;
    --sbatch-arg) SBATCH_ARGS+=("$val") ;;
    --gpus-per-node) GPUS_PER_NODE="$val" ;;
    --cpus-per-task) CPUS_PER_TASK="$val" ;;
    --python) PYTHON="$val" ;;
    --port) PORT="$val" ;;
    --coordinator-host) COORDINATOR_HOST="$val" ;;
    --env) check_env_pair "$val" && ENV_PAIRS+=("$val") ;;
    *) die "unknown option $opt" ;;
  esac
  shift "$nshift"
done

require_count() {  # name value
  case "$2" in
    '' | *[!0-9]* | 0) die "$1 expects a positive whole number, got '$2'" ;;
  esac
}

[ ${#PASS_ARGS[@]} -gt 0 ] || die "no r1jax arguments; put them after '--', e.g. -- --stage=rl"
check_r1jax_args "${PASS_ARGS[@]}"
[ -z "$GPUS_PER_NODE" ] || require_count --gpus-per-node "$GPUS_PER_NODE"
[ -z "$CPUS_PER_TASK" ] || require_count --cpus-per-task "$CPUS_PER_TASK"
[ -z "$PORT" ] || require_count --port "$PORT"

# Options that `submit` hands on to `run` inside the job.
run_options() {
  local opts=(--gpus-per-node "${GPUS_PER_NODE:-8}" --python "$PYTHON") pair
  [ -z "$CPUS_PER_TASK" ] || opts+=(--cpus-per-task "$CPUS_PER_TASK")
  [ -z "$PORT" ] || opts+=(--port "$PORT")
  [ -z "$COORDINATOR_HOST" ] || opts+=(--coordinator-host "$COORDINATOR_HOST")
  for pair in ${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"}; do
    opts+=(--env "$pair")
  done
  shjoin "${opts[@]}"
}

# ---------------------------------------------------------------------------------------------
# Commands

do_submit() {
  [ -n "$NODES" ] || die "--nodes is required (how many nodes to run on)"
  require_count --nodes "$NODES"
  [ "$NODES" = 1 ] || warn_unless_shared_workdir "use a directory on the shared file system"
  local args=(
    --job-name="${JOB_NAME:-r1jax-$R1JAX_STAGE}"
    --nodes="$NODES"
    --ntasks-per-node=1
    --gpus-per-node="${GPUS_PER_NODE:-8}"
    # Whole nodes: one process per node runs the host-side work (tokenising, rewards) and
    # should get all of the node's CPUs and memory, not Slurm's 1-CPU default.
    --exclusive
    --chdir="$REPO_ROOT"
    --output="${OUTPUT:-$REPO_ROOT/%x-%j.out}"
    # SIGTERM to the processes 5 minutes before the time limit: they stop together after saving
    # the step they are on (without it, Slurm's KillWait, 30 s by default, is all a job gets).
    --signal=TERM@300
  )
  [ -z "$PARTITION" ] || args+=(--partition="$PARTITION")
  [ -z "$TIME_LIMIT" ] || args+=(--time="$TIME_LIMIT")
  [ -z "$ACCOUNT" ] || args+=(--account="$ACCOUNT")
  [ -z "$CPUS_PER_TASK" ] || args+=(--cpus-per-task="$CPUS_PER_TASK")
  local job
  job="bash $(shquote "$SCRIPT_DIR/slurm_gpu.sh") run $(run_options) -- $(shjoin "${PASS_ARGS[@]}")"
  if [ "$DRY_RUN" = 0 ] && ! command -v sbatch >/dev/null 2>&1; then
    die "sbatch not found; run 'submit' on a Slurm login node"
  fi
  run sbatch "${args[@]}" ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"} --wrap="$job"
}

do_run() {
  [ -n "${SLURM_JOB_ID:-}" ] ||
    die "'run' must be called inside a Slurm allocation (sbatch or salloc);" \
      "from a login node use 'submit'"
  local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}"
  require_count "SLURM_JOB_NUM_NODES" "$nodes"
  local gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
  require_count --gpus-per-node "$gpus"
  [ "$nodes" = 1 ] || warn_unless_shared_workdir "use a directory on the shared file system"
  local host="$COORDINATOR_HOST"
  if [ -z "$host" ]; then
    command -v scontrol >/dev/null 2>&1 || die "scontrol not found; pass --coordinator-host"
    local hosts
    hosts="$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}")"
    host="${hosts%%$'\n'*}"
    [ -n "$host" ] ||
      die "could not read the node list of job $SLURM_JOB_ID; pass --coordinator-host"
  fi
  local port="${PORT:-$((61440 + SLURM_JOB_ID % 4096))}"
  local device_ids="0" i
  for ((i = 1; i < gpus; i++)); do
    device_ids="$device_ids,$i"
  done
  local srun_args=(--nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
  [ -z "$CPUS_PER_TASK" ] || srun_args+=(--cpus-per-task="$CPUS_PER_TASK")
  # Each task reads its own rank; the single quotes keep $SLURM_PROCID for the task's shell.
  # shellcheck disable=SC2016
  local task=(bash -c 'export R1JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"' r1jax-task)
  run env \
    R1JAX_COORDINATOR_ADDRESS="$host:$port" \
    R1JAX_NUM_PROCESSES="$nodes" \
    JAX_LOCAL_DEVICE_IDS="$device_ids" \
    PYTHONUNBUFFERED=1 \
    ${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"} \
    srun "${srun_args[@]}" "${task[@]}" "$PYTHON" -m r1jax.launch "${PASS_ARGS[@]}"
}

"do_$CMD"
