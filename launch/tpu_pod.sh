#!/usr/bin/env bash
# Cloud TPU pod-slice launcher for r1jax.
#
# Creates a TPU VM slice, puts this checkout (or a git clone) on every host, installs it in a
# Python 3.11 venv, and runs the same `python -m r1jax.launch ...` on all hosts at once with
# `gcloud compute tpus tpu-vm ssh --worker=all`. See launch/README.md for a walk-through.
#
# Notable choices:
# - Each host reads its worker index and the worker list from the TPU VM metadata server (the
#   keys jax's GceTpuCluster reads) and exports them as R1JAX_COORDINATOR_ADDRESS /
#   R1JAX_NUM_PROCESSES / R1JAX_PROCESS_ID, so r1jax starts jax.distributed explicitly, exactly as
#   under the GPU launchers, instead of depending on auto-detection.
# - The venv is made with uv, which fetches Python 3.11 when the image's own Python is older
#   (the Ubuntu 22.04 TPU images have 3.10).
# - Each run records its process id in ~/r1jax-logs/run.pid on every host; `stop` (and Ctrl-C on
#   a foreground run) kills exactly that process, so a stale run never keeps the TPU busy.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND --name TPU [options] [-- ARGS...]

Run r1jax on every host of a Cloud TPU pod slice.

Commands:
  create   create the TPU VM slice
  setup    copy this checkout (or clone --repo) to every host and install r1jax in a venv
  run      run `python -m r1jax.launch ARGS` on every host; ARGS go after '--' and need --stage
  logs     print the log of the last detached run from one host
  stop     stop the r1jax process that `run` started on every host
  exec     run a shell command (after '--') on every host, e.g. to download a checkpoint
  delete   delete the TPU VM slice

Options for every command:
  --name NAME              TPU VM name (required)
  --zone ZONE              zone (default: gcloud config compute/zone)
  --project PROJECT        project (default: gcloud config core/project)
  --dry-run                print the commands instead of running them
  -h, --help               show this help

create:
  --accelerator-type TYPE  e.g. v5litepod-64 (a v5e-64 slice), v6e-16, v5p-32, v4-32
                           (default v5litepod-8)
  --version RUNTIME        TPU software version (default: picked from the accelerator type)
  --spot | --preemptible   cheaper capacity that may be reclaimed
  --reserved               use the project's reservation
  --create-arg ARG         extra argument for `gcloud compute tpus tpu-vm create` (repeatable)
setup:
  --repo URL [--ref REF]   git clone URL (at REF, default the remote HEAD) instead of copying
                           this checkout
  --remote-dir DIR         code directory on each host (default r1jax, relative to $HOME)
  --venv DIR               venv on each host (default r1jax-venv, relative to $HOME)
  --python-version VER     Python for the venv (default 3.11)
run:
  --detach                 start in the background (survives a dropped connection); see `logs`
  --env KEY=VALUE          extra environment variable for r1jax on every host (repeatable)
  --remote-dir, --venv     as for setup
  --grace SECONDS          after Ctrl-C, as for stop
logs:  --worker N (default 0), --follow
stop:  --grace SECONDS (default 300): SIGTERM, which stops a run after it saves the step it is
       on, then SIGKILL after this long
Logs of detached runs and the pid file used by `stop` are kept in ~/r1jax-logs on every host.

Examples:
  launch/tpu_pod.sh create --name r1 --zone us-west4-a --accelerator-type v5litepod-64 --spot
  launch/tpu_pod.sh setup  --name r1 --zone us-west4-a
  launch/tpu_pod.sh run    --name r1 --zone us-west4-a --detach -- \
      --stage=rl --config=configs/rl.py --config.model.path=~/models/Qwen2.5-1.5B \
      --workdir=gs://my-bucket/r1jax/rl-run1
  launch/tpu_pod.sh logs   --name r1 --zone us-west4-a --follow
  launch/tpu_pod.sh delete --name r1 --zone us-west4-a
EOF
}

