"""Checkpoints: save, resume and export the whole training state with orbax.

A checkpoint is one orbax step directory `DIR/<step>/` with three items (four):

- `model/`:     `nnx.state(model)`, every variable (params, and RNG streams if the model has any);
- `optimizer/`: `nnx.state(optimizer)`, optimizer step counter and optax state;
- `extra/`:     one JSON object the caller owns: step, data position, host RNG state, config.
- `reference/`: (optional) `nnx.state` of a model the run changes besides, e.g. GRPO's
  reference when it is synced to the policy.

Notable choices:
- Restores go *into the caller's live objects*: target shapes, dtypes and shardings come from the
  model/optimizer as they are now, so a run saved on one mesh resumes on another mesh shape or on a
  single device, and each host reads only its own shards.
- A kill at any moment cannot leave a checkpoint that looks complete: orbax writes each step into
  `<step>.orbax-checkpoint-tmp-*` and commits it atomically (a rename on local disks, a
  `commit_success.txt` marker on GCS); uncommitted directories are ignored and removed at start-up.
  A committed step that is nevertheless damaged (a file deleted or truncated afterwards) or no
  longer fits the model ends in one `CheckpointError` naming the directory to move; a damaged
  checkpoint is never deleted on the user's behalf.
- Retention is "the last `max_to_keep` plus the best by `best_metric`", two orbax preservation
  policies combined, so the best checkpoint survives however long the run goes on.
- Saves are asynchronous by default: `save` returns once arrays are copied off the device (orbax's
  synchronous device-to-host transfer, so donated buffers can be reused at once) and files are
  written in the background. Every process must call `save`/`restore` (orbax coordinates the hosts
  and the primary host writes the shared metadata).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import traceback
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from r1jax import paths

log = logging.getLogger(__name__)

_MODEL, _OPTIMIZER, _EXTRA, _REFERENCE = "model", "optimizer", "extra", "reference"


class Preempted(KeyboardInterrupt):
    """Raised on every process at one point where a run was told to stop (a multi-process run:
    JAX's preemption notice, SIGTERM to the processes; one process: SIGTERM or Ctrl-C, see
    `stop_at_next_sync_point`): by `Checkpointer.save` once that step's checkpoint is written, by
    `stop_if_preempted` in loops that keep no checkpoints. A KeyboardInterrupt, so that it ends a
    run the way Ctrl-C does."""

    def __init__(self, where: str, saved: bool = True):
        saved_note = "; its checkpoint is saved" if saved else ""
        super().__init__(f"stopped at {where} (SIGTERM / Ctrl-C / preemption){saved_note}")


_sync_calls = 0  # sync points asked in this process (`Checkpointer.save`, `stop_if_preempted`)
_stop_asked = False  # one process: a SIGTERM / SIGINT came (`stop_at_next_sync_point`)


def stop_at_next_sync_point() -> None:
    """One process: SIGTERM and Ctrl-C ask the run to stop at its next sync point, where
    `Checkpointer.save` saves that step first (a KeyboardInterrupt raised wherever the program was
    could land inside orbax's save and lose the step being written); a second signal stops at
    once. Multi-process runs stop through JAX's preemption notice instead, SIGTERM, which
    Ctrl-C is passed on to (a KeyboardInterrupt stopped each process wherever it was, with no
    step saved; a second Ctrl-C still does)."""
    import jax

    if jax.process_count() > 1:
        interrupted = []

        def pass_on(signum, frame):
            if interrupted:
                raise KeyboardInterrupt
            interrupted.append(signum)
            print(
                "SIGINT: every process stops after this step's checkpoint (press Ctrl-C again "
                "to stop at once)",
                file=sys.stderr,
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGTERM)  # (JAX's preemption notice, to every process)

        signal.signal(signal.SIGINT, pass_on)
        return

    def ask(signum, frame):
        global _stop_asked
        if _stop_asked:
            raise KeyboardInterrupt
        _stop_asked = True
        print(
            f"{signal.Signals(signum).name}: stopping after this step's checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, ask)


def _sync_point() -> bool:
    """Whether the processes have agreed to stop here (JAX's preemption service, started by
    `jax.distributed.initialize`; always False on one process).

    The service stops at the call number one past the highest any process has reported, so the
    number must only rise: a per-process count of the calls, which every process makes in the
    same order, not the training step (a resumed run starts high, then reports nothing below it;
    a pipeline's stages each count from 0).
    """
    from jax.experimental import multihost_utils

    global _sync_calls
    _sync_calls += 1
    if _stop_asked:
        return True
    try:
        return bool(multihost_utils.reached_preemption_sync_point(_sync_calls))
    except RuntimeError:  # no distributed client / preemption service: nothing to agree on
        return False


def stop_if_preempted(where: str) -> None:
    """A stop point for loops that keep no checkpoints (evaluation, rejection sampling): raise
    `Preempted` on every process at once when a multi-process run has been told to stop (they
    would otherwise go on until SIGKILL). Every process must call it at the same points."""
    if _sync_point():
        raise Preempted(where, saved=False)


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; the message names the directory and the fix."""


# --------------------------------------------------------------------------------------------------
# The checkpointer
# --------------------------------------------------------------------------------------------------


class Checkpointer:
    """Periodic, resumable checkpoints of an NNX model + optimizer + a JSON dict of host state.

    Typical loop (every process runs the same code):

        ckpt = Checkpointer(workdir / "checkpoints", save_interval_steps=50, max_to_keep=3,
                            best_metric="eval/accuracy", best_mode="max")
        start = 0
        if ckpt.latest_step() is not None:
            extra = ckpt.restore(model, optimizer)
            start, data_pos, key = extra["step"], extra["data"], jax_key_from_json(extra["rng"])
        for step in range(start + 1, num_steps + 1):
            ...
            ckpt.save(step, model, optimizer, {"step": step, "data": ..., "rng": ...}, metrics)
        ckpt.save(num_steps, model, optimizer, {...}, force=True)
        ckpt.close()

    Args:
      directory: where step directories live; created if missing.
      save_interval_steps: `save` writes when `step % save_interval_steps == 0` (or `force=True`,
        or when the TPU runtime announces a preemption).
      max_to_keep: how many of the most recent checkpoints to keep (None keeps all).
      best_metric: name of a key in the `metrics` passed to `save`; the best checkpoint by it is
        kept in addition to the recent ones. None disables best tracking.
      best_mode: "max" or "min": which direction of `best_metric` is better.
      async_save: write files in a background thread. `close()` (or `wait()`) before the
        process ends is then required: Python stops the writer threads before `atexit` hooks run,
        so a save still in flight at exit is lost (its step left as a `*-tmp` folder).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_interval_steps: int = 100,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
        directory = os.fspath(directory)
        # Cloud paths (gs://...) pass through unmodified (orbax writes them with tensorstore and
        # etils.epath); local ones are made absolute for clear messages.
        self.directory = directory if paths.is_remote(directory) else os.path.abspath(directory)
        self.best_metric = best_metric
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric is not None:
            # A step saved without the metric, or with NaN (a diverged evaluation), ranks last
            # rather than raising inside orbax or displacing the best step (NaN compares false).
            worst = -np.inf if best_mode == "max" else np.inf

            def best_fn(metrics):
                value = float(metrics.get(best_metric, worst))
                return worst if np.isnan(value) else value

            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn/best_mode make orbax store per-step metrics and answer best_step();
            # deletion is decided by the preservation policy alone.
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # No InitialSavePolicy: a save at whatever step a run starts on is a full write wasted.
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
                [
                    ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]
            ),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        _check_metrics_files(self.directory)  # orbax reads them all here, unnamed on failure
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                _MODEL: ocp.StandardCheckpointHandler(),
                _OPTIMIZER: ocp.StandardCheckpointHandler(),
                _EXTRA: ocp.JsonCheckpointHandler(),
                _REFERENCE: ocp.StandardCheckpointHandler(),
            },
            options=options,
        )
        # orbax asks the preemption service at the raw step inside `save` / `should_save`; that
        # would report steps that go back (a resumed run, a pipeline's next stage), so it gets
        # the answer of `save`'s own sync point instead (see `_sync_point`).
        self._preempted = False
        self._manager.reached_preemption = lambda step: self._preempted
        paths.track_open(self)  # closed even if the stage using it fails (stages.common)
        _leave_failed_writes_to_checkpoint_error()

    # ---------------------------------------------------------------------------------- queries

    def latest_step(self) -> int | None:
        """The newest committed step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (the latest step when best tracking is off)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """All committed steps, ascending."""
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        """The directory holding `step` (for messages and tools)."""
        return str(epath.Path(self.directory) / str(step))

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without `force` would write."""
        return self._manager.should_save(step)

    # ---------------------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        model: nnx.Module,
        optimizer: nnx.Optimizer | None,
        extra: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
        interval: bool = True,
        reference: nnx.Module | None = None,
    ) -> bool:
        """Save the full training state at `step` if the interval says so (or `force`).

        Args:
          step: the number of completed training steps the state reflects.
          model: the NNX model; all of `nnx.state(model)` is saved, sharded as it lives.
          optimizer: the `nnx.Optimizer`, or None to save the model alone.
          extra: JSON-serialisable host state needed to continue (data position, RNG state as
            `jax_key_to_json(key)` / `np.random.Generator.bit_generator.state`, config dict...).
            In multi-process runs process 0's `extra` is stored and every process gets it back,
            so it must describe global state (e.g. a global data position, not a host's shard).
          metrics: scalars for this step; `best_metric` is read from here.
          force: save even off the interval (use at the end of a run).
          interval: False = no interval save at this step (it is still a stop point, and a
            forced or preemption save still happens): the stages pass `not SkipWatch.skipping`.
          reference: a model the run changes besides (GRPO's reference, synced to the policy),
            saved as a `reference/` item; None = none.

        Returns:
          True if a save was started. A step that is already saved is skipped (False), so a final
          forced save that coincides with an interval save is harmless.
        Raises:
          Preempted: at the step where a multi-process run agreed to stop, after saving it.
        """
        # Every process asks at every call (a sync point): SIGTERM on a multi-process run (a
        # preemption notice, or `launch/tpu_pod.sh stop`) makes all of them stop at one step.
        preempted = self._preempted = _sync_point()
        if step in self._manager.all_steps():
            if preempted:
                raise Preempted(f"step {step}")
            return False
        if not (force or preempted or (interval and self._manager.should_save(step))):
            return False
        _check_json(extra, "extra")
        items = {
            _MODEL: ocp.args.StandardSave(nnx.state(model)),
            _EXTRA: ocp.args.JsonSave(dict(extra)),
        }
        if optimizer is not None:
            items[_OPTIMIZER] = ocp.args.StandardSave(nnx.state(optimizer))
        if reference is not None:
            items[_REFERENCE] = ocp.args.StandardSave(nnx.state(reference))
        scalars = None
        if self.best_metric is not None:
            scalars = {k: float(np.asarray(v)) for k, v in (metrics or {}).items()}
        with self._writing():
            saved = self._manager.save(
                step, args=ocp.args.Composite(**items), metrics=scalars, force=True
            )
            if preempted:
                self._manager.wait_until_finished()
        if preempted:
            raise Preempted(f"step {step}")
        return saved

    # ---------------------------------------------------------------------------------- restore

    def restore(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer | None = None,
        *,
        step: int | None = None,
        reference: nnx.Module | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint into `model` (and `optimizer`) in place; return its `extra` dict.

        Each array is read straight into the sharding the live model/optimizer has now, so the
        mesh may differ from the one the checkpoint was saved on.

        Args:
          model: the model to overwrite; its structure, shapes and dtypes must match the saved one.
          optimizer: the optimizer to overwrite, or None to load parameters only (e.g. to start
            SFT from an RL checkpoint or to evaluate).
          step: which step; None means `latest_step()`.
          reference: the model saved as `save`'s `reference`, to overwrite too.

        Returns:
          The `extra` dict given to `save`.

        Raises:
          CheckpointError: no checkpoint exists, or the step is damaged or does not fit the model;
            the message names the directory and what to do.
        """
        step = self._resolve_step(step)
        path = self.step_dir(step)
        targets: dict[str, Any] = {_MODEL: nnx.state(model)}
        if optimizer is not None:
            targets[_OPTIMIZER] = nnx.state(optimizer)
        if reference is not None:
            targets[_REFERENCE] = nnx.state(reference)
        drop_abandoned_read_reports(self.step_dir(step))
        self._check_matches(step, targets)
        args = {name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in targets.items()}
        args[_EXTRA] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as err:
            raise self._read_failed(step, err, "reading it failed") from None
        nnx.update(model, restored[_MODEL])
        if optimizer is not None:
            nnx.update(optimizer, restored[_OPTIMIZER])
        if reference is not None:
            nnx.update(reference, restored[_REFERENCE])
        log.info("Restored checkpoint %s", path)
        return dict(restored[_EXTRA])

    def read_extra(self, step: int | None = None) -> dict[str, Any]:
        """The `extra` dict of a checkpoint without touching any array (e.g. to read its config)."""
        step = self._resolve_step(step)
        drop_abandoned_read_reports(self.step_dir(step))
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()})
            )
        except Exception as err:
            raise self._read_failed(step, err, "its extra/ JSON is unreadable") from None
        return dict(restored[_EXTRA])

    def export_best_hf(
        self,
        model: nnx.Module,
        path: str | os.PathLike,
        tokenizer: Any = None,
        source: str | None = None,
        eos_ids: Sequence[int] = (),
    ) -> int | None:
        """Load the best checkpoint's parameters into `model` and export it in HF format (with
        `tokenizer`'s files, if given, and `source`'s generation metadata and `eos_ids`; see
        `export_hf`).

        `model` is overwritten, so call this at the end of a run (after the final export).
        Returns the exported step, or None when there is no checkpoint.
        """
        step = self.best_step()
        if step is None:
            return None
        self.wait()
        self.restore(model, step=step)
        export_hf(model, path, tokenizer, source, eos_ids=eos_ids)
        return step

    # ---------------------------------------------------------------------------------- lifecycle

    def wait(self) -> None:
        """Block until background writes have committed (CheckpointError if one failed)."""
        with self._writing():
            self._manager.wait_until_finished()

    @contextlib.contextmanager
    def _writing(self):
        """A failed write (a full disk, a folder made read-only) as one CheckpointError: the
        save that failed may be this one or the previous one, still committing in the
        background; the checkpoints committed before it are whole either way."""
        global _write_failed
        try:
            yield
        except Exception as err:  # orbax re-raises its writer threads' errors here
            _write_failed = True
            # The writes orbax had not started yet are coroutines nobody will await: Python warns
            # of each when it is collected, often at exit, after the message that matters.
            warnings.filterwarnings(
                "ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning
            )
            cause = next((c for c in _WRITE_FAILURES if c in str(err)), None)
            raise CheckpointError(
                f"Writing a checkpoint into {self.directory} failed: "
                f"{cause + ' (' if cause else '('}{_first_line(err)}); "
                "the checkpoints committed there before it are intact, and the same command "
                "resumes from the last of them once the folder can be written again"
            ) from None

    def close(self) -> None:
        """Finish pending writes and release orbax's threads."""
        paths.untrack(self)
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- helpers

    def _resolve_step(self, step: int | None) -> int:
        self.wait()  # a save still in flight must be committed before it can be read
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"No checkpoint to restore in {self.directory}.")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"No checkpoint for step {step} in {self.directory}; saved steps: {steps}."
            )
        return step

    def _check_matches(self, step: int, targets: dict[str, Any]) -> None:
        """Compare saved tree paths/shapes/dtypes with the live objects before reading any data."""
        missing = [
            name for name in targets if not (epath.Path(self.step_dir(step)) / name).is_dir()
        ]
        if missing == ["reference"] and "reference" not in self._saved_items(step):
            raise CheckpointError(  # (saved without one: not damaged)
                f"Checkpoint {self.step_dir(step)} holds no reference model (it was saved by a "
                "run that did not sync its reference to the policy)"
            )
        if missing == ["optimizer"] and "optimizer" not in self._saved_items(step):
            raise CheckpointError(  # (saved with optimizer=None: not damaged)
                f"Checkpoint {self.step_dir(step)} holds no optimizer state (it was saved with "
                "the model alone): restore the model alone, or start the optimizer afresh"
            )
        if missing:
            raise self._damaged(step, f"it has no {', '.join(m + '/' for m in missing)} item")
        try:
            saved = self._manager.item_metadata(step)
        except Exception as err:
            drop_abandoned_read_reports(self.step_dir(step))
            raise self._read_failed(step, err, "its metadata is unreadable") from None
        for name, tree in targets.items():
            meta = saved[name]
            if meta is None:
                raise self._damaged(step, f"its {name}/ metadata is missing")
            have = _shapes(getattr(meta, "tree", meta))
            want = _shapes(tree)
            diffs = [
                f"{k}: saved {have.get(k, 'absent')}, model {want.get(k, 'absent')}"
                for k in sorted(set(have) | set(want))
                if have.get(k) != want.get(k) and not _widened(name, have.get(k), want.get(k))
            ]
            if diffs:
                shown = "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")
                raise CheckpointError(
                    f"Checkpoint {self.step_dir(step)} does not fit the {name} being restored "
                    f"({len(diffs)} mismatches: {shown}). Use the config the checkpoint was "
                    f"saved with, or a different workdir."
                )

    def _saved_items(self, step: int) -> set[str]:
        """The items orbax recorded saving at `step` (its `_CHECKPOINT_METADATA`), or every
        possible one when that file cannot be read (a missing item is then damage)."""
        try:
            text = (epath.Path(self.step_dir(step)) / "_CHECKPOINT_METADATA").read_text()
            return set(json.loads(text)["item_handlers"])
        except (OSError, ValueError, KeyError, TypeError):
            return {"model", "optimizer", "extra", "metrics", "reference"}

    def _damaged(self, step: int, reason: str) -> CheckpointError:
        return _damage(self.step_dir(step), reason, self._damaged_then(step))

    def _read_failed(self, step: int, err: BaseException, what: str) -> CheckpointError:
        return _unreadable(self.step_dir(step), err, what, self._damaged_then(step))

    def _damaged_then(self, step: int) -> str:
        """What moving damaged `step` away leaves: where a rerun starts."""
        steps = self.all_steps()
        if steps and step < steps[-1]:  # (e.g. the best step, read for the best export)
            return f"(a rerun still resumes from step {steps[-1]}, the latest checkpoint)"
        earlier = [s for s in steps if s < step]
        if earlier:
            return f"to resume from step {earlier[-1]}, the previous checkpoint"
        return "to start from scratch"


