"""Weighted composition of rewards, scored in a process pool, callable from inside ``jax.jit``.

Owns the reward registry (``REWARDS``, ``register_reward``), ``build_reward_fn`` (specs ->
``RewardFunction``), ``RewardOutput``, and ``HostRewardBridge`` (the ``jax.pure_callback`` path).

- **Specs.** A config lists rewards as ``(name, weight, kwargs)`` tuples (or dicts with those
  keys, or bare names), e.g. ``[("accuracy", 1.0, {}), ("format", 0.5, {"prefix": "<think>"})]``.
  ``kwargs`` are bound to the reward function; dataset columns arrive per call. A name may be
  replaced by any callable with TRL's signature ``fn(completions, **columns) -> list[float |
  None]``; it runs in the trainer process unless ``parallel=True`` is asked for. A learned reward
  model (``reward_model.RewardModel``) is such a callable for host-side scoring, but never goes
  through ``HostRewardBridge``: it runs jitted programs itself, which must not start inside the
  rollout's host callback (GRPO scores it between rollout and update instead).
- **Combination.** ``total[b] = sum_r weight_r * value_r[b]`` over the rewards that are not
  ``None`` for sample ``b`` (TRL's convention: ``None`` = not applicable). Every reward's own
  values are kept in ``per_reward`` ([R, B], NaN for ``None``) for metrics.
- **Parallelism.** Rule rewards are pure Python (sympy, regexes, waiting on sandboxes), so they
  run in a ``ProcessPoolExecutor``: the batch is cut into contiguous chunks (several per worker,
  so one slow chunk does not idle the rest), each chunk scored by every pooled reward. Workers
  start with ``forkserver``, never ``fork``: forking a process that runs JAX's threads can
  deadlock. The fork server preloads ``r1jax.rewards``, so workers start without re-importing.
  Worker main threads also keep math-verify's signal-based timeouts working. A worker that dies
  (e.g. killed by the OOM killer) breaks the pool; it is rebuilt and the chunk retried once,
  after which that chunk's values are NaN, its samples' ``total`` is NaN ("unscored": GRPO gives
  them advantage 0 and leaves them out of their group's statistics) and an error is logged (only
  when the rebuilt pool cannot run even a trivial task is the pool itself broken, and that
  raises). Exceptions raised by a reward (a missing column, a bad option) propagate unchanged:
  those are configuration errors (from inside a jitted program, `HostRewardBridge` holds them
  until `raise_error`).
- **Deadline.** A worker ends itself once the chunk it is scoring has run ``timeout_s`` seconds
  per sample of the chunk (counted from when the worker starts it, so a queue of chunks does not
  count): a reward that never returns (a custom reward waiting on a dead service, C code no
  signal interrupts) then costs its chunk, retried and unscored as above, not the run. It names
  the reward that was running, and its chunk is retried alone while the chunks its pool took
  with it are retried together. The watchdog is a Python thread; for C code that holds the GIL
  (a regex backtracking for ever) faulthandler's timer ends the worker ``_BACKSTOP_S`` later.
  Rewards scored in the calling process have no deadline.
- **Inside jit.** ``HostRewardBridge`` wraps a ``RewardFunction`` in ``jax.pure_callback``: token
  ids [B, T] and lengths [B] go to the host, are decoded with the tokenizer's batch decode, scored
  with the row's dataset columns (looked up by row id), and come back as [B] and [R, B] float32.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import faulthandler
import logging
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from r1jax.rewards.accuracy import accuracy_reward
from r1jax.rewards.code import code_reward, normalize_tests
from r1jax.rewards.common import completion_texts, is_per_row, python_list
from r1jax.rewards.format import format_reward, tag_count_reward
from r1jax.rewards.language import language_consistency_reward
from r1jax.rewards.sandbox import SandboxConfig
from r1jax.rewards.shaping import (
    cosine_scaled_reward,
    overlong_penalty_reward,
    repetition_penalty_reward,
)
from r1jax.rewards.task import task_reward

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list]

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "language_consistency": language_consistency_reward,
    "code": code_reward,
    "task": task_reward,
    "cosine_scaled": cosine_scaled_reward,
    "repetition_penalty": repetition_penalty_reward,
    "overlong_penalty": overlong_penalty_reward,
}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make ``fn`` (TRL signature, defined at module level so workers can import it) usable by
    name in specs."""
    if name in REWARDS and REWARDS[name] is not fn:
        raise ValueError(f"a different reward is already registered as {name!r}")
    REWARDS[name] = fn


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One entry of the composition.

    Attributes:
      name: registry name, or a label for ``fn``.
      weight: multiplier in the total (0 keeps the values for metrics only).
      kwargs: options bound to the reward function. They act as defaults: a dataset column of
        the same name (e.g. a per-row ``language``) overrides them.
      fn: the reward function; None = ``REWARDS[name]``.
      parallel: run in the process pool. None = True for registry rewards, False for a custom
        ``fn`` (which may hold device state or be unpicklable).
    """

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fn: RewardFn | None = None
    parallel: bool | None = None

    def resolved(self) -> RewardSpec:
        fn = self.fn
        if fn is None:
            if self.name not in REWARDS:
                raise ValueError(
                    f"unknown reward {self.name!r}; registered rewards are {sorted(REWARDS)} "
                    "(or pass a callable with the TRL reward signature)"
                )
            fn = REWARDS[self.name]
        parallel = self.parallel if self.parallel is not None else self.fn is None
        weight = float(self.weight)
        if not np.isfinite(weight):
            raise ValueError(f"reward {self.name!r}: weight must be finite, got {self.weight}")
        return dataclasses.replace(
            self, fn=fn, parallel=parallel, weight=weight, kwargs=dict(self.kwargs)
        )


def as_dict(value: Any) -> dict:
    """A mapping or an ``ml_collections.ConfigDict`` (which is not a ``Mapping``) -> plain dict."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"expected a dict of options, got {type(value).__name__}: {value!r:.80}")