# Which options each command takes; anything else is refused rather than silently ignored.
command_options() {
  case "$1" in
    create) echo "--accelerator-type --version --spot --preemptible --reserved --create-arg" ;;
    setup) echo "--repo --ref --remote-dir --venv --python-version" ;;
    run) echo "--detach --env --remote-dir --venv --grace" ;;
    logs) echo "--worker --follow" ;;
    stop) echo "--grace" ;;
    exec | delete) echo "" ;;
  esac
}

# Default TPU software version for an accelerator type (Cloud TPU docs, "TPU software versions").
default_runtime() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v4-* | v3-* | v2-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no default --version for accelerator type '$1'; pass --version RUNTIME" \
      "(list them with: gcloud compute tpus tpu-vm versions list --zone ZONE)" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Arguments

if [ $# -eq 0 ]; then
  usage >&2
  exit 2
fi
case "$1" in
  -h | --help) usage && exit 0 ;;
  create | setup | run | logs | stop | exec | delete) CMD="$1" && shift ;;
  *) die "unknown command '$1'; choose one of: create setup run logs stop exec delete" ;;
esac

NAME="" ZONE="" PROJECT="" DRY_RUN=0
ACCELERATOR_TYPE="v5litepod-8" RUNTIME="" CAPACITY="" RESERVED=0
REPO_URL="" REPO_REF="HEAD" REMOTE_DIR="r1jax" VENV="r1jax-venv" PYTHON_VERSION="3.11"
DETACH=0 WORKER=0 FOLLOW=0 GRACE=300
CREATE_ARGS=() ENV_PAIRS=() PASS_ARGS=()

FLAGS=" --dry-run --spot --preemptible --reserved --detach --follow "
while [ $# -gt 0 ]; do
  # Accept both `--zone us-west4-a` and `--zone=us-west4-a`.
  case "$1" in
    --) shift && PASS_ARGS=("$@") && break ;;
    -h | --help) usage && exit 0 ;;
    --*=*) opt="${1%%=*}" val="${1#*=}" nshift=1 has_val=1 ;;
    --*) opt="$1" val="${2-}" nshift=2 has_val=$(($# >= 2)) ;;
    *) die "unexpected argument '$1'; r1jax arguments go after '--'" ;;
  esac
  case " --name --zone --project --dry-run $(command_options "$CMD") " in
    *" $opt "*) ;;
    *) die "option $opt does not apply to '$CMD' (see --help)" ;;
  esac
  case "$FLAGS" in
    *" $opt "*)
      [ "$nshift" = 2 ] || die "option $opt takes no value"
      nshift=1
      ;;
    *) [ "$has_val" = 1 ] || die "option $opt needs a value" ;;
  esac
  case "$opt" in
    --name) NAME="$val" ;;
    --zone) ZONE="$val" ;;
    --project) PROJECT="$val" ;;
    --dry-run) DRY_RUN=1 ;;
    --accelerator-type) ACCELERATOR_TYPE="$val" ;;
    --version) RUNTIME="$val" ;;
    --spot) CAPACITY="--spot" ;;
    --preemptible) CAPACITY="--preemptible" ;;
    --reserved) RESERVED=1 ;;
    --create-arg) CREATE_ARGS+=("$val") ;;
    --repo) REPO_URL="$val" ;;
    --ref) REPO_REF="$val" ;;
    --remote-dir) REMOTE_DIR="$val" ;;
    --venv) VENV="$val" ;;
    --python-version) PYTHON_VERSION="$val" ;;
    --detach) DETACH=1 ;;
    --env) check_env_pair "$val" && ENV_PAIRS+=("$val") ;;
    --worker) WORKER="$val" ;;
    --follow) FOLLOW=1 ;;
    --grace) GRACE="$val" ;;
  esac
  shift "$nshift"
done

[ -n "$NAME" ] || die "--name is required (the TPU VM name)"
case "$NAME" in
  [a-z]*) ;;
  *) die "--name '$NAME' must start with a lowercase letter (a GCP resource name)" ;;
