"""The command line: one command per stage of the R1 recipe.

    python -m r1jax.launch --stage=rl [--config=configs/rl.py] [--config.rl.beta=0.0 ...]
    [--workdir=DIR]

The workdir may be a local directory or a cloud URI (`--workdir=gs://bucket/run`; needs `gcsfs` and
`google-cloud-storage`): checkpoints, metrics, TensorBoard events, logs, HF exports and results are
written there through `r1jax.paths` (files that grow are kept in a local working copy and uploaded
now and then). `pretrain` and `pipeline` read their own outputs back with local-only readers and
need a local workdir. Input paths (model.path, data files) are local.

Without --config the stage's built-in offline default `configs/<stage>.py` is used (a tiny model on
a built-in task, runnable on a laptop CPU with nothing downloaded). Overrides use ml_collections
syntax and the config is locked, so a misspelt key is an error rather than a silently new field. The
same command runs on every host of a TPU pod slice or a GPU cluster: multi-host start-up happens
here, before anything touches a device (see `r1jax.sharding.initialize_distributed`).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

STAGES = ("pretrain", "sft", "rl", "rejection_sampling", "distill", "eval", "pipeline")
# Stages that read back what they write into the workdir with local-only readers.
LOCAL_WORKDIR_STAGES = {
    "pretrain": "the tokenizer it trains is saved to and loaded from the workdir",
    "pipeline": "each stage loads the previous stage's HF export from the workdir, and hf.load "
    "reads local folders",
}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _with_flagfiles(argv: list[str], reading: tuple[str, ...] = ()) -> list[str]:
    """argv with each --flagfile=F (or "--flagfile F") replaced by its flags (absl's file of
    flags: one per line, blank lines and lines starting with # or // skipped; a flagfile may
    name another; one that names a file being read is skipped, as absl skips it).

    Raises:
      SystemExit: a flagfile that cannot be read, named in one line.
    """
    out, i = [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ("--flagfile", "-flagfile") and i < len(argv):
            arg, i = f"--flagfile={argv[i]}", i + 1
        if not arg.startswith(("--flagfile=", "-flagfile=")):
            out.append(arg)
            continue
        path = os.path.abspath(os.path.expanduser(arg.split("=", 1)[1]))
        if path in reading:
            continue
        try:
            with open(path) as f:
                lines = [line.strip() for line in f]
        except OSError as e:
            sys.exit(f"error: --flagfile={path}: {e.strerror or e}")
        lines = [x for x in lines if x and not x.startswith(("#", "//"))]
        out += _with_flagfiles(lines, (*reading, path))
    return out


def _stage_from_argv(argv: list[str]) -> str | None:
    """The --stage value; the last one given, as absl takes it (a flagfile's, then the
    command line's)."""
    stage = None
    for i, arg in enumerate(argv):
        if arg.startswith(("--stage=", "-stage=")):  # (absl takes either)
            stage = arg.split("=", 1)[1]
        elif arg in ("--stage", "-stage") and i + 1 < len(argv):
            stage = argv[i + 1]
    return stage


def _with_default_config(argv: list[str]) -> list[str]:
    """Insert --config=configs/<stage>.py when the user gave none (ml_collections needs a file)."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    stage = _stage_from_argv(argv)
    if stage not in STAGES:
        if any(a.startswith("--config.") for a in argv) and not {"--help", "-h"} & set(argv):
            # (absl would call each override an unknown flag, as if the field did not exist)
            given = f"--stage={stage} is not a stage" if stage else "--stage is missing"
            sys.exit(f"error: {given}: give one of {', '.join(STAGES)} for the --config.* fields")
        return argv  # absl reports the bad or missing --stage with the list of choices
    return argv[:1] + [f"--config={os.path.join(CONFIG_DIR, stage + '.py')}"] + argv[1:]


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    # Flagfiles first, so that a --stage or --config given in one counts like one on the command
    # line (the default config, --help's field list, the config file's checks).
    argv = _with_flagfiles(list(argv if argv is not None else sys.argv))
    argv = _with_default_config(_expand_config_path(argv))
    _survive_closed_output()
    flags.DEFINE_enum("stage", None, STAGES, "Stage of the recipe to run.")
    config_flags.DEFINE_config_file(
        "config",
        None,
        "ml_collections config file (default: configs/<stage>.py). Override fields "
        "with --config.section.field=value.",
        lock_config=True,
        sys_argv=argv,  # (its overrides are read from this list, not from sys.argv)
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Output directory, local or gs://bucket/path (default: runs/<stage>). Rerunning the "
        "same command resumes from its last checkpoint.",
    )
    flags.mark_flag_as_required("stage")

    def run(rest):
        import jax
        from absl import logging as absl_logging

        if len(rest) > 1:  # (after a "--", or without the dashes: absl leaves them over)
            sys.exit(
                f"error: unexpected arguments {rest[1:]}; give flags as --stage=..., "
                f"--workdir=... and --config.section.field=value"
            )

        from r1jax import paths, sharding

        # Libraries (orbax above all) log every file they write at INFO; r1jax's own logger is
        # separate and keeps INFO.
        absl_logging.set_verbosity(absl_logging.WARNING)

        start_error = None
        try:
            sharding.initialize_distributed()  # before any device is touched
        except sharding.JoinedAnotherCount as e:  # (joined: said in the start-up agreement)
            start_error = f"error: {e}"
        except ValueError as e:  # a half-set multi-host environment
            sys.exit(f"error: {e}")
        if jax.process_index() != 0:  # (until the stage's own logging: validation's warnings
            # were printed once per host, in absl's format)
            quiet = logging.getLogger("r1jax")
            quiet.addHandler(logging.NullHandler())
            quiet.propagate = False
        from r1jax.stages import common

        common.enable_compilation_cache()

        config = flags.FLAGS.config
        stage = flags.FLAGS.stage
        shared_error = None
        if stage == "pipeline":  # (a top-level flag reaches every stage, even at its default)
            from r1jax.stages import pipeline

            try:
                pipeline.apply_shared_flags(config, _override_keys(argv))
            except common.ConfigError as e:
                shared_error = e
        if flags.FLAGS["workdir"].present and not flags.FLAGS.workdir.strip():
            sys.exit("error: --workdir is empty (an unset shell variable?); give a folder")
        workdir = flags.FLAGS.workdir or os.path.join("runs", stage)
        if not paths.is_remote(workdir):
            workdir = os.path.expanduser(workdir)  # ("--workdir=~/x": no shell expands it)
        error = start_error  # (the processes' count: nothing more is checked)
        try:
            if error is None and shared_error is not None:
                raise shared_error
            if error is None:
                common.validate(config, stage)
                error = _workdir_error(workdir, stage)
        except common.ConfigError as e:
            error = f"config error: {e}"
        except Exception as e:  # unexpected (a half-copied config.json ...): the others must know
            if jax.process_count() == 1:
                raise
            error = f"error: {type(e).__name__}: {e}"
        # A check can fail on one host only (its copy of the model folder is missing): every
        # process stops then, instead of the others running on into a collective that waits.
        error = _agree_on_start(error)
        shards = (*common.CHECKPOINTING_STAGES, "pipeline")
        if error is None and jax.process_count() > 1 and stage in shards:
            # Every process writes its shards of each checkpoint into the workdir, and process 0
            # commits it: on each host's own disk no checkpoint ever completes (the run hangs at
            # its first save or its end). (Evaluation and rejection sampling write from process
            # 0 alone.)
            seen, total = (1, 1) if paths.is_remote(workdir) else common.processes_sharing(workdir)
            if seen < total:
                error = (
                    f"error: --workdir={workdir} is not one folder shared by every host ("
                    f"{total - seen} of the {total} processes do not see process 0's files in "
                    f"it); give a shared file system path or a gs:// URI"
                )
        if error is not None:
            # Every process knows now: leave at once, without JAX's shutdown barrier (where the
            # coordinator was seen waiting past its peers' exit under load).
            _fail(error)
        from r1jax.checkpoint import (
            CheckpointError,
            Preempted,
            drop_abandoned_read_reports,
            stop_at_next_sync_point,
        )
        from r1jax.models.hf import CheckpointError as ModelFolderError
        from r1jax.train import Diverged

        drop_abandoned_read_reports()  # a failed restore ends in its one-line error alone
        # SIGTERM (`tpu_pod.sh stop`, a scheduler) and Ctrl-C stop the run after it saves the
        # step it is on. With several processes JAX's preemption notice takes SIGTERM instead
        # (Ctrl-C is passed on to it), and every process stops at one step (`Preempted`).
        stop_at_next_sync_point()
        try:
            common.run_stage(stage, config, workdir)
        except (common.ConfigError, CheckpointError, ModelFolderError, Diverged) as e:
            # Problems the user can fix (a data file, a damaged checkpoint, a model folder
            # without usable weights, a learning rate that made training diverge): one line.
            _fail(f"error: {e}")
        except OSError as e:
            import errno

            # A full disk or quota, a disk gone read-only: one line, not a traceback whose
            # last frame (often a second failed write while stopping) hides the cause.
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
                if jax.process_count() == 1:
                    raise
                traceback.print_exc()
                _leave_now()
            _fail(
                f"error: writing {e.filename or 'into ' + workdir} failed: {e.strerror}; what "
                "was saved before it is intact, and the same command carries on from it once "
                "the folder can be written again"
            )
        except Exception:  # a bug: its traceback, and on several processes, leave at once
            if jax.process_count() == 1:
                raise
            traceback.print_exc()
            _leave_now()
        except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM: the last checkpoint has committed
            if stage in (*common.CHECKPOINTING_STAGES, "pipeline"):
                then = f"the same command resumes from the last checkpoint in {workdir}"
            elif stage == "rejection_sampling":
                then = f"the same command resumes from the batches saved in {workdir}"
            else:
                then = f"--stage={stage} keeps no checkpoints: the same command starts it again"
            print(
                f"{stop if isinstance(stop, Preempted) else 'interrupted'}; {then}", file=sys.stderr
            )
            sys.exit(130)

    app.run(run, argv=argv, flags_parser=_parse_flags_with_help)


def _workdir_error(workdir: str, stage: str) -> str | None:
    """Why `workdir` cannot hold `stage`'s run (e.g. gs:// without gcsfs), or None."""
    from r1jax import paths

    if paths.is_remote(workdir) and stage in LOCAL_WORKDIR_STAGES:
        return (
            f"error: --workdir: --stage={stage} needs a local workdir "
            f"({LOCAL_WORKDIR_STAGES[stage]}); copy the results to {workdir} afterwards "
            f"(e.g. gsutil -m rsync -r)"
        )
    try:
        paths.check_workdir(workdir)
    except ValueError as e:
        return f"error: --workdir: {e}"
    return None


def _fail(message: str) -> None:
    """End the run with `message`, one line on stderr; with several processes, at once
    (`_leave_now`)."""
    import jax

    if jax.process_count() > 1:
        print(message, file=sys.stderr, flush=True)
        _leave_now()
    sys.exit(message)


def _leave_now() -> None:
    """Exit 1 without JAX's shutdown barrier. Only this process may have failed (a checkpoint
    damaged in its own files) while the others wait for it inside a collective; through the
    barrier it would wait for them in turn, all of them until killed. Leaving closes its
    connections, so the others' collective fails and they stop too (or the coordination service
    ends them when this process's heartbeat stops)."""
    sys.stderr.flush()
    logging.shutdown()
    os._exit(1)


def _agree_on_start(error: str | None) -> str | None:
    """This process's start-up error, or, when another process of a multi-process run has one,
    a line saying which (their own output says why); None when every process can start."""
    import jax

    if jax.process_count() == 1:
        return error
    import numpy as np
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is None and failed.any():
        return (
            f"error: process(es) {np.flatnonzero(failed).tolist()} cannot start (see their output)"
        )
    return error


def _expand_config_path(argv: list[str]) -> list[str]:
    """argv with a leading "~" of --config's path expanded ("--config=~/x.py": no shell expands
    it after "=", and the launchers quote it)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config=~"):
            out[i] = "--config=" + os.path.expanduser(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(out) and out[i + 1].startswith("~"):
            out[i + 1] = os.path.expanduser(out[i + 1])
    return out


class _SurvivingOutput:
    """sys.stdout / sys.stderr that outlive their reader: once the pipe's other end has gone (an
    ssh session dropped or ended by Ctrl-C on the launching machine, `head`), further output
    goes to /dev/null instead of raising BrokenPipeError at the next progress-bar draw, so the
    run goes on to the stop that follows (SIGTERM: save the step, exit) or to its end."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):  # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def _survive_closed_output() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _SurvivingOutput):
            setattr(sys, name, _SurvivingOutput(stream))