def _is_dict_like(value: Any) -> bool:
    return isinstance(value, Mapping) or hasattr(value, "to_dict")


def parse_spec(spec: Any) -> RewardSpec:
    """One config entry -> ``RewardSpec``.

    Accepts ``RewardSpec``; ``"name"``; ``(name_or_fn, weight)``; ``(name_or_fn, weight,
    kwargs)``; a dict (or ConfigDict) with keys ``name`` (or ``fn``), ``weight``, ``kwargs``,
    ``parallel``.
    """
    if isinstance(spec, RewardSpec):
        return spec.resolved()
    if isinstance(spec, str):
        return RewardSpec(spec).resolved()
    if _is_dict_like(spec):
        fields = as_dict(spec)
        unknown = set(fields) - {"name", "weight", "kwargs", "fn", "parallel"}
        if unknown:
            raise ValueError(f"reward spec {fields!r}: unknown keys {sorted(unknown)}")
        if "name" not in fields and callable(fields.get("fn")):
            fields["name"] = getattr(fields["fn"], "__name__", "custom")
        if "kwargs" in fields:
            fields["kwargs"] = as_dict(fields["kwargs"])
        return RewardSpec(**fields).resolved()
    if isinstance(spec, Sequence) and 1 <= len(spec) <= 3:
        head, *rest = spec
        weight = rest[0] if rest else 1.0
        kwargs = as_dict(rest[1]) if len(rest) > 1 else {}
        if callable(head):
            name = getattr(head, "__name__", "custom")
            return RewardSpec(name, weight, kwargs, fn=head).resolved()
        return RewardSpec(str(head), weight, kwargs).resolved()
    raise ValueError(
        f"cannot read reward spec {spec!r}; use (name, weight, kwargs), "
        "e.g. ('accuracy', 1.0, {})"
    )


@dataclasses.dataclass(frozen=True)
class RewardOutput:
    """Scores for one batch.

    Attributes:
      total: [B] float32, the weighted sum (rewards that are None for a sample are skipped); NaN
        for a sample that could not be scored (its reward worker died twice).
      per_reward: [R, B] float32, each reward's raw (unweighted) values; NaN where None.
      names: [R] reward names, in spec order.
      weights: [R] weights, in spec order.
    """

    total: np.ndarray
    per_reward: np.ndarray
    names: tuple[str, ...]
    weights: tuple[float, ...]

    def metrics(self) -> dict[str, float]:
        """Scalar summaries: ``reward`` (mean total), ``rewards/<name>`` (mean over applicable
        samples) and ``rewards/<name>/none_frac`` (share of samples where it was None)."""
        scored = self.total[~np.isnan(self.total)]
        out = {"reward": float(np.mean(scored)) if scored.size else float("nan")}
        for name, values in zip(self.names, self.per_reward, strict=True):
            valid = ~np.isnan(values)
            out[f"rewards/{name}"] = float(values[valid].mean()) if valid.any() else float("nan")
            out[f"rewards/{name}/none_frac"] = float(1.0 - valid.mean()) if values.size else 0.0
        return out