esac
case "$REMOTE_DIR" in
  '' | / | . | ./ | .. | ../*)
    die "--remote-dir '$REMOTE_DIR' would replace the home directory; name a subdirectory"
    ;;
esac
case "$WORKER" in
  '' | *[!0-9]*) die "--worker expects a worker index such as 0, got '$WORKER'" ;;
esac
case "$GRACE" in
  '' | *[!0-9]*) die "--grace expects a number of seconds, got '$GRACE'" ;;
esac
if [ ${#PASS_ARGS[@]} -gt 0 ] && [ "$CMD" != run ] && [ "$CMD" != exec ]; then
  die "'$CMD' takes no arguments after '--'"
fi
if ! command -v gcloud >/dev/null 2>&1 && [ "$DRY_RUN" = 0 ]; then
  die "gcloud is not installed; see https://cloud.google.com/sdk/docs/install"
fi

# Flags that locate the TPU, shared by every gcloud call.
LOCATION=()
[ -z "$ZONE" ] || LOCATION+=("--zone=$ZONE")
[ -z "$PROJECT" ] || LOCATION+=("--project=$PROJECT")

DIR_R="$(remote_path "$REMOTE_DIR")"
VENV_R="$(remote_path "$VENV")"
# Run state (pid file, logs) lives outside the code directory, which `setup` replaces.
# shellcheck disable=SC2016  # $HOME is the remote one
STATE_R='"$HOME"/r1jax-logs'  # do_stop spells it out too

# Run a shell command on every host (or on --worker N with $2 = N).
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" ${LOCATION[@]+"${LOCATION[@]}"} \
    --worker="${2:-all}" --command="$1"
}

# ---------------------------------------------------------------------------------------------
# Commands

do_create() {
  [ -n "$RUNTIME" ] || RUNTIME="$(default_runtime "$ACCELERATOR_TYPE")"
  local args=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME")
  [ -z "$CAPACITY" ] || args+=("$CAPACITY")
  [ "$RESERVED" = 0 ] || args+=(--reserved)
  run gcloud compute tpus tpu-vm create "$NAME" ${LOCATION[@]+"${LOCATION[@]}"} "${args[@]}" \
    ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}
}

# Pack this checkout: the files git would commit (tracked plus untracked-but-not-ignored, so
# local edits go too, run outputs do not), or everything but caches outside a git checkout.
pack_checkout() {
  local tarball="$1"
  if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    if [ "$DRY_RUN" = 1 ]; then
      printf '%s | %s\n' \
        "git -C $(shquote "$REPO_ROOT") ls-files -z --cached --others --exclude-standard" \
        "tar -C $(shquote "$REPO_ROOT") --null -T - -czf $(shquote "$tarball")"
      return
    fi
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        # ls-files still lists tracked files deleted in the working tree.
        if [ -e "$REPO_ROOT/$f" ]; then printf '%s\0' "$f"; fi
      done |
      tar -C "$REPO_ROOT" --null -T - -czf "$tarball"
  else
    run tar -C "$REPO_ROOT" --exclude=.git --exclude=__pycache__ --exclude='*.pyc' \
      -czf "$tarball" .
  fi
}

# Remote shell code that exits 1 on a host where the run recorded in run.pid is still running:
# `setup` would replace its code, and a second `run` would fail on the busy TPU after replacing
# run.pid, leaving the first run out of reach of `stop`.
busy_check() {
  local busy="p=\$(cat $STATE_R/run.pid 2>/dev/null) && grep -qa r1jax.launch /proc/\"\$p\"/cmdline"
  busy="if $busy 2>/dev/null; then echo \"\$(hostname): r1jax is running; stop it first\" >&2;"
  printf '%s' "$busy exit 1; fi"
}

do_setup() {
  local fetch
  if [ -n "$REPO_URL" ]; then
    # (a copy `setup` made without --repo becomes a git checkout in place: its runs/ stay)
    fetch="if [ ! -d $DIR_R/.git ]; then git init -q $DIR_R"
    fetch="$fetch && git -C $DIR_R remote add origin $(shquote "$REPO_URL"); fi"
    fetch="$fetch && git -C $DIR_R remote set-url origin $(shquote "$REPO_URL")"
    fetch="$fetch && git -C $DIR_R fetch -q --depth=1 origin $(shquote "$REPO_REF")"
    fetch="$fetch && git -C $DIR_R checkout -q --force FETCH_HEAD"
  else
    local tmp tarball
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand $tmp now: it is local to this function
    trap "rm -rf '$tmp'" EXIT
    tarball="$tmp/r1jax-src.tgz"
    pack_checkout "$tarball"
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:r1jax-src.tgz" \
      ${LOCATION[@]+"${LOCATION[@]}"} --worker=all
    # Unpack beside the old copy, then swap, so a failed copy leaves the old code usable. What
    # the old copy holds at its top level and the new one does not comes along: runs started
    # without --workdir (r1jax's default runs/<stage>) or with a relative one live there.
    local keep="for f in $DIR_R/* $DIR_R/.[!.]*; do if [ -e \"\$f\" ] && [ \"\${f##*/}\" != .git ]"
    keep="$keep && [ ! -e $DIR_R.new/\"\${f##*/}\" ]; then mv \"\$f\" $DIR_R.new/; fi; done"
    fetch="rm -rf $DIR_R.new && mkdir -p $DIR_R.new"
    fetch="$fetch && tar -xzf \"\$HOME\"/r1jax-src.tgz -C $DIR_R.new"
    fetch="$fetch && { $keep; } && rm -rf $DIR_R && mv $DIR_R.new $DIR_R"
    fetch="$fetch && rm -f \"\$HOME\"/r1jax-src.tgz"
  fi
  # uv comes from pip when it can, else from its official installer (pip refuses --user
  # installs on images whose system Python is marked externally managed).
  local install="export PATH=\"\$HOME/.local/bin:\$PATH\""
  install="$install && { command -v uv >/dev/null || python3 -m pip install -q --user uv"
  install="$install || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
  install="$install && { [ -x $VENV_R/bin/python ]"
  install="$install || uv venv -q --python $(shquote "$PYTHON_VERSION") $VENV_R; }"
  install="$install && uv pip install -q --python $VENV_R/bin/python -e $DIR_R'[tpu]'"
  # Import only: touching the TPU here would fail while a detached run holds it.
  install="$install && $VENV_R/bin/python -c"
  install="$install 'import jax, r1jax; print(\"r1jax ready, jax\", jax.__version__)'"
  # Replacing the code under a running job would break it at its next import.
  on_workers "set -e; $(busy_check); $fetch && $install"
}

