# shellcheck shell=bash
# Helpers shared by the r1jax launchers (tpu_pod.sh, slurm_gpu.sh, ssh_gpu.sh); sourced, not run.
#
# Notable choices:
# - Commands are built as bash arrays and only turned into text when they must cross a shell
#   boundary (ssh, gcloud --command, sbatch --wrap) or be printed by --dry-run. `shquote` emits
#   POSIX single quotes rather than bash's `printf %q`, because the far side may be dash or sh.
# - Written for bash 3.2 too (the macOS default, where the TPU launcher is often run from):
#   no associative arrays, no `mapfile`, no `wait -n`, and empty arrays expanded as
#   ${a[@]+"${a[@]}"} so that `set -u` does not trip on them.

R1JAX_STAGES="pretrain sft rl rejection_sampling distill eval pipeline"

# Print an error naming what to fix, point at --help, and exit 2 (bad usage).
die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  printf "Run '%s --help' for usage.\n" "${0##*/}" >&2
  exit 2
}

warn() {
  printf '%s: warning: %s\n' "${0##*/}" "$*" >&2
}

# Quote one word for a POSIX shell; words made only of safe characters stay bare so that
# --dry-run output reads like what a person would type. Each ' becomes '\'' (close the quotes,
# an escaped quote, reopen); a loop rather than ${1//.../...}, whose quoting rules changed
# between bash versions.
shquote() {
  case "$1" in
    '' | *[!A-Za-z0-9_./=:,@%+-]*) ;;
    *) printf '%s' "$1" && return ;;
  esac
  local rest="$1" out=""
  while :; do
    case "$rest" in
      *"'"*) ;;
      *) break ;;
    esac
    out="$out${rest%%"'"*}'\\''"
    rest="${rest#*"'"}"
  done
  printf "'%s'" "$out$rest"
}

# Quote every argument and join them with spaces: a command line a POSIX shell parses back into
# exactly these words.
shjoin() {
  local out="" word
  for word in "$@"; do
    out="$out $(shquote "$word")"
  done
  printf '%s' "${out# }"
}

# A path on a remote host: absolute paths are quoted as they are; relative ones are taken from
# the remote $HOME, which must expand there, not here.
remote_path() {
  case "$1" in
    /*) shquote "$1" ;;
    *)
      # shellcheck disable=SC2016  # $HOME is meant for the remote shell
      printf '"$HOME"/%s' "$(shquote "$1")"
      ;;
  esac
}

# Join the lines of a shell snippet on stdin into one line (each line must end where a shell
# allows a space: after `;`, `then`, `do`, `&&` ...), so that --dry-run prints one command a line.
one_line() {
  local text
  text="$(tr -s '\n' ' ')"
  printf '%s' "${text% }"
}

# Run a command, or with DRY_RUN=1 print it as one copy-pasteable line.
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%s\n' "$(shjoin "$@")"
  else
    "$@"
  fi
}

# Check that a KEY=VALUE pair given to --env has a usable variable name.
check_env_pair() {
  case "$1" in
    [A-Za-z_]*=*)
      local key="${1%%=*}"
      case "$key" in
        *[!A-Za-z0-9_]*) die "--env $1: '$key' is not a valid environment variable name" ;;
      esac
      ;;
    *) die "--env expects KEY=VALUE, got '$1'" ;;
  esac
}

# Inspect the arguments meant for `python -m r1jax.launch` before anything is started on a
# cluster: a missing or misspelt stage should fail here, not on 16 hosts a minute later.
# Sets R1JAX_STAGE and R1JAX_WORKDIR (empty when --workdir is absent). A --flagfile read here
# is looked into too (r1jax reads it again on the hosts, at that path there).
check_r1jax_args() {
  R1JAX_STAGE=""
  R1JAX_WORKDIR=""
  R1JAX_FLAGFILES_SEEN=""
  R1JAX_FLAGFILE_UNREAD=""
  scan_r1jax_args "$@"
  if [ -z "$R1JAX_STAGE" ] && [ -n "$R1JAX_FLAGFILE_UNREAD" ]; then
    die "no --stage in the r1jax arguments, and --flagfile=$R1JAX_FLAGFILE_UNREAD is not" \
      "readable here to look for one; give --stage after '--' (stages: $R1JAX_STAGES)"
  fi
  if [ -z "$R1JAX_STAGE" ]; then
    die "no --stage in the r1jax arguments; put them after '--', e.g. -- --stage=rl" \
      "(stages: $R1JAX_STAGES)"
  fi
  case " $R1JAX_STAGES " in
    *" $R1JAX_STAGE "*) ;;
    *) die "unknown stage '$R1JAX_STAGE'; choose one of: $R1JAX_STAGES" ;;
  esac
}

# The flags of check_r1jax_args, a flagfile's lines included (absl's format: one flag per line,
# blank lines and # or // comments skipped; a file already read is not read again, so a flagfile
# that names itself ends).
scan_r1jax_args() {
  local expect="" arg path line flags
  for arg in "$@"; do
    path=""
    case "$expect" in
      stage) R1JAX_STAGE="$arg" expect="" && continue ;;
      workdir) R1JAX_WORKDIR="$arg" expect="" && continue ;;
      flagfile) path="$arg" expect="" ;;
    esac
    if [ -z "$path" ]; then
      case "$arg" in
        --stage=* | -stage=*) R1JAX_STAGE="${arg#*=}" ;;
        --stage | -stage) expect=stage ;;
        --workdir=* | -workdir=*) R1JAX_WORKDIR="${arg#*=}" ;;
        --workdir | -workdir) expect=workdir ;;
        --flagfile=* | -flagfile=*) path="${arg#*=}" ;;
        --flagfile | -flagfile) expect=flagfile ;;
      esac
      [ -n "$path" ] || continue
    fi
    path="${path/#\~/$HOME}"
    case "$R1JAX_FLAGFILES_SEEN" in *"|$path|"*) continue ;; esac
    if [ ! -r "$path" ]; then  # (it may exist on the hosts only: r1jax reads it there)
      R1JAX_FLAGFILE_UNREAD="$path"
      continue
    fi
    R1JAX_FLAGFILES_SEEN="$R1JAX_FLAGFILES_SEEN|$path|"
    flags=()
    while IFS= read -r line || [ -n "$line" ]; do  # (no mapfile in bash 3.2)
      line="${line#"${line%%[![:space:]]*}"}"
      line="${line%"${line##*[![:space:]]}"}"
      case "$line" in "" | "#"* | "//"*) continue ;; esac
      flags+=("$line")
    done <"$path"
    [ "${#flags[@]}" = 0 ] || scan_r1jax_args "${flags[@]}"
  done
}

# Warn when a multi-host run would scatter its checkpoint across local disks: every process
# writes its own shards, so the workdir must be storage that all hosts see.
warn_unless_shared_workdir() {
  local hint="$1"
  if [ -z "$R1JAX_WORKDIR" ]; then
    warn "no --workdir given; a multi-host run needs one that every host can read and write ($hint)"
  else
    case "$R1JAX_WORKDIR" in
      gs://* | /*) ;;
      *)
        warn "--workdir=$R1JAX_WORKDIR is relative; every host must see the same directory" \
          "($hint)"
        ;;
    esac
  fi
}