def _config_spec(argv: list[str]) -> str | None:
    """The --config value ("path" or "path:arg"; the last one given, as absl takes it), or None
    when absent."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _override_keys(argv: list[str]) -> list[str]:
    """The fields the command line sets: "--config.log.every=5" -> "log.every" (also "-config.",
    a boolean's "--noconfig."; flagfiles are expanded by then)."""
    keys = []
    for arg in argv:
        for prefix in ("--config.", "-config.", "--noconfig.", "-noconfig."):
            if arg.startswith(prefix):
                keys.append(arg[len(prefix) :].split("=", 1)[0])
    return keys


def _unknown_override(argv: list[str]) -> str | None:
    """A message naming the first --config.a.b=... override that the config has no field for."""
    from ml_collections import ConfigDict

    from r1jax.stages import common

    spec = _config_spec(argv)
    if spec is None:
        return None
    try:
        config = common.load_config_file(spec)
    except Exception:  # the config file itself is broken: let absl's own error stand
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        parts = arg[len("--config.") :].split("=", 1)[0].split(".")
        node = config
        for i, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "the config"
                fields = sorted(node.keys()) if isinstance(node, ConfigDict) else []
                return (
                    f"config error: unknown field {'.'.join(parts[: i + 1])!r} (from "
                    f"{arg.split('=', 1)[0]}); {where} has the fields {fields}. Run with "
                    f"--help to list every field."
                )
            node = node[part]
    return None


def _in_file(error: BaseException, spec: str) -> str:
    """ "line N: " of the config file where `error` was raised, or ""."""
    import traceback as tb

    path = os.path.abspath(spec.split(":", 1)[0])
    if isinstance(error, SyntaxError) and error.lineno:
        return f"line {error.lineno}: "
    lines = [
        f.lineno for f in tb.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == path
    ]
    return f"line {lines[-1]}: " if lines else ""


def _parse_flags_with_help(argv):
    """absl parsing, plus a --help that lists the stages and the chosen config's fields."""
    from absl import flags
    from ml_collections import ConfigDict

    if "--help" in argv or "-h" in argv or "--helpfull" in argv:
        print(__doc__)
        print("Stages: " + ", ".join(STAGES) + "\n")
        stage = _stage_from_argv(argv)
        if stage in STAGES:
            from ml_collections import config_flags  # noqa: F401  (registers the config parser)

            from r1jax.stages import common

            spec = _config_spec(argv) or os.path.join(CONFIG_DIR, stage + ".py")
            try:
                fields = common.describe(common.load_config_file(spec))
            except (OSError, ValueError) as e:
                sys.exit(f"config error: --config={spec}: {e}")
            print(f"Config fields of {spec} (override with --config.FIELD=VALUE):")
            print(fields)
        else:
            print("Give --stage=STAGE --help to list that stage's config fields.")
        sys.exit(0)
    spec = _config_spec(argv)
    if spec is not None and not os.path.isfile(spec.split(":", 1)[0]):
        # (ml_collections would defer this to a traceback at the config's first use)
        known = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
        sys.exit(
            f"config error: --config={spec}: no such file; the stages' configs are in "
            f"{CONFIG_DIR} ({', '.join(known)})"
        )
    if spec is not None and not spec.split(":", 1)[0].endswith(".py"):
        # (a run's saved config_<stage>.json: importlib found no loader, a bare AttributeError)
        sys.exit(
            f"config error: --config={spec}: a config is a Python file with get_config() (e.g. "
            f"configs/<stage>.py); a run's saved config_<stage>.json records the settings, "
            f"give them as --config.section.field=value flags"
        )
    if spec is not None:
        from r1jax.stages import common

        try:  # (ml_collections would print its own traceback around the message)
            config = common.load_config_file(spec)
        except ValueError as e:
            sys.exit(f"config error: --config={spec}: {e}")
        except Exception as e:  # the file itself: a syntax error, an import, no get_config()
            sys.exit(f"config error: --config={spec}: {_in_file(e, spec)}{type(e).__name__}: {e}")
        if not isinstance(config, ConfigDict):
            sys.exit(
                f"config error: --config={spec}: get_config() returned a "
                f"{type(config).__name__}, not an ml_collections.ConfigDict"
            )
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"{e}\nRun with --help for usage.")
    except (AttributeError, KeyError) as e:
        # ml_collections reports an override of a field the (locked) config lacks this way.
        sys.exit(_unknown_override(argv) or f"config error: {e}")


if __name__ == "__main__":
    main()