# Shell code for each host that exports R1JAX_COORDINATOR_ADDRESS / R1JAX_NUM_PROCESSES /
# R1JAX_PROCESS_ID from the metadata server, reading the same keys and port as jax's own
# GceTpuCluster: worker 0 (first in worker-network-endpoints, entries "name:id:ip" or a bare
# host) is the coordinator. r1jax then starts jax.distributed the same way as on GPUs. Nothing
# is exported on a single-host slice, or where there is no metadata server.
COORDINATOR_FROM_METADATA="$(one_line <<'EOF'
md() { curl -sf --retry 3 --max-time 10 -H "Metadata-Flavor: Google"
  "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/$1";
};
if id=$(md agent-worker-number) && eps=$(md worker-network-endpoints); then
  n=$(printf "%s\n" "$eps" | tr , "\n" | grep -c .); first=${eps%%,*}; first=${first##*:};
  if [ "$n" -gt 1 ]; then
    export R1JAX_COORDINATOR_ADDRESS="$first:8482" R1JAX_NUM_PROCESSES="$n" R1JAX_PROCESS_ID="$id";
  fi;
fi
EOF
)"

do_run() {
  [ ${#PASS_ARGS[@]} -gt 0 ] ||
    die "'run' needs the r1jax arguments after '--', e.g. -- --stage=rl --workdir=gs://BUCKET/run"
  check_r1jax_args "${PASS_ARGS[@]}"
  warn_unless_shared_workdir "on a TPU slice use gs://BUCKET/PATH"
  # PYTHONUNBUFFERED: gcloud relays the output live instead of in 4 KiB bursts.
  local env_words="PYTHONUNBUFFERED=1" pair
  for pair in ${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"}; do
    env_words="$env_words $(shquote "$pair")"
  done
  local launch
  launch="env $env_words $VENV_R/bin/python -m r1jax.launch $(shjoin "${PASS_ARGS[@]}")"
  local prelude
  prelude="$(busy_check); $COORDINATOR_FROM_METADATA; cd $DIR_R && mkdir -p $STATE_R"
  if [ "$DETACH" = 1 ]; then
    # One log name for every host, picked here so that `logs` finds it on any worker.
    local log
    log="$R1JAX_STAGE-$(date +%Y%m%d-%H%M%S).log"
    local cmd="$prelude && { nohup $launch > $STATE_R/$log 2>&1 < /dev/null & }"
    cmd="$cmd && echo \$! > $STATE_R/run.pid && ln -sf $log $STATE_R/latest.log"
    cmd="$cmd && echo \"\$(hostname): started r1jax (pid \$!), log ~/r1jax-logs/$log\""
    on_workers "$cmd"
    [ "$DRY_RUN" = 1 ] ||
      echo "Follow it with: $0 logs --name $NAME --follow${ZONE:+ --zone $ZONE}${PROJECT:+ --project $PROJECT}"
  else
    # r1jax's own pid goes to run.pid (for `stop`). Not exec'd: a process killed by a signal
    # (JAX aborts every survivor when one host dies; the OOM killer; `stop`'s SIGKILL) would end
    # the ssh session with that signal, which ssh reports as 255, and gcloud takes 255 for a
    # failed connection and runs the whole command again, up to 10 times. Its exit status is
    # mapped below 128 instead (SIGABRT 134 -> 70, SIGKILL 137 -> 73).
    trap 'warn "interrupted; stopping r1jax on every worker"; do_stop; exit 130' INT
    local wait_for="p=\$!; echo \$p > $STATE_R/run.pid; wait \$p; rc=\$?"
    # (130 is r1jax's own exit after a clean stop, Ctrl-C or SIGTERM, its step saved: not a kill)
    local mapped="if [ \$rc -eq 130 ]; then echo \"\$(hostname): r1jax stopped (resumable)\" >&2;"
    mapped="$mapped rc=66; elif [ \$rc -ge 128 ]; then echo \"\$(hostname): r1jax was killed by"
    mapped="$mapped signal \$((rc - 128))\" >&2; rc=\$((rc - 64)); fi; exit \$rc"
    on_workers "$prelude && { $launch & $wait_for; $mapped; }"
  fi
}

do_logs() {
  local tail_opts="-n 200"
  [ "$FOLLOW" = 0 ] || tail_opts="$tail_opts -F"
  on_workers "tail $tail_opts $STATE_R/latest.log" "$WORKER"
}

# SIGTERM first: a multi-host run stops at the end of the step it is on and saves it (an RL step
# with its rollout can take minutes); SIGKILL after --grace seconds (default 300). The pid is only
# signalled while it still belongs to r1jax, in case it was reused after the run ended.
do_stop() {
  local script
  script="$(one_line <<'EOF'
f="$HOME"/r1jax-logs/run.pid; [ -f "$f" ] || exit 0; p=$(cat "$f");
if grep -qa r1jax.launch /proc/"$p"/cmdline 2>/dev/null; then
  kill "$p"; i=0;
  while grep -qa r1jax.launch /proc/"$p"/cmdline 2>/dev/null && [ $i -lt @GRACE@ ]; do
    sleep 1; i=$((i + 1));
  done;
  if grep -qa r1jax.launch /proc/"$p"/cmdline 2>/dev/null; then
    kill -9 "$p" 2>/dev/null || true; rm -f "$f";
    echo "$(hostname): r1jax (pid $p) did not stop within @GRACE@ s and was killed: the step it
was on is not saved (a rerun resumes from the last checkpoint; a longer --grace lets a step
finish)" >&2; exit 3;
  fi;
  echo "$(hostname): stopped r1jax (pid $p)";
fi;
rm -f "$f"
EOF
)"
  on_workers "${script//@GRACE@/$GRACE}"
}

do_exec() {
  [ ${#PASS_ARGS[@]} -gt 0 ] || die "'exec' needs a shell command after '--'"
  # Joined with spaces, as ssh does: `exec -- 'cmd | filter'` and `exec -- ls -l` both work.
  on_workers "${PASS_ARGS[*]}"
}

do_delete() {
  run gcloud compute tpus tpu-vm delete "$NAME" ${LOCATION[@]+"${LOCATION[@]}"}
}

"do_$CMD"
