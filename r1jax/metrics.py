"""Metrics: per-step JSONL and TensorBoard logs, progress bar, end-of-run plots, compile counter.

What a run leaves in its workdir (local, or a cloud URI such as gs://bucket/run):
- `metrics.jsonl`: one JSON object per logged step, `{"step": 12, "time": 1712345678.123, ...}`.
- `tb/`: TensorBoard event files with the same scalars.
- `rl_curves.png` (the RL stage's, written with `plot_metrics`).

Notable choices:
- Only process 0 writes or prints; on other processes every method is a cheap no-op, so stages call
  them unconditionally.
- Resume keeps history consistent: steps after the resume point (logged by a run that was killed
  before its next checkpoint) are dropped from the JSONL and purged from TensorBoard, so every step
  appears once, with the numbers of the run that continued.
- Each JSONL line is flushed as it is written: a kill loses at most the line being written, and a
  torn last line is dropped on resume.
- Cloud workdirs: every workdir access goes through `r1jax.paths`. metrics.jsonl and the event
  files grow, which cloud objects cannot, so they are written to a local working copy
  (`paths.staging_dir`) and uploaded whole every `sync_secs` and at `close` (tensorboardX's own
  gs:// writer is not used: it needs google-cloud-storage and re-uploads the whole file at every
  flush). TensorBoard reads the bucket directly (`tensorboard --logdir gs://bucket/run/tb`, which
  needs TensorFlow or gcsfs installed beside it) or a `gsutil rsync` copy.
- Plots use matplotlib's object API on an Agg canvas, never pyplot, so no global backend changes.
- `CompileCounter` listens to JAX's own monitoring event for XLA backend compiles, which fires
  once per compilation with the function's name (cache hits of the persistent compilation cache
  fire it too).
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring
from tqdm.auto import tqdm

from r1jax import paths

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
_RESERVED = ("step", "time")

# The event jax._src.dispatch.BACKEND_COMPILE_EVENT (jax 0.10) records around every XLA compile.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# --------------------------------------------------------------------------------------------------
# Per-step writer
# --------------------------------------------------------------------------------------------------


def tensorboard_name(name: str) -> str:
    """A metric's TensorBoard tag: "@" spelled "_at_" ("eval/pass_at_1"). TensorBoard allows only
    letters, digits and ``_-./`` in tags, and would make "eval/pass@1" "eval/pass_1" (and
    cons@k "cons_k") silently; the JSONL keeps the names as they are."""
    return name.replace("@", "_at_")


class MetricsWriter:
    """Log scalar metrics per step to JSONL + TensorBoard, and drive a progress bar.

    Usage:
        writer = MetricsWriter(workdir, total_steps=cfg.num_steps, start_step=restored_step)
        for step in range(restored_step + 1, cfg.num_steps + 1):
            ...
            writer.write(step, {"loss": loss, "reward": reward, "accuracy": acc})
        writer.close()

    Args:
      workdir: run directory (local or a cloud URI); `metrics.jsonl` and `tb/` go here.
      total_steps: the last step of the run, for the bar's ETA (None: no total).
      start_step: the step the run resumes from (0 for a fresh run). Logged steps after it are
        removed, because this run is about to log them again.
      summary_every: print one summary line to stdout every this many steps (0 disables); the
        bar itself is drawn on stderr.
      postfix_keys: metrics shown next to the bar, when present.
      desc: a label in front of the bar, e.g. the stage name.
      tensorboard: also write TensorBoard event files.
      sync_secs: cloud workdirs only: upload the growing files at most this often (and at close).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        summary_every: int = 10,
        postfix_keys: Iterable[str] = ("reward", "accuracy"),
        desc: str | None = None,
        tensorboard: bool = True,
        sync_secs: float = 30.0,
        progress: bool = True,
    ):
        self.active = jax.process_index() == 0
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)  # the workdir's copy
        self.total_steps = total_steps
        self.summary_every = summary_every
        self.postfix_keys = tuple(postfix_keys)
        self._file = self._tb = self._bar = None
        if not self.active:
            return
        paths.makedirs(workdir)
        self._staged = paths.Staged(workdir, (METRICS_FILE, TENSORBOARD_DIR), every_secs=sync_secs)
        local = self._staged.local_path(METRICS_FILE)
        _drop_steps_after(self.path, start_step, working_copy=local)
        self._staged.sync(force=True)  # the workdir's history now matches what this run continues
        self._file = open(local, "a", encoding="utf-8")  # local working copy; closed in close()
        if tensorboard:
            self._tb = _EventFile(
                self._staged.local_path(TENSORBOARD_DIR),
                # TensorBoard hides earlier events at steps >= purge_step: the killed run's tail
                # (all of it for a run that starts from scratch).
                purge_step=start_step + 1 if start_step > 0 else 0,
                # Names are events.out.tfevents.<seconds>.<host><suffix>: a resume in the same
                # second would overwrite the file it continues without a suffix of its own, and
                # TensorBoard reads a folder's files in name order (padded: "10" after "4").
                suffix=f".from_step_{start_step:012d}",
            )
        self._bar = tqdm(  # progress=False: no bar (summary lines still print every N steps)
            total=total_steps,
            initial=start_step,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            mininterval=bar_interval(),
            maxinterval=max(10.0, bar_interval()),  # (tqdm's own thread redraws at this interval)
            disable=not progress,
        )
        self._last_summary = (start_step, time.time())
        self._last_line_t = 0.0  # when `log` last printed a line
        paths.track_open(self)  # closed even if the stage using it fails (stages.common)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Record scalar `metrics` for `step` (Python numbers, numpy or 0-d JAX arrays).

        All values are fetched from the device in one transfer. Returns them as floats
        (an empty dict on processes other than 0).
        """
        if not self.active:
            return {}
        clash = [k for k in _RESERVED if k in metrics]
        if clash:
            raise ValueError(f"Metric names {clash} are reserved by the JSONL format; rename them.")
        values = _to_floats(metrics)
        record = {"step": int(step), "time": round(time.time(), 3), **values}
        # NaN/inf are not JSON (RFC 8259): written as null, read back as NaN by read_metrics.
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.write(int(step), values)
        self._bar.update(int(step) - self._bar.n)
        shown = {k: f"{values[k]:.4g}" for k in self.postfix_keys if k in values}
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        if self.summary_every and step % self.summary_every == 0:
            self.log(self._summary(int(step), values))
        if self._staged.due():
            self._sync()
        return values

    def log(self, message: str) -> None:
        """Print a line to stdout above the progress bar (process 0 only). In a log file (stderr
        no terminal) the line is printed as it is: tqdm's way of keeping the bar below it, an
        erase and a redraw of the bar, would put a copy of the bar before every line."""
        if not self.active:
            return
        if bar_interval() < 30.0:
            self._bar.write(message)
            return
        bar = self._bar
        if not bar.disable and bar.last_print_t > self._last_line_t and _one_file():
            sys.stderr.write("\n")  # (the bar was drawn since, without a newline, on this file)
        print(message, flush=True)
        self._last_line_t = time.time()

    def close(self) -> None:
        """Flush and close files and the bar, and upload them to a cloud workdir. Safe to call
        twice."""
        paths.untrack(self)
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        was_active, self.active = self.active, False
        self._file = self._tb = self._bar = None
        if was_active:
            self._staged.sync(force=True)  # a failure here is raised: the files must get there

    def flush(self) -> None:
        """Bring the workdir's metrics up to date now (after a checkpoint is saved, so a run
        resumed from it on another machine finds every row up to its step)."""
        if self.active:
            self._sync()

    def _sync(self) -> None:
        """Upload the working copies to a cloud workdir; a failure mid-run is only logged (the
        next sync retries it) so that a network hiccup does not end a training run."""
        try:
            self._staged.sync(force=True)
        except Exception as e:
            log.warning("could not upload metrics to %s (retrying later): %s", self.path, e)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _summary(self, step: int, values: dict[str, float]) -> str:
        last_step, last_time = self._last_summary
        now = time.time()
        self._last_summary = (step, now)
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {step}{total}"]
        parts += [f"{k} {v:.4g}" for k, v in values.items()]
        if step > last_step:
            parts.append(f"{(now - last_time) / (step - last_step):.3g} s/step")
        return " | ".join(parts)


class _EventFile:
    """One TensorBoard event file, written as `write` is called. (tensorboardX's SummaryWriter
    hands events to a thread through a queue, and its flush() does not wait for the queue: a
    step's scalars could be in metrics.jsonl and its checkpoint saved, yet not in the file.)"""

    def __init__(self, logdir: str, purge_step: int, suffix: str):
        from tensorboardX.event_file_writer import EventsWriter  # heavy import, only here
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        os.makedirs(logdir, exist_ok=True)
        self._Event, self._Summary = Event, Summary
        self._file = EventsWriter(os.path.join(logdir, "events"), suffix)
        start = SessionLog(status=SessionLog.START)
        self._file.write_event(Event(step=purge_step, wall_time=time.time(), session_log=start))
        self._file.flush()

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Every scalar of `step` (NaN and infinities too), on disk when this returns."""
        now = time.time()
        for name, value in values.items():
            summary = self._Summary(
                value=[self._Summary.Value(tag=tensorboard_name(name), simple_value=value)]
            )
            self._file.write_event(self._Event(step=step, wall_time=now, summary=summary))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _one_file() -> bool:
    """Whether stdout and stderr are the same file (`> log 2>&1`)."""
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def bar_interval() -> float:
    """Seconds between progress-bar redraws: tqdm's 0.1 on a terminal; 30 when stderr is a file
    (nohup, Slurm, `tpu_pod.sh --detach`), which keeps every redraw, up to ten a second on one
    endless line."""
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget, not log lines
        return 0.1
    try:
        return 0.1 if sys.stderr.isatty() else 30.0
    except (AttributeError, ValueError):  # replaced or closed
        return 30.0


def logged_at(jsonl_path: str | os.PathLike, step: int) -> dict[str, Any]:
    """The metrics a run logged at `step`, without its step and time ({} when none): what a
    stage rerun after its last checkpoint (killed during its export) returns again."""
    records = [r for r in read_metrics(jsonl_path) if r.get("step") == step]
    return {k: v for k, v in records[-1].items() if k not in ("step", "time")} if records else {}


def read_metrics(jsonl_path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl (local or cloud), in file order: a torn last line
    (a kill mid-write) is skipped, and so, with a warning, is a damaged line before others (the
    rows after it were all dropped, and for good once a resume rewrote the file)."""
    records = []
    if not paths.exists(jsonl_path):
        return records
    lines = paths.read_text(jsonl_path).splitlines(keepends=True)
    for i, line in enumerate(lines):
        try:
            records.append(nan_from_null(json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and line.strip():
                log.warning("%s, line %d: not a JSON record, skipped", jsonl_path, i + 1)
    return records


def _drop_steps_after(path: str, step: int, working_copy: str) -> None:
    """Make `working_copy` hold the records of `path` with step <= `step` (none for a run that
    starts from scratch at step 0: whatever an earlier attempt logged, even at step 0, is redone);
    atomic, so a kill here loses nothing.

    `working_copy` is `path` itself for a local workdir. For a cloud workdir it is the local copy
    this run appends to; one left by an earlier run of the same workdir on this machine may hold
    lines logged after the last upload, and is used when it reaches further.
    """

    def kept(r):
        return step > 0 and r.get("step", 0) <= step

    records = read_metrics(path)
    keep = [r for r in records if kept(r)]
    if working_copy == path:
        if not os.path.exists(path) or (len(keep) == len(records) and _ends_cleanly(path)):
            return
    else:
        staged = [r for r in read_metrics(working_copy) if kept(r)]

        def stamps(rows):  # (a row's identity: values may be NaN, unequal to themselves)
            return [(r.get("step"), r.get("time")) for r in rows]

        # This machine's copy when it is the same run's and reaches further (a copy from another
        # history, e.g. before the run was wiped and restarted elsewhere, would replace rows).
        # With no row kept in the workdir there is nothing to tell histories by: the copy wins,
        # as the same run killed before its first upload needs.
        if len(staged) > len(keep) and stamps(staged[: len(keep)]) == stamps(keep):
            keep = staged
    paths.write_text(
        working_copy, "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in keep)
    )


def json_safe(obj: Any) -> Any:
    """`obj` (dicts, lists, numbers, strings) with every non-finite float as None: NaN and
    Infinity are not JSON (RFC 8259; jq and JavaScript refuse them). `nan_from_null` reverses it
    for files whose writers put no None of their own."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def nan_from_null(obj: Any) -> Any:
    """What `json.loads` read of a `json_safe` object, with every null as NaN."""
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {k: nan_from_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_from_null(v) for v in obj]
    return obj


def _ends_cleanly(path: str) -> bool:
    """Whether a local file is empty or ends with a newline."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    names = list(metrics)
    # One device->host transfer for all; a list, because a dict pytree would sort the names.
    host = jax.device_get([metrics[name] for name in names])
    out = {}
    for name, value in zip(names, host, strict=True):
        if not isinstance(name, str):
            raise ValueError(f"Metric name {name!r} is not a string")
        arr = np.asarray(value)
        if arr.size != 1:
            raise ValueError(
                f"Metric {name!r} has shape {arr.shape}; log scalars (reduce it first)."
            )
        # (numbers only: float("1.5") of a string would pass, float(None) named no metric)
        if not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == bool):  # (bfloat16 too)
            raise ValueError(f"Metric {name!r} is {value!r}, not a number")
        out[name] = float(arr.reshape(()))
    return out


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def plot_metrics(
    jsonl_path: str | os.PathLike,
    out_png: str | os.PathLike,
    keys: Iterable[str] = ("reward", "completions/mean_length", "kl"),
) -> list[str]:
    """Plot each of `keys` against step from a metrics.jsonl into one PNG (one panel per key).

    Keys that never appear are skipped; NaN points are left out. Each panel shows the raw values
    faintly and a moving average (window: 1/20 of the points) on top, since RL curves are noisy.

    Returns:
      The keys plotted; when none is present nothing is written and the list is empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(jsonl_path)
    series = {}
    for key in keys:
        points = [
            (r["step"], r[key])
            for r in records
            if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        if points:
            series[key] = np.asarray(points, dtype=np.float64)
    if not series:
        log.info("plot_metrics: none of %s in %s; no plot written.", list(keys), jsonl_path)
        return []
    fig = Figure(figsize=(7, 2.4 * len(series)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, points) in zip(axes, series.items(), strict=True):
        steps, values = points[:, 0], points[:, 1]
        ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1)
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="tab:blue", linewidth=2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    paths.write_bytes(out_png, png.getvalue())  # local or cloud
    return list(series)


# --------------------------------------------------------------------------------------------------
# Compile counter
# --------------------------------------------------------------------------------------------------


class CompileCounter:
    """Count XLA compilations while active, logging each with the compiled function's name.

    Usage:
        with CompileCounter() as compiles:
            run_stage(...)
        print(f"{compiles.count} compilations", compiles.by_name())

        with CompileCounter(log_each=False) as steady:   # bench: the hot loop must not recompile
            for _ in range(n):
                train_step(...)
        assert steady.count == 0, steady.names

    Eager JAX ops compile too (one per new op/shape), so count around the code you care about.

    Args:
      log_each: log every compile at INFO on logger `r1jax.metrics` (process 0 only).
    """

    def __init__(self, log_each: bool = True):
        self.log_each = log_each and jax.process_index() == 0
        self.names: list[str] = []
        self.seconds: list[float] = []
        self._lock = threading.Lock()  # compiles can happen on several threads
        self._active = False

    @property
    def count(self) -> int:
        """Number of XLA compilations seen so far."""
        return len(self.names)

    def by_name(self) -> dict[str, int]:
        """Compilations per function name, e.g. {'jit(train_step)': 1}."""
        return dict(collections.Counter(self.names))

    def start(self) -> CompileCounter:
        """Begin listening (idempotent)."""
        if not self._active:
            monitoring.register_event_duration_secs_listener(self._on_event)
            self._active = True
        return self

    def stop(self) -> None:
        """Stop listening (idempotent); counts are kept."""
        if self._active:
            monitoring.unregister_event_duration_listener(self._on_event)
            self._active = False

    def __enter__(self) -> CompileCounter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if event != BACKEND_COMPILE_EVENT:
            return
        name = str(kwargs.get("fun_name", "<unknown>"))
        with self._lock:
            self.names.append(name)
            self.seconds.append(duration)
            n = len(self.names)
        if self.log_each:
            log.info("XLA compile #%d: %s (%.2f s)", n, name, duration)