def _to_row(values: Any, n: int, name: str) -> np.ndarray:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


# In a pool worker: (deadline, reward name, first sample, end sample, seconds allowed) of the chunk
# it is scoring, or None; the worker's watchdog thread reads it (one assignment, so never torn).
_SCORING: list[tuple[float, str, int, int, float] | None] = [None]
_PAST_DEADLINE = 75  # a worker's exit status when its watchdog ended it
# A reward stuck in C code that holds the GIL (a regex backtracking for ever) starves the Python
# watchdog: faulthandler's timer, a C thread, ends the worker this long after the deadline anyway
# (printing where it was stuck on stderr).
_BACKSTOP_S = 10.0


def _score(
    specs: Sequence[RewardSpec],
    completions: list,
    columns: dict,
    *,
    deadline_s: float = 0.0,
    first: int = 0,
    backstop_s: float = _BACKSTOP_S,
) -> np.ndarray:
    """[R, b] float64 values of ``specs`` on one chunk (runs in a pool worker or in-process).

    ``deadline_s`` > 0 (pool workers only): the worker's watchdog ends it once the chunk (samples
    ``first`` ... ``first + b - 1`` of the batch) has run that long; faulthandler ends it
    ``backstop_s`` later if the watchdog cannot run (C code holding the GIL).
    """
    until = time.monotonic() + deadline_s
    rows = []
    if deadline_s > 0:  # (its clock takes at most ~9e9 s: a deadline past years is none)
        faulthandler.dump_traceback_later(min(deadline_s + backstop_s, 1e8), exit=True)
    try:
        for s in specs:
            if deadline_s > 0:
                _SCORING[0] = (until, s.name, first, first + len(completions), deadline_s)
            rows.append(
                _to_row(s.fn(completions, **{**s.kwargs, **columns}), len(completions), s.name)
            )
    finally:
        _SCORING[0] = None
        if deadline_s > 0:
            faulthandler.cancel_dump_traceback_later()
    return np.stack(rows) if rows else np.zeros((0, len(completions)))


def _slice_columns(columns: Mapping[str, Any], n: int, start: int, stop: int) -> dict:
    """Per-row columns (sequences of length n: lists, numpy, pyarrow or pandas columns) are
    sliced; anything else is passed whole."""
    return {
        key: python_list(value)[start:stop] if is_per_row(value, n) else value
        for key, value in columns.items()
    }


def _init_worker(reports=None) -> None:
    """Pool worker initializer: end this worker when the trainer that started it dies, or (with
    ``reports``, a SimpleQueue to say why on) when the chunk it scores passes its deadline.

    Workers wait on a task queue they also hold the writing end of, so a SIGKILLed trainer (an
    OOM kill, `kill -9`) would leave them, and the fork server their copies of its lifeline keep
    alive, running forever. A daemon thread waits on the parent's sentinel instead. Another
    watches the deadline: the main thread may be stuck anywhere (C code, a socket), and only
    ending the process frees it.
    """
    import signal
    import threading

    # Ctrl-C in a terminal reaches the whole process group: the trainer decides when to stop
    # (after its step's checkpoint), and a worker that died of it broke the pool mid-step
    # (tracebacks, "a reward worker died", a rebuilt pool). SIGTERM stays: the executor ends
    # the workers of a broken pool with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()

    def watch_parent():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    def watch_deadline():
        while True:
            time.sleep(0.25)
            scoring = _SCORING[0]
            if scoring is not None and time.monotonic() > scoring[0]:
                _, name, first, end, allowed = scoring
                with contextlib.suppress(Exception):  # (the reason is a courtesy; the exit is not)
                    reports.put(
                        (
                            first,
                            end,
                            f"reward {name!r} was still scoring samples [{first}, {end}) after "
                            f"{allowed:g} s (its deadline: timeout_s per sample, or a code "
                            "row's tests x sandbox.timeout_s): its worker ended",
                        )
                    )
                # (put released the GIL: a chunk that finished meanwhile may be sending its
                # result, and an exit halfway through that would leave the pool waiting for ever)
                if _SCORING[0] is scoring:
                    os._exit(_PAST_DEADLINE)

    if parent is not None:
        threading.Thread(target=watch_parent, name="r1jax-exit-with-parent", daemon=True).start()
    if reports is not None:
        threading.Thread(target=watch_deadline, name="r1jax-reward-deadline", daemon=True).start()


