#!/usr/bin/env bash
# Multi-node GPU launcher for r1jax over plain SSH, for machines without a scheduler.
#
# Starts one `python -m r1jax.launch` process per host, each driving all of its host's GPUs, and
# gives every process R1JAX_COORDINATOR_ADDRESS (the first host, rank 0), R1JAX_NUM_PROCESSES and
# its own R1JAX_PROCESS_ID, from which r1jax calls jax.distributed.initialize(). Output is shown
# prefixed with the rank and host, and also written to one log file per host.
#
# Notable choices:
# - If any process fails, or the launcher is interrupted, the others are stopped too: a
#   multi-host JAX job cannot continue with a process missing, and would otherwise hang in a
#   collective until jax's heartbeat timeout. Each remote process writes its pid to a file named
#   after this run, and only that pid is signalled.
# - ssh runs with BatchMode (never prompt; a dozen parallel password prompts cannot be answered)
#   and -n (the background sessions must not read the terminal).
# - The code is expected at the same path on every host (a shared file system or identical
#   checkouts); --chdir points elsewhere.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/ssh_gpu.sh (--hosts H1,H2,... | --hostfile FILE) [options] -- R1JAX_ARGS...

Run `python -m r1jax.launch R1JAX_ARGS` on every host over ssh, one process per host; the first
host is rank 0 and hosts the jax.distributed coordinator. R1JAX_ARGS must include --stage
(pretrain sft rl rejection_sampling distill eval pipeline).

Options:
  --hosts LIST          comma-separated ssh destinations ([user@]host)
  --hostfile FILE       one ssh destination per line; blank lines and # comments are skipped
  --coordinator HOST    address of the first host as the others reach it
                        (default: the first destination without its user@)
  --port PORT           coordinator port on the first host (default 8476)
  --chdir DIR           repository directory on every host (default: this checkout's path)
  --python PATH         Python with r1jax installed on every host (default python3)
  --env KEY=VALUE       extra environment variable for r1jax on every host (repeatable)
  --ssh-opt ARG         extra ssh argument (repeatable), e.g. --ssh-opt=-p2222
  --log-dir DIR         where per-host logs go (default r1jax-ssh-logs/RUN_ID)
  --stop-grace SECONDS  on Ctrl-C or a failed rank: SIGTERM (a run stops after saving the step
                        it is on), then SIGKILL after this long (default 120)
  --dry-run             print the ssh commands instead of running them
  -h, --help            show this help

Example (2 nodes with 8 GPUs each, the code and a shared disk at the same path on both):
  launch/ssh_gpu.sh --hosts gpu-a,gpu-b --python /opt/venv/bin/python -- \
      --stage=rl --config=configs/rl.py --workdir=/shared/r1jax/rl-run1
EOF
}

# ---------------------------------------------------------------------------------------------
# Arguments

if [ $# -eq 0 ]; then
  usage >&2
  exit 2
fi

HOSTS_ARG="" HOSTFILE="" COORDINATOR="" PORT=8476 CHDIR="$REPO_ROOT" PYTHON="python3"
LOG_DIR="" DRY_RUN=0 STOP_GRACE=120
ENV_PAIRS=() SSH_OPTS=() PASS_ARGS=()

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
  case "$opt" in
    --hosts) HOSTS_ARG="$val" ;;
    --hostfile) HOSTFILE="$val" ;;
    --coordinator) COORDINATOR="$val" ;;
    --port) PORT="$val" ;;
    --chdir) CHDIR="$val" ;;
    --python) PYTHON="$val" ;;
    --env) check_env_pair "$val" && ENV_PAIRS+=("$val") ;;
    --ssh-opt) SSH_OPTS+=("$val") ;;
    --log-dir) LOG_DIR="$val" ;;
    --stop-grace) STOP_GRACE="$val" ;;
    *) die "unknown option $opt" ;;
  esac
  shift "$nshift"
done

HOSTS=()
if [ -n "$HOSTS_ARG" ] && [ -n "$HOSTFILE" ]; then
  die "give either --hosts or --hostfile, not both"
elif [ -n "$HOSTS_ARG" ]; then
  IFS=',' read -r -a parts <<<"$HOSTS_ARG"
  for h in "${parts[@]}"; do
    h="${h//[[:space:]]/}"
    [ -z "$h" ] || HOSTS+=("$h")
  done
elif [ -n "$HOSTFILE" ]; then
  [ -f "$HOSTFILE" ] || die "--hostfile $HOSTFILE does not exist"
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line%%#*}"
    read -r line _ <<<"$line" # the host: the first word (MPI and DeepSpeed add "slots=8")
    [ -z "$line" ] || HOSTS+=("$line")
  done <"$HOSTFILE"
else
  die "no hosts; pass --hosts H1,H2,... or --hostfile FILE"
fi
[ ${#HOSTS[@]} -gt 0 ] || die "the host list is empty"
case "$PORT" in
  '' | *[!0-9]* | 0) die "--port expects a port number, got '$PORT'" ;;
esac
case "$STOP_GRACE" in
  '' | *[!0-9]*) die "--stop-grace expects a number of seconds, got '$STOP_GRACE'" ;;