# --------------------------------------------------------------------------------------------------
# HF export and small helpers
# --------------------------------------------------------------------------------------------------


# Read failures of the storage, not the checkpoint (tensorstore / gRPC status names; a cloud
# bucket's 503, a network file system's timeout, credentials that expired) ...
_TRANSIENT_READ_FAILURES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED",
                            "RESOURCE_EXHAUSTED", "ABORTED", "UNAUTHENTICATED",
                            "Permission denied")  # fmt: skip
# ... but not a collective between the processes, which fails when another process's read of
# the same checkpoint did (its damaged files: that process says so, and so must this one).
_COLLECTIVE_FAILURES = ("Gloo", "AllGather", "AllReduce", "collective")
_WRITE_FAILURES = ("No space left on device", "Read-only file system", "Permission denied",
                   "Disk quota exceeded", "File too large")  # fmt: skip


_write_failed = False  # a CheckpointError for a failed write was raised: the run is ending


def _leave_failed_writes_to_checkpoint_error() -> None:
    """orbax logs a failed write from each of its writer threads, with the traceback (a full disk
    gave ~450 lines), and asyncio the writes still in flight ("Task exception was never
    retrieved"); the error reaches the main thread at the next `save` / `wait`, where it becomes
    one CheckpointError naming the folder and the cause. Those reports are dropped: error
    records of orbax (absl's logger) and of asyncio that name one of these causes, and once the
    CheckpointError is out, every such record (orbax's threads winding down as the run ends).
    Installed once."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if any(getattr(f, "_r1jax_failed_writes", False) for f in logger.filters):
            continue

        def keep(record: logging.LogRecord, name=name) -> bool:
            if record.levelno < logging.ERROR or (
                name == "absl" and "orbax" not in record.pathname
            ):
                return True
            error = record.exc_info[1] if record.exc_info else None
            text = f"{record.getMessage()} {error}"
            if name == "asyncio" and "orbax" not in text:
                return True
            return not (_write_failed or any(cause in text for cause in _WRITE_FAILURES))

        keep._r1jax_failed_writes = True
        logger.addFilter(keep)


# What asyncio logs for a failed task or future nobody awaited (which one depends on where the
# abandoned read was when its loop closed: the host's timing)
_NEVER_RETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")
_READ_DIRS: set[str] = set()  # step directories read from: their abandoned reads are not reported


def drop_abandoned_read_reports(step_dir: str | None = None) -> None:
    """Keep a failed read's one-line CheckpointError the only thing the user sees.

    orbax reads a checkpoint's arrays concurrently (tensorstore futures awaited on an asyncio loop)
    and closes that loop as soon as one read fails. The reads still in flight then finish into
    the closed loop from tensorstore's threads, which Python prints as unraisable "RuntimeError:
    Event loop is closed" tracebacks, and their failed tasks are logged by asyncio when collected
    ("Task / Future exception was never retrieved", with the whole tensorstore spec): screens of
    text after the message that matters. This drops exactly those two reports: the first from now on
    (installed once; only when raised in `call_soon_threadsafe`), the second for reads under
    `step_dir`, when given (before a read there: a failed task can be collected, and logged,
    before the read's error reaches its caller). Every other unraisable exception and asyncio
    record goes where it went before. Called before checkpoint reads, and by the launcher before
    a stage runs.
    """
    previous = sys.unraisablehook
    if not getattr(previous, "_r1jax_drops_abandoned_reads", False):

        def hook(unraisable):
            error = unraisable.exc_value
            abandoned = (
                isinstance(error, RuntimeError)
                and str(error) == "Event loop is closed"
                and any(
                    frame.name == "call_soon_threadsafe"
                    for frame in traceback.extract_tb(unraisable.exc_traceback)
                )
            )
            if not abandoned:
                previous(unraisable)

        hook._r1jax_drops_abandoned_reads = True
        sys.unraisablehook = hook

    if step_dir is not None:
        if not _READ_DIRS:  # (one filter, installed once, for every directory read)

            def not_an_abandoned_read(record: logging.LogRecord) -> bool:
                message = record.getMessage()
                return not (
                    message.startswith(_NEVER_RETRIEVED) and any(d in message for d in _READ_DIRS)
                )

            logging.getLogger("asyncio").addFilter(not_an_abandoned_read)
        _READ_DIRS.add(os.fspath(step_dir))


def export_hf(
    model: nnx.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    source: str | None = None,
    dtype: str | None = None,
    eos_ids: Sequence[int] = (),
) -> None:
    """Write `model` (and `tokenizer`'s files, if given) as a Hugging Face checkpoint folder
    (config.json + safetensors) at `path`, a local directory or a cloud URI.

    `source`: the HF folder the model was loaded from; its token ids, generation_config.json and
    weight dtype are carried over (`hf.generation_metadata`), else the tokenizer's ids are written.
    `dtype`: the tensors' dtype; default the source's, else the parameters'.
    `eos_ids`: more ids the model ends with (what it was trained to close a turn with, e.g. a
    chat template's <|im_end|> on a base whose EOS is <|endoftext|>), added to `eos_token_id` in
    config.json and generation_config.json, so transformers and vLLM stop there too.
    Every process must call this (the parameter gathers are collective); process 0 writes. A local
    folder is written beside `path` and swapped in whole (`_swapped_in`: a kill never leaves half
    an export there). A cloud folder is written to a local temporary directory first and then
    uploaded file by file, since the safetensors writer needs a local file.
    """
    from r1jax.models import hf  # lazy: keeps checkpointing importable without the HF stack

    # Read before `path` is written: it may be `source` itself.
    metadata = hf.with_eos_ids(hf.generation_metadata(source, tokenizer), eos_ids)

    def write(local: str) -> None:
        hf.save(model, local, dtype=dtype or metadata["dtype"])
        if jax.process_index() == 0:
            if tokenizer is not None:
                tokenizer.save_pretrained(local)
                from r1jax.data.tokenizer import portable_tokenizer_config

                portable_tokenizer_config(local)  # transformers 4.x reads a 5.x export too
            hf.write_generation_metadata(local, metadata)

    path = os.fspath(path)
    try:
        if not paths.is_remote(path):
            return _swapped_in(path, write)
        with tempfile.TemporaryDirectory(prefix="r1jax_hf_") as local:
            write(local)
            if jax.process_index() == 0:
                # config.json removed first and uploaded last: a kill part way leaves a folder
                # that no reader takes for a checkpoint, not the earlier export's shards mixed in
                paths.copy_dir(
                    local,
                    path,
                    last="config.json",
                    stale=lambda n: n.startswith("model") and ".safetensors" in n,
                )
    except _export_write_errors() as err:  # a full disk, a read-only folder: one line
        where = (
            "it is written to a local temporary folder first, then uploaded (the remote folder "
            "may hold part of it)"
            if paths.is_remote(path)
            else "an earlier export there is kept"
        )
        raise CheckpointError(
            f"Exporting the model to {path} failed: {_first_line(err)}; the run's checkpoints "
            f"are intact ({where}), and the same command exports again once there is room"
        ) from None


def _export_write_errors() -> tuple[type[Exception], ...]:
    """What a failed export write raises: OSError, and safetensors' own error for the weights
    (its I/O errors, "No space left on device" among them, are no OSErrors)."""
    from safetensors import SafetensorError

    return OSError, SafetensorError


def _swapped_in(path: str, write) -> None:
    """`write(folder)` into `path + ".partial"`, then that folder put in `path`'s place. An export
    killed part way (a rerun of a finished stage exports again) left a folder that loaded but
    lacked the token ids written last, or the earlier export's files mixed in; now `path` holds
    the earlier export whole until the new one is, and a rerun writes `.partial` afresh. (Between
    the two renames the earlier one is at `path + ".old"`.)"""
    import shutil

    path = os.path.realpath(path)  # (a symlinked folder: written through, the link kept)
    partial, old = path + ".partial", path + ".old"
    if jax.process_index() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)  # (every process: the gathers are collective; process 0 writes)
    except _export_write_errors():
        shutil.rmtree(partial, ignore_errors=True)  # (a full disk: give its space back)
        raise
    if jax.process_index() != 0:
        return
    if os.path.lexists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(partial, path)
    shutil.rmtree(old, ignore_errors=True)


def jax_key_to_json(key: jax.Array) -> dict[str, Any]:
    """A JAX PRNG key (typed `key<impl>` or raw uint32) -> a JSON-able dict for `extra`."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(key))
        data = jax.random.key_data(key)
        return {"impl": impl, "typed": True, "data": np.asarray(data).tolist()}
    return {"impl": None, "typed": False, "data": np.asarray(key).tolist()}


def jax_key_from_json(obj: Mapping[str, Any]) -> jax.Array:
    """Inverse of `jax_key_to_json`."""
    data = np.asarray(obj["data"], dtype=np.uint32)
    if obj["typed"]:
        return jax.random.wrap_key_data(data, impl=obj["impl"])
    return jax.numpy.asarray(data)


def _abstract(tree: Any) -> Any:
    """Live arrays -> ShapeDtypeStructs carrying their current shardings (the restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _widened(item: str, saved, live) -> bool:
    """Optimizer state saved in bfloat16 (or float16) restored as float32: Adam's moments, kept
    in the weights' dtype before r1jax kept them in float32 (the read casts them)."""
    return (
        item == _OPTIMIZER
        and saved is not None
        and live is not None
        and saved[0] == live[0]
        and saved[1] in ("bfloat16", "float16")
        and live[1] == "float32"
    )


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'a.kernel.value': (shape, dtype)} for live state or orbax metadata alike."""

    def name(path) -> str:
        return ".".join(
            str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
        )

    def shape_dtype(leaf) -> tuple[tuple[int, ...], str]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)  # orbax stores keys as their data
        return tuple(leaf.shape), str(leaf.dtype)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {name(p): shape_dtype(leaf) for p, leaf in leaves}


def _check_json(obj: Any, where: str) -> None:
    """Raise TypeError naming the first key that JSON cannot encode."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string; JSON keys must be strings.")
            _check_json(v, f"{where}[{k!r}]")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_json(v, f"{where}[{i}]")
    elif not isinstance(obj, str | int | float | bool | type(None)):
        raise TypeError(
            f"{where} is a {type(obj).__name__}, which JSON cannot store; convert it "
            f"(arrays: .tolist(); JAX keys: jax_key_to_json)."
        )


def _check_metrics_files(directory: str) -> None:
    """Raise CheckpointError naming a committed step whose metrics/ JSON (what best tracking
    ranks by) is unreadable: orbax reads every step's when the manager is made, and raised a
    bare JSONDecodeError naming no directory."""
    root = epath.Path(directory)
    if not root.exists():
        return
    for step_dir in root.iterdir():
        saved = step_dir / "metrics" / "metrics"
        if not step_dir.name.isdigit() or not saved.exists():
            continue
        try:
            json.loads(saved.read_text())
        except (ValueError, OSError) as err:
            raise _unreadable(step_dir, err, "its metrics/ JSON is unreadable", "") from None


def _unreadable(path, err: BaseException, what: str, then: str) -> CheckpointError:
    """The error for a failed read of checkpoint `path`: the storage's refusal or timeout (the
    checkpoint may be intact: "move or delete" would throw a good one away), else damage (`what`
    failed; `then`: what moving it away leaves)."""
    message = str(err)
    if any(s in message for s in _TRANSIENT_READ_FAILURES) and not any(
        c in message for c in _COLLECTIVE_FAILURES
    ):
        return CheckpointError(
            f"Checkpoint {path} could not be read ({_first_line(err)}): the storage refused or "
            "timed out, the checkpoint may be intact. Try again (check access to the bucket or "
            "file system); nothing was changed."
        )
    return _damage(path, f"{what} ({_first_line(err)})", then)


def _damage(path, reason: str, then: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint {path} is damaged: {reason}. Move or delete that directory"
        f"{' ' + then if then else ''}; no other checkpoint was touched."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    head = text[0] if text else ""
    return f"{type(err).__name__}: {head[:300]}"