# A pool worker's deadline, in seconds per sample of its chunk: past any sane rule reward (the code
# reward's hanging tests stop at its sandbox's hang_budget_s, 30 s by default; math-verify times
# itself out in seconds), well short of a stalled run.
DEFAULT_TIMEOUT_S = 120.0


def _test_seconds(spec: RewardSpec) -> float:
    """Seconds one test may take under `spec`'s sandbox, for the code reward (else 0)."""
    if spec.fn is not code_reward:
        return 0.0
    sandbox = spec.kwargs.get("sandbox") or {}
    seconds = sandbox.get("timeout_s") if isinstance(sandbox, Mapping) else None
    return float(getattr(sandbox, "timeout_s", seconds) or SandboxConfig.timeout_s)


def _test_count(tests: Any) -> int:
    """How many tests a row's `tests` value holds (0 when unreadable: not run)."""
    try:
        return len(normalize_tests(tests))
    except (ValueError, TypeError):
        return 0


def _default_workers() -> int:
    # (the cores this process may use; macOS and Windows have no affinity call: all of them)
    cores = (
        os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    )
    return min(len(cores), 16)


class RewardFunction:
    """``fn(completions, **columns) -> RewardOutput``; see the module docstring.

    Use as a context manager, or call ``close()``, to shut the worker pool down.
    """

    def __init__(
        self,
        specs: Sequence[Any] | Mapping[str, Any],
        *,
        num_workers: int | None = None,
        chunks_per_worker: int = 4,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ):
        if _is_dict_like(specs):  # {name: weight} or {name: {"weight": …, "kwargs": …}}
            specs = [
                {"name": k, **as_dict(v)} if _is_dict_like(v) else (k, v)
                for k, v in as_dict(specs).items()
            ]
        self.specs = tuple(parse_spec(s) for s in specs)
        if not self.specs:
            raise ValueError("build_reward_fn needs at least one reward spec")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique (they label metrics), got {names}")
        self.num_workers = _default_workers() if num_workers is None else int(num_workers)
        if self.num_workers < 0 or chunks_per_worker < 1:
            raise ValueError("num_workers must be >= 0 and chunks_per_worker >= 1")
        self.chunks_per_worker = chunks_per_worker
        self.timeout_s = float(timeout_s or 0.0)
        if not 0 <= self.timeout_s < float("inf"):
            raise ValueError(
                f"timeout_s (seconds per sample) must be >= 0 (0 = no deadline), got {timeout_s}"
            )
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._reports: Any = None  # the pool's workers' SimpleQueue of why one ended itself
        self._backstop_s = _BACKSTOP_S
        self._stopped = False  # closed without waiting

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(s.weight for s in self.specs)

    # --- pool lifecycle ---

    def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._stopped = False  # (a new call after a close)
            context = multiprocessing.get_context("forkserver")
            # Import the reward modules once in the fork server (a no-op once it is running), so
            # each worker starts as a cheap fork with sympy & co. already loaded.
            context.set_forkserver_preload(["r1jax.rewards"])
            # (a queue per pool: a worker of a broken pool ended mid-put may hold its lock)
            self._reports = context.SimpleQueue()
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(self._reports,),
            )
        return self._pool

    def _why_workers_ended(self) -> tuple[str, set[tuple[int, int]]]:
        """What the current pool's workers said before ending themselves past their deadlines
        (": ..." or ""), and the chunks ([a, b) sample spans) they named."""
        said = []
        with contextlib.suppress(Exception):
            while self._reports is not None and not self._reports.empty():
                said.append(self._reports.get())
        text = ": " + "; ".join(m for _, _, m in said) if said else ""
        return text, {(a, b) for a, b, _ in said}

    def close(self, wait: bool = True) -> None:
        """Shut the worker pool down (idempotent). `wait=False` (a run stopping on an error or
        Ctrl-C, which the workers ignore) ends the workers at once instead of letting them
        finish the chunks they are scoring."""
        if self._pool is not None and not wait:
            self._stopped = True  # (a call still scoring must not rebuild the pool)
            for worker in list(getattr(self._pool, "_processes", {}).values()):
                with contextlib.suppress(OSError, ValueError):
                    worker.terminate()
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def warmup(self, timeout_s: float = 60.0) -> None:
        """Start every worker (first-call latency) and return once each has run its initializer.

        One round of trivial tasks is not enough: a worker that started first can take them all
        while another is still starting, and that one dies of a Ctrl-C until its initializer runs.
        """
        if self.num_workers > 0 and any(s.parallel for s in self.specs):
            pool = self._get_pool()
            seen: set[int] = set()
            deadline = time.monotonic() + timeout_s
            while len(seen) < self.num_workers and time.monotonic() < deadline:
                futures = [pool.submit(os.getpid) for _ in range(self.num_workers)]
                seen.update(f.result() for f in futures)

    # --- scoring ---

    def __call__(self, completions: Sequence[Any], **columns: Any) -> RewardOutput:
        """Score a batch.

        Args:
          completions: [B] strings or chat-message lists.
          **columns: dataset columns, each a [B] list (or a scalar for all rows).
        Returns:
          ``RewardOutput`` with ``total`` [B] and ``per_reward`` [R, B].
        """
        texts = completion_texts(completions)
        n = len(texts)
        self._why_workers_ended()  # (a report a finished chunk left behind names no one now)
        pooled = [s for s in self.specs if s.parallel and self.num_workers > 0]
        local = [s for s in self.specs if not (s.parallel and self.num_workers > 0)]
        values: dict[str, np.ndarray] = {}
        pending = self._submit(pooled, texts, columns) if pooled and n else []
        unscored = np.zeros(n, bool)
        # In-process rewards (e.g. a learned model on device) overlap with the pool's work. They
        # get the completions as given (chat messages stay messages); workers get plain text.
        for spec, row in zip(local, _score(local, list(completions), columns), strict=True):
            values[spec.name] = row
        if pooled:
            gathered, unscored = self._gather(pooled, pending, texts, columns, n)
            for spec, row in zip(pooled, gathered, strict=True):
                values[spec.name] = row
        per_reward = (
            np.stack([values[s.name] for s in self.specs]) if n else np.zeros((len(self.specs), 0))
        )
        weights = np.array(self.weights)[:, None]
        total = np.where(unscored, np.nan, np.nansum(weights * per_reward, axis=0))
        all_none = np.isnan(per_reward).all(axis=0) & ~unscored
        if all_none.any():
            logger.warning(
                "%d of %d samples had no applicable reward; their total is 0",
                int(all_none.sum()),
                n,
            )
        return RewardOutput(
            total.astype(np.float32), per_reward.astype(np.float32), self.names, self.weights
        )

    def _bounds(self, n: int) -> list[tuple[int, int]]:
        chunks = max(1, min(n, self.num_workers * self.chunks_per_worker))
        edges = np.linspace(0, n, chunks + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]

    def _submit(self, specs, texts, columns, bounds=None):
        pending = []
        for a, b in self._bounds(len(texts)) if bounds is None else bounds:
            try:
                future = self._submit_chunk(specs, texts, columns, a, b)
            except BrokenProcessPool as e:  # a worker died while later chunks were submitted
                future = concurrent.futures.Future()
                future.set_exception(e)
            pending.append((a, b, future))
        return pending

    def _submit_chunk(self, specs, texts, columns, a: int, b: int) -> concurrent.futures.Future:
        """Score samples [a, b) in the pool, under their deadline."""
        chunk = _slice_columns(columns, len(texts), a, b)
        return self._get_pool().submit(
            _score,
            specs,
            texts[a:b],
            chunk,
            deadline_s=self._deadline_s(specs, chunk, b - a),
            first=a,
            backstop_s=self._backstop_s,
        )

    def _deadline_s(self, specs, chunk: dict, size: int) -> float:
        """A chunk's deadline: `timeout_s` per sample, or for a code row, when longer, its tests x
        the code reward's `sandbox.timeout_s` (each test of a correct but slow program may run
        almost that long, one after another); 0 = none."""
        if not self.timeout_s:
            return 0.0
        per_test = max((_test_seconds(s) for s in specs), default=0.0)
        tests = chunk.get("tests") if per_test else None
        if isinstance(tests, str | bytes):  # (one JSON string of tests for every row)
            tests = [tests] * size
        if not isinstance(tests, list) or len(tests) != size:
            return self.timeout_s * size
        return sum(max(self.timeout_s, _test_count(t) * per_test) for t in tests)

    def _gather(self, specs, pending, texts, columns, n) -> tuple[np.ndarray, np.ndarray]:
        """Pooled rewards' values [R, n] and which samples went unscored [n] (worker died twice)."""
        out = np.full((len(specs), n), np.nan)
        unscored = np.zeros(n, bool)
        retry = []
        for a, b, future in pending:
            try:
                out[:, a:b] = future.result()
            except BrokenProcessPool:
                retry.append((a, b))
        if retry and self._stopped:  # (closed without waiting: the workers were ended)
            raise RuntimeError("the reward function was closed while it scored")
        if retry:
            said, named = self._why_workers_ended()
            # A chunk a worker named as past its deadline is retried alone; the chunks it took
            # with it, together. Without a name (a worker killed, e.g. for memory) any could be
            # the cause: all one at a time, so one that kills its worker again takes no other.
            alone = [c for c in retry if c in named] if named else retry
            together = [c for c in retry if c not in alone]
            logger.error(
                "a reward worker died%s; rebuilding the pool and retrying %d chunk(s)",
                said,
                len(retry),
            )
            self._discard_pool()
            for a, b, future in self._submit(specs, texts, columns, together):
                try:
                    out[:, a:b] = future.result()
                except BrokenProcessPool:
                    alone.append((a, b))
            if len(alone) > len(retry) - len(together):  # (the round together broke)
                logger.error(
                    "a reward worker died again%s; retrying %d chunk(s) one at a time",
                    self._why_workers_ended()[0],
                    len(alone),
                )
                self._discard_pool()
            for a, b in alone:
                try:
                    out[:, a:b] = self._submit_chunk(specs, texts, columns, a, b).result()
                except BrokenProcessPool:
                    logger.error(
                        "reward worker died again on samples [%d, %d)%s; they are unscored "
                        "(NaN: advantage 0, left out of their groups' reward statistics)",
                        a,
                        b,
                        self._why_workers_ended()[0],
                    )
                    unscored[a:b] = True
                    self._discard_pool()
            if n and unscored.all() and not self._pool_works():
                raise RuntimeError(
                    "every reward worker died, twice, and a new pool cannot run a trivial task: "
                    "the pool itself is failing (see the worker tracebacks above; a script using "
                    "the pool needs an `if __name__ == '__main__':` guard). Set num_workers=0 to "
                    "score in-process while debugging."
                )
        return out, unscored

    def _pool_works(self, timeout_s: float = 60.0) -> bool:
        """Whether a fresh pool runs a trivial task (tells a broken pool from samples that kill
        their workers)."""
        try:
            self._get_pool().submit(os.getpid).result(timeout=timeout_s)
            return True
        except (BrokenProcessPool, concurrent.futures.TimeoutError):
            self._discard_pool()
            return False

    def _discard_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def build_reward_fn(
    specs: Sequence[Any] | Mapping[str, Any],
    *,
    num_workers: int | None = None,
    timeout_s: float | None = None,
) -> RewardFunction:
    """Config reward list -> ``RewardFunction`` (see ``parse_spec`` for the accepted forms).

    Args:
      specs: a list, e.g. ``[("accuracy", 1.0, {}), ("format", 0.5, {}), ("code", 1.0,
        {"sandbox": {"timeout_s": 2.0}})]``; or a dict / ConfigDict keyed by name, e.g.
        ``{"accuracy": 1.0, "code": {"weight": 1.0, "kwargs": {"sandbox": {...}}}}`` (the form
        an ``ml_collections`` config can hold, since it forbids dicts inside lists).
      num_workers: pool size; 0 scores in the calling process; None = available cores (max 16).
      timeout_s: a pool worker's deadline, in seconds per sample of the chunk it scores (see the
        module docstring); 0 = none; None = ``DEFAULT_TIMEOUT_S``.
    """
    return RewardFunction(
        specs,
        num_workers=num_workers,
        timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
    )