esac
[ ${#PASS_ARGS[@]} -gt 0 ] || die "no r1jax arguments; put them after '--', e.g. -- --stage=rl"
check_r1jax_args "${PASS_ARGS[@]}"
[ ${#HOSTS[@]} = 1 ] || warn_unless_shared_workdir "use a directory all hosts share"

NUM=${#HOSTS[@]}
FIRST="${HOSTS[0]}"
COORDINATOR="${COORDINATOR:-${FIRST#*@}}"
RUN_ID="r1jax-$(date +%Y%m%d-%H%M%S)-$$"
SSH=(ssh -n -o BatchMode=yes -o ServerAliveInterval=30 ${SSH_OPTS[@]+"${SSH_OPTS[@]}"})

# The pid file of a rank's process, as a path for the remote shell to expand.
pidfile() {
  # shellcheck disable=SC2016  # TMPDIR is the remote host's
  printf '"${TMPDIR:-/tmp}"/%s-rank%s.pid' "$RUN_ID" "$1"
}

# The command one host runs. `exec` makes the pid written by the remote shell the pid of r1jax.
remote_command() {
  local rank="$1" env_words pair
  env_words="R1JAX_COORDINATOR_ADDRESS=$(shquote "$COORDINATOR:$PORT") R1JAX_NUM_PROCESSES=$NUM"
  env_words="$env_words R1JAX_PROCESS_ID=$rank PYTHONUNBUFFERED=1"
  for pair in ${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"}; do
    env_words="$env_words $(shquote "$pair")"
  done
  printf 'cd %s && echo $$ > %s && exec env %s %s -m r1jax.launch %s' \
    "$(shquote "$CHDIR")" "$(pidfile "$rank")" "$env_words" "$(shquote "$PYTHON")" \
    "$(shjoin "${PASS_ARGS[@]}")"
}

if [ "$DRY_RUN" = 1 ]; then
  for ((rank = 0; rank < NUM; rank++)); do
    run "${SSH[@]}" "${HOSTS[$rank]}" "$(remote_command "$rank")"
  done
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Launch, watch, and stop everything if one process fails

# Signal the remote r1jax of every rank still running (SIGTERM, so it may save a checkpoint;
# SIGKILL after --stop-grace seconds: a hung rank never reaches the step end where SIGTERM acts),
# then end our own ssh sessions. A rank whose pid file is not there yet may still be starting,
# so it is given a few seconds to appear.
stop_all() {
  local rank pid cleanup=()
  for ((rank = 0; rank < NUM; rank++)); do
    [ -n "${PIDS[$rank]-}" ] || continue
    # shellcheck disable=SC2016  # $f, $p and $(cat) are for the remote shell
    "${SSH[@]}" -o ConnectTimeout=10 "${HOSTS[$rank]}" \
      "f=$(pidfile "$rank"); i=0
while [ ! -f \"\$f\" ] && [ \$i -lt 5 ]; do sleep 1; i=\$((i + 1)); done
p=\$(cat \"\$f\" 2>/dev/null) || exit 0
r1jax() { grep -qa r1jax.launch /proc/\"\$p\"/cmdline 2>/dev/null; }
r1jax && kill \"\$p\"; i=0
while r1jax && [ \$i -lt $STOP_GRACE ]; do sleep 1; i=\$((i + 1)); done
if r1jax; then kill -9 \"\$p\"; echo \"rank $rank: r1jax did not stop within $STOP_GRACE s and was \
killed: the step it was on is not saved (a rerun resumes from the last checkpoint; a longer \
--stop-grace lets a step finish)\" >&2; fi; rm -f \"\$f\"" &
    cleanup+=("$!")
  done
  for pid in ${cleanup[@]+"${cleanup[@]}"}; do
    wait "$pid" 2>/dev/null || true
  done
  for ((rank = 0; rank < NUM; rank++)); do
    [ -z "${PIDS[$rank]-}" ] || kill "${PIDS[$rank]}" 2>/dev/null || true
  done
}

# Copy stdin to stdout line by line, each line as soon as it arrives, after the prefix $1.
prefix_lines() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    printf '%s%s\n' "$1" "$line"
  done
}

PIDS=()
# A closed terminal (SIGHUP) stops the ranks too: they would run on unseen, their logs cut, with
# nothing left to stop them. Under nohup or tmux a run outlives its terminal.
# (The message may fail to reach a closed terminal: that must not end the launcher, set -e,
# before the ranks are stopped.)
trap '{ echo "Interrupted; stopping every rank." >&2 || true; } 2>/dev/null; stop_all; exit 130' \
  INT TERM HUP

LOG_DIR="${LOG_DIR:-r1jax-ssh-logs/$RUN_ID}"
mkdir -p "$LOG_DIR"
for ((rank = 0; rank < NUM; rank++)); do
  host="${HOSTS[$rank]}"
  prefix="[$rank $host] "
  log="$LOG_DIR/rank$rank-${host//\//_}.log"
  # The output pipeline ignores SIGINT and SIGHUP: it must outlive the stop (a dead tee would cut
  # the rank's log and break the pipe its r1jax writes to while it saves). Lines are prefixed by
  # the shell itself: mawk (Debian's awk) reads a pipe in 4 KiB blocks, fflush or not.
  "${SSH[@]}" "$host" "$(remote_command "$rank")" \
    > >(trap '' INT HUP; tee "$log" | prefix_lines "$prefix") 2>&1 &
  PIDS+=("$!")
done
echo "Started $NUM processes (coordinator $COORDINATOR:$PORT); logs in $LOG_DIR" >&2

remaining=$NUM
while [ "$remaining" -gt 0 ]; do
  for ((rank = 0; rank < NUM; rank++)); do
    pid="${PIDS[$rank]}"
    if [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    PIDS[rank]=""
    remaining=$((remaining - 1))
    if wait "$pid"; then
      continue
    else
      rc=$?
    fi
    why=""
    [ "$rc" != 255 ] ||
      why=" (255: ssh could not connect or the connection dropped, or r1jax was killed by a signal)"
    echo "Rank $rank on ${HOSTS[$rank]} exited with status $rc$why; stopping the other ranks." >&2
    stop_all
    exit "$rc"
  done
  [ "$remaining" = 0 ] || sleep 1
done
echo "All $NUM processes finished." >&2