# --- host callback from jit --------------------------------------------------------------------


class HostRewardBridge:
    """Score sampled token ids from inside a jitted function via ``jax.pure_callback``.

    Args:
      reward_fn: the composition to run on the host.
      decode: tokenizer batch decode, ``[[int]] -> [str]`` (e.g. ``functools.partial(
        tokenizer.batch_decode, skip_special_tokens=True)``).
      columns: the dataset columns, ``{name: [N] values}``, indexed by the row ids passed at call
        time (e.g. the prompts of the current step, or the whole dataset).
      stop_token_ids, stop_strings: what ends a completion, as the sampler was given them (ids;
        a `data.StopStrings` or None): the rewards get ``completion_truncated``, [B] whether
        completion b filled the token budget (the tokens' width) without ending in one.

    An exception the rewards raise inside the jitted program is not raised there: on a mesh of
    several devices the callback runs on one of them and the others' collectives wait for it
    forever (XLA:CPU aborts the process after 40 s, no Python error at all). The callback's rows
    are then NaN (unscored), the exception is kept, and `raise_error()`, called once the
    program's outputs are fetched, raises it.
    """

    def __init__(
        self,
        reward_fn: RewardFunction,
        decode: Callable[[list[list[int]]], list[str]],
        columns: Mapping[str, Sequence[Any]] | None = None,
        stop_token_ids: Sequence[int] = (),
        stop_strings=None,
    ):
        on_device = [s.name for s in reward_fn.specs if getattr(s.fn, "runs_on_device", False)]
        if on_device:
            raise ValueError(
                f"rewards {on_device} run jitted programs on the device and cannot be scored from "
                "inside jax.jit's host callback (deadlock risk); score them outside the jitted "
                "rollout (the RL stage's config.reward_model does)"
            )
        self.reward_fn = reward_fn
        self.decode = decode
        self.columns = dict(columns or {})
        self.stop_token_ids = frozenset(int(i) for i in stop_token_ids)
        self.stop_strings = stop_strings
        self.error: BaseException | None = None  # the first a callback met since raise_error

    @property
    def names(self) -> tuple[str, ...]:
        return self.reward_fn.names

    def score_host(
        self, tokens: np.ndarray, lengths: np.ndarray, row_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Host side: [B, T] int tokens, [B] lengths, [B] row ids -> ([B], [R, B]) float32.

        ``tokens[b, :lengths[b]]`` is completion b (right padding beyond it is ignored).
        """
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
            raise ValueError(
                f"need tokens [B, T] and lengths [B], got {tokens.shape} and {lengths.shape}"
            )
        lengths = np.clip(lengths, 0, tokens.shape[1])
        ids = [tokens[b, : lengths[b]].tolist() for b in range(tokens.shape[0])]
        texts = list(self.decode(ids))
        columns: dict[str, Any] = {}
        if row_ids is not None:
            rows = np.asarray(row_ids).tolist()
            columns = {k: [v[i] for i in rows] for k, v in self.columns.items()}
        columns["completion_ids"] = ids
        budget = tokens.shape[1]
        columns["completion_truncated"] = [self._cut_off(x, budget) for x in ids]
        out = self.reward_fn(texts, **columns)
        return out.total, out.per_reward

    def _cut_off(self, ids: list[int], budget: int) -> bool:
        """Whether a completion filled the budget without its last token ending it."""
        if len(ids) < budget or (ids and ids[-1] in self.stop_token_ids):
            return False
        return not (self.stop_strings and self.stop_strings.stopped(ids))

    def raise_error(self) -> None:
        """Raise the first exception the rewards raised inside a jitted program since the last
        call (call it after fetching the program's outputs: the callback has run by then)."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def _score_in_callback(self, tokens, lengths, row_ids=None):
        try:
            return self.score_host(tokens, lengths, row_ids)
        except Exception as err:
            self.error = self.error or err
            nan = np.full((len(self.names), np.shape(tokens)[0]), np.nan, np.float32)
            return nan[0], nan

    def __call__(self, tokens, lengths, row_ids=None):
        """Traced side: [B, T] int32, [B] int32, optional [B] int32 -> ([B], [R, B]) float32."""
        import jax
        import jax.numpy as jnp

        batch = tokens.shape[0]
        shapes = (
            jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct((len(self.names), batch), jnp.float32),
        )
        args = (tokens, lengths) if row_ids is None else (tokens, lengths, row_ids)
        return jax.pure_callback(self._score_in_callback, shapes, *args, vmap_method="sequential")
